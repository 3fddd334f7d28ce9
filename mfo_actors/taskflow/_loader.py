"""Flow files -> :class:`Flow`: parse YAML with lines, convert to Structs, validate, compile.

Everything that can be wrong with a flow is found here, at load time, and reported as a
:class:`~mfo_actors.errors.ConfigError` naming the file, the key path (``tasks.<id>.<key>``)
and the YAML line: unknown keys, duplicate ids, unknown dependencies, cycles (named
``a -> b -> c -> a``), unknown task types (one line for the whole file, naming the known
ones), task config against the type's Struct, ``${...}`` references to tasks that are not
ancestors, ``when:`` syntax, triggers (cron syntax, timezones, intervals), subflows that do
not exist or call each other in a loop.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from croniter import croniter

from mfo_actors._yaml import KeyPath, LineMap, dec_hook, parse_yaml, split_validation_error
from mfo_actors.errors import ConfigError
from mfo_actors.taskflow._errors import ExpressionSyntaxError, FlowLoadError
from mfo_actors.taskflow._expr import Expression, compile_expression
from mfo_actors.taskflow._flow import EventTrigger, Flow, Node, ScheduleTrigger
from mfo_actors.taskflow._model import FlowSpec
from mfo_actors.taskflow._registry import TaskRegistry
from mfo_actors.taskflow._sessions import SESSION_FIELDS
from mfo_actors.taskflow._template import (
    RESERVED_ROOTS,
    Ref,
    Template,
    compile_tree,
    compile_url,
    tree_refs,
)

__all__ = ["check_flows", "load_flow", "load_flow_data", "load_flow_text", "load_flows"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_TASK_ID = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,127}")


class _Compiler:
    """Compiles one flow; collects every problem instead of stopping at the first."""

    def __init__(self, registry: TaskRegistry, file: str, lines: LineMap | None) -> None:
        self.registry = registry
        self.file = file
        self.lines = lines
        self.errors: list[ConfigError] = []
        self.ids: list[str] = []

    def key(self, path: KeyPath) -> str | None:
        out = ""
        for i, part in enumerate(path):
            if isinstance(part, int):
                if i > 0 and path[i - 1] == "tasks" and part < len(self.ids) and self.ids[part]:
                    out += f".{self.ids[part]}"
                else:
                    out += f"[{part}]"
            else:
                out += f".{part}" if out else str(part)
        return out or None

    def fail(self, message: str, *path: str | int) -> None:
        line = self.lines.line(path) if self.lines is not None else None
        self.errors.append(ConfigError(message, file=self.file, key=self.key(path), line=line))

    # -- entry -----------------------------------------------------------------------------

    def compile(self, data: Any) -> Flow | None:
        if not isinstance(data, dict):
            self.fail("a flow file must be a YAML mapping with name and tasks")
            return None
        raw_tasks = data.get("tasks")
        if isinstance(raw_tasks, list):
            self.ids = [str(t["id"]) if isinstance(t, dict) and isinstance(t.get("id"), str)
                        else "" for t in raw_tasks]
        try:
            spec = msgspec.convert(data, FlowSpec, dec_hook=dec_hook)
        except msgspec.ValidationError as exc:
            message, path = split_validation_error(exc)
            self.fail(message, *path)
            return None
        return self.compile_spec(spec)

    def compile_spec(self, spec: FlowSpec) -> Flow | None:
        self.ids = [t.id for t in spec.tasks]
        if not _NAME.fullmatch(spec.name):
            self.fail("flow name must be letters, digits, '.', '_' or '-'", "name")
        if spec.concurrency < 1:
            self.fail("must be at least 1", "concurrency")
        if spec.timeout is not None and spec.timeout <= 0:
            self.fail("must be greater than 0", "timeout")
        if not spec.tasks:
            self.fail("a flow needs at least one task", "tasks")
        nodes = self.build_nodes(spec)
        if self.errors:
            return None
        order = self.check_graph(nodes)
        if order is None:
            return None
        self.check_types(nodes)
        subflows: set[str] = set()
        for node in nodes:
            self.compile_task(node, nodes, subflows)
        outputs_tree = self.compile_outputs(spec, nodes)
        event_triggers, schedules = self.compile_triggers(spec)
        if self.errors:
            return None
        return Flow(spec, self.file, nodes, outputs_tree, event_triggers, schedules, subflows)

    # -- graph -----------------------------------------------------------------------------

    def build_nodes(self, spec: FlowSpec) -> list[Node]:
        nodes: list[Node] = []
        seen: dict[str, int] = {}
        for i, task in enumerate(spec.tasks):
            if not _TASK_ID.fullmatch(task.id):
                self.fail("task id must start with a letter or '_' and use letters, digits, "
                          "'_' or '-'", "tasks", i, "id")
            elif task.id in RESERVED_ROOTS:
                self.fail(f"task id {task.id!r} is reserved (used by ${{{task.id}.…}})",
                          "tasks", i, "id")
            if task.id in seen:
                self.fail(f"duplicate task id {task.id!r} (first at tasks[{seen[task.id]}])",
                          "tasks", i, "id")
            else:
                seen[task.id] = i
            line = self.lines.line(("tasks", i)) if self.lines is not None else None
            nodes.append(Node(i, task, self.registry.get(task.type), line))
        if self.errors:
            return nodes
        succs: list[list[int]] = [[] for _ in nodes]
        for node in nodes:
            deps: list[int] = []
            for j, dep in enumerate(node.spec.dependencies):
                if dep not in seen:
                    self.fail(f"unknown dependency {dep!r}", "tasks", node.index, "dependencies", j)
                elif dep == node.id:
                    self.fail("a task cannot depend on itself",
                              "tasks", node.index, "dependencies", j)
                elif seen[dep] not in deps:
                    deps.append(seen[dep])
            node.deps = tuple(deps)
            for d in deps:
                succs[d].append(node.index)
        for node in nodes:
            node.succs = tuple(succs[node.index])
        return nodes

    def check_graph(self, nodes: list[Node]) -> list[int] | None:
        """Topological order, or report one cycle as ``a -> b -> a`` and return None."""
        white, grey, black = 0, 1, 2
        color = [white] * len(nodes)
        order: list[int] = []
        for start in range(len(nodes)):
            if color[start] != white:
                continue
            stack: list[tuple[int, int]] = [(start, 0)]
            path: list[int] = [start]
            color[start] = grey
            while stack:
                i, k = stack[-1]
                deps = nodes[i].deps
                if k < len(deps):
                    stack[-1] = (i, k + 1)
                    d = deps[k]
                    if color[d] == grey:
                        # Dependency order (a -> b: b depends on a), from the first task
                        # in the file, whose dependencies close the loop.
                        cycle = list(reversed(path[path.index(d):]))
                        k0 = cycle.index(min(cycle))
                        cycle = cycle[k0:] + cycle[:k0]
                        names = [nodes[c].id for c in cycle] + [nodes[cycle[0]].id]
                        self.fail(f"dependency cycle: {' -> '.join(names)}",
                                  "tasks", cycle[0], "dependencies")
                        return None
                    if color[d] == white:
                        color[d] = grey
                        stack.append((d, 0))
                        path.append(d)
                else:
                    stack.pop()
                    path.pop()
                    color[i] = black
                    order.append(i)
        return order

    def check_types(self, nodes: list[Node]) -> None:
        unknown = [n for n in nodes if n.task_type is None]
        if not unknown:
            return
        names = sorted({n.type for n in unknown})
        known = ", ".join(self.registry.names()) or "none"
        plural = "s" if len(names) > 1 else ""
        self.fail(f"unknown task type{plural} {', '.join(names)} (known types: {known})",
                  "tasks", unknown[0].index, "type")

    def ancestors(self, nodes: list[Node], index: int) -> set[int]:
        seen: set[int] = set()
        stack = list(nodes[index].deps)
        while stack:
            i = stack.pop()
            if i not in seen:
                seen.add(i)
                stack.extend(nodes[i].deps)
        return seen

    def check_refs(self, refs: list[tuple[KeyPath, Ref]], nodes: list[Node], index: int | None,
                   path: KeyPath) -> None:
        """References may name the event/input/flow/run, or a task that is an ancestor."""
        ancestors: set[int] | None = None
        for sub, ref in refs:
            where = (*path, *sub)
            if ref.root in RESERVED_ROOTS:
                if ref.root == "flow" and ref.path not in {("name",), ("file",)}:
                    self.fail(f"${{{ref.text}}}: flow has only name and file", *where)
                if ref.root == "run" and ref.path != ("id",):
                    self.fail(f"${{{ref.text}}}: run has only id", *where)
                if ref.root == "session":
                    if ancestors is None and index is not None:
                        ancestors = self.ancestors(nodes, index)
                    self.check_session_ref(ref, nodes, ancestors, index, where)
                continue
            target = next((n for n in nodes if n.id == ref.root), None)
            if target is None:
                self.fail(f"${{{ref.text}}} names no task of this flow "
                          f"(nor event, input, flow, run, session)", *where)
                continue
            if index is None:
                continue
            if ancestors is None:
                ancestors = self.ancestors(nodes, index)
            if target.index not in ancestors:
                self.fail(f"${{{ref.text}}} refers to task {ref.root!r}, which is not an "
                          f"ancestor of {nodes[index].id!r} (add it to dependencies)", *where)

    def check_session_ref(self, ref: Ref, nodes: list[Node], ancestors: set[int] | None,
                          index: int | None, where: KeyPath) -> None:
        """``${session.x}``: a session field, set by an ``mfo.chat`` with ``session:`` that
        runs before (an ancestor; for ``outputs:``, any task of the flow)."""
        if not ref.path or ref.path[0] not in SESSION_FIELDS:
            self.fail(f"${{{ref.text}}}: session has only "
                      f"{', '.join(sorted(SESSION_FIELDS))}", *where)
            return
        sources = [n for n in nodes if n.type == "mfo.chat" and "session" in n.spec.config]
        if index is not None:
            sources = [n for n in sources if ancestors is not None and n.index in ancestors]
        if not sources:
            whose = f"of {nodes[index].id!r} " if index is not None else ""
            self.fail(f"${{{ref.text}}}: no mfo.chat task with session: runs before it "
                      f"(add one to the dependencies {whose}first)", *where)

    def expression(self, text: str, *path: str | int) -> Expression | None:
        try:
            return compile_expression(text)
        except ExpressionSyntaxError as exc:
            self.fail(f"invalid expression {text!r}: {exc.message}", *path)
            return None

    # -- tasks -----------------------------------------------------------------------------

    def compile_task(self, node: Node, nodes: list[Node], subflows: set[str]) -> None:
        i = node.index
        spec = node.spec
        if spec.when is not None:
            node.when = self.expression(spec.when, "tasks", i, "when")
            if node.when is not None:
                self.check_refs([((), r) for r in node.when.refs], nodes, i, ("tasks", i, "when"))
        if spec.retry is not None:
            if spec.retry.max_attempts < 1:
                self.fail("must be at least 1", "tasks", i, "retry", "max_attempts")
            if spec.retry.backoff_multiplier < 1.0:
                self.fail("must be at least 1.0", "tasks", i, "retry", "backoff_multiplier")
        if spec.timeout is not None and spec.timeout <= 0:
            self.fail("must be greater than 0", "tasks", i, "timeout")
        tt = node.task_type
        if tt is None:
            return
        raw = dict(spec.config)
        for field in getattr(tt.config, "template_files", ()):
            value = raw.get(field)
            if isinstance(value, str) and "${" not in value:
                raw[field] = self.read_template_file(value, "tasks", i, "config", field)
        if tt.name == "condition":
            self.compile_condition(node, nodes, raw)
        try:
            tree, templated = compile_tree(raw)
        except ValueError as exc:
            self.fail(str(exc), "tasks", i, "config")
            return
        for field in getattr(tt.config, "url_fields", ()):
            value = tree.get(field)
            if isinstance(value, Template):
                try:
                    tree[field] = compile_url(value)
                except ValueError as exc:
                    self.fail(str(exc), "tasks", i, "config", field)
                    return
        self.check_refs(list(tree_refs(tree)), nodes, i, ("tasks", i, "config"))
        try:
            cfg = msgspec.convert(_placeholders(tree, tt.config) if templated else tree,
                                  tt.config, dec_hook=dec_hook)
        except msgspec.ValidationError as exc:
            message, path = split_validation_error(exc)
            self.fail(message, "tasks", i, "config", *path)
            return
        target = getattr(cfg, "flow", None)
        if tt.name == "subflow" and isinstance(target, str) \
                and not isinstance(tree.get("flow"), Template):
            subflows.add(target)
        if templated:
            node.config_tree = tree
            return
        node.config = cfg
        try:
            node.func = tt.factory(cfg)
        except (ValueError, TypeError) as exc:
            self.fail(str(exc), "tasks", i, "config")

    def read_template_file(self, name: str, *path: str | int) -> str:
        base = Path(self.file).parent if self.file and not self.file.startswith("<") else Path()
        target = Path(name) if Path(name).is_absolute() else base / name
        try:
            return target.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            self.fail(f"cannot read {target}: {getattr(exc, 'strerror', None) or exc}", *path)
            return ""

    def compile_condition(self, node: Node, nodes: list[Node], raw: dict[str, Any]) -> None:
        i = node.index
        node.is_condition = True
        by_id = {n.id: n.index for n in nodes}

        def targets(value: Any, *path: str | int) -> tuple[int, ...]:
            ids = [value] if isinstance(value, str) else value
            if not isinstance(ids, list) or not all(isinstance(v, str) for v in ids):
                return ()  # the Struct check reports the type
            out = []
            for tid in ids:
                j = by_id.get(tid)
                if j is None or j not in node.succs:
                    self.fail(f"branch target {tid!r} is not a task that depends on "
                              f"{node.id!r}", *path)
                else:
                    out.append(j)
            return tuple(out)

        branches = raw.get("branches") or {}
        if isinstance(branches, dict):
            for text, value in branches.items():
                expr = self.expression(str(text), "tasks", i, "config", "branches", str(text))
                tset = targets(value, "tasks", i, "config", "branches", str(text))
                if expr is not None:
                    self.check_refs([((), r) for r in expr.refs], nodes, i,
                                    ("tasks", i, "config", "branches", str(text)))
                    node.branches.append((expr, tset))
        if raw.get("default") is not None:
            node.default_branch = targets(raw["default"], "tasks", i, "config", "default")
        mentioned: set[int] = set(node.default_branch)
        for _, tset in node.branches:
            mentioned.update(tset)
        node.branch_targets = frozenset(mentioned)
        # Expressions are compiled here; the Struct sees them as plain keys.

    def compile_outputs(self, spec: FlowSpec, nodes: list[Node]) -> Any:
        try:
            tree, _ = compile_tree(dict(spec.outputs))
        except ValueError as exc:
            self.fail(str(exc), "outputs")
            return {}
        self.check_refs(list(tree_refs(tree)), nodes, None, ("outputs",))
        return tree

    def compile_triggers(self, spec: FlowSpec) -> tuple[list[EventTrigger], list[ScheduleTrigger]]:
        events: list[EventTrigger] = []
        schedules: list[ScheduleTrigger] = []
        for k, trig in enumerate(spec.triggers):
            given = [n for n in ("event", "cron", "interval") if getattr(trig, n) is not None]
            if len(given) != 1:
                self.fail("a trigger needs exactly one of event, cron, interval"
                          + (f" (got {', '.join(given)})" if given else ""), "triggers", k)
                continue
            if trig.timezone is not None:
                if trig.cron is None:
                    self.fail("timezone applies to cron triggers only", "triggers", k, "timezone")
                else:
                    try:
                        ZoneInfo(trig.timezone)
                    except (ZoneInfoNotFoundError, ValueError):
                        self.fail(f"unknown timezone {trig.timezone!r}",
                                  "triggers", k, "timezone")
            if trig.event is not None:
                when = None
                if trig.event.when is not None:
                    when = self.expression(trig.event.when, "triggers", k, "event", "when")
                    for ref in when.refs if when else []:
                        if ref.root != "event":
                            self.fail(f"${{{ref.text}}}: a trigger condition can only read "
                                      "${event.…}", "triggers", k, "event", "when")
                events.append(EventTrigger(k, trig.event.source, trig.event.type, when))
            elif trig.cron is not None:
                if not croniter.is_valid(trig.cron):
                    self.fail(f"invalid cron expression {trig.cron!r}", "triggers", k, "cron")
                else:
                    schedules.append(ScheduleTrigger(k, "cron", cron=trig.cron,
                                                     timezone=trig.timezone))
            elif trig.interval is not None:
                if trig.interval <= 0:
                    self.fail("must be greater than 0", "triggers", k, "interval")
                else:
                    schedules.append(ScheduleTrigger(k, "interval", interval=trig.interval))
        return events, schedules


def _placeholders(tree: Any, tp: Any) -> Any:
    """A stand-in for a templated config that the Struct accepts, to check what is static."""
    return _fill(tree, msgspec.inspect.type_info(tp))


def _fill(tree: Any, t: msgspec.inspect.Type) -> Any:
    mi = msgspec.inspect
    if isinstance(tree, Template):
        return _dummy(t, tree)
    if isinstance(t, mi.UnionType):
        want: type[Any] = dict if isinstance(tree, dict) else list if isinstance(tree, list) \
            else type(None)
        for member in t.types:
            if (want is dict and isinstance(member, mi.StructType | mi.DictType)) or \
                    (want is list and isinstance(member, mi.ListType | mi.TupleType
                                                | mi.VarTupleType | mi.SetType)):
                return _fill(tree, member)
        return tree
    if isinstance(tree, dict):
        if isinstance(t, mi.StructType):
            fields = {f.encode_name: f.type for f in t.fields}
            return {k: _fill(v, fields.get(k, mi.AnyType())) for k, v in tree.items()}
        if isinstance(t, mi.DictType):
            return {k: _fill(v, t.value_type) for k, v in tree.items()}
        return {k: _fill(v, mi.AnyType()) for k, v in tree.items()}
    if isinstance(tree, list):
        item = t.item_type if isinstance(t, mi.ListType | mi.VarTupleType | mi.SetType) \
            else mi.AnyType()
        return [_fill(v, item) for v in tree]
    return tree


def _dummy(t: msgspec.inspect.Type, tmpl: Template) -> Any:
    mi = msgspec.inspect
    if isinstance(t, mi.UnionType):
        for member in t.types:
            if not isinstance(member, mi.NoneType):
                return _dummy(member, tmpl)
        return None
    if isinstance(t, mi.BoolType):
        return False
    if isinstance(t, mi.IntType | mi.FloatType):
        low = t.ge if t.ge is not None else (t.gt + 1 if t.gt is not None else 0)
        return low if t.le is None or low <= t.le else t.le
    if isinstance(t, mi.CustomType):
        return 0
    if isinstance(t, mi.DictType | mi.StructType):
        return {}
    if isinstance(t, mi.ListType | mi.VarTupleType | mi.SetType):
        return []
    if isinstance(t, mi.LiteralType):
        return t.values[0]
    if isinstance(t, mi.NoneType):
        return None
    return tmpl.source


def _compile(data: Any, registry: TaskRegistry, file: str, lines: LineMap | None
             ) -> tuple[Flow | None, list[ConfigError]]:
    compiler = _Compiler(registry, file, lines)
    flow = compiler.compile(data)
    return flow, compiler.errors


def _raise(errors: list[ConfigError]) -> None:
    if len(errors) == 1:
        raise errors[0]
    raise FlowLoadError(errors)


def load_flow_data(data: Mapping[str, Any], registry: TaskRegistry, *, file: str = "<flow>"
                   ) -> Flow:
    """Compile a flow from already-parsed data (no line numbers); for tests and benchmarks."""
    flow, errors = _compile(dict(data), registry, file, None)
    if errors or flow is None:
        _raise(errors)
    assert flow is not None
    return flow


def load_flow_text(text: str, registry: TaskRegistry, *, file: str = "<flow>") -> Flow:
    """Compile a flow from YAML text; errors carry *file* and YAML lines."""
    data, lines = parse_yaml(text, file)
    flow, errors = _compile(data, registry, file, lines)
    if errors or flow is None:
        _raise(errors)
    assert flow is not None
    return flow


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read flow file: {exc.strerror or exc}", file=path) from None
    except UnicodeDecodeError:
        raise ConfigError("flow file is not valid UTF-8", file=path) from None


def load_flow(path: str | os.PathLike[str], registry: TaskRegistry) -> Flow:
    """Load and validate one flow file.

    Raises:
      ConfigError: one problem; :class:`FlowLoadError` (a ConfigError) when there are several.
    """
    file = os.fspath(path)
    return load_flow_text(_read(file), registry, file=file)


def _flow_files(directory: str) -> list[Path]:
    root = Path(directory)
    return sorted(p for p in root.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def load_flows(directory: str | os.PathLike[str], registry: TaskRegistry) -> dict[str, Flow]:
    """Load every ``*.yaml``/``*.yml`` directly in *directory* (not sub-directories).

    A missing directory holds no flows. Also checks across files: two flows with one name,
    ``subflow`` tasks naming a flow that is not loaded, and subflows calling each other in a
    loop.

    Raises:
      FlowLoadError: with every problem in every file (``.errors``); a single problem is
        raised as a plain ConfigError.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return {}
    flows: dict[str, Flow] = {}
    errors: list[ConfigError] = []
    for path in _flow_files(directory):
        file = str(path)
        try:
            text = _read(file)
            data, lines = parse_yaml(text, file)
        except ConfigError as exc:
            errors.append(exc)
            continue
        flow, errs = _compile(data, registry, file, lines)
        errors.extend(errs)
        if flow is None:
            continue
        if flow.name in flows:
            errors.append(ConfigError(
                f"flow {flow.name!r} is already defined in {flows[flow.name].file}",
                file=file, key="name", line=lines.line(("name",))))
            continue
        flows[flow.name] = flow
    errors.extend(_check_subflows(flows))
    if errors:
        _raise(errors)
    return flows


def _check_subflows(flows: dict[str, Flow]) -> list[ConfigError]:
    errors: list[ConfigError] = []
    for flow in flows.values():
        for node in flow.nodes:
            if node.type != "subflow" or node.config is None:
                continue
            target = getattr(node.config, "flow", None)
            if target not in flows:
                errors.append(ConfigError(
                    f"subflow {target!r} is not a loaded flow (loaded: "
                    f"{', '.join(sorted(flows))})",
                    file=flow.file, key=f"tasks.{node.id}.config.flow", line=node.line))
    # A loop of subflows would recurse until the depth limit: refuse it at load.
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> list[str] | None:
        state[name] = 1
        for sub in sorted(flows[name].subflows):
            if sub not in flows:
                continue
            if state.get(sub) == 1:
                return [*trail[trail.index(sub):], sub] if sub in trail else [name, sub]
            if state.get(sub) is None:
                found = visit(sub, [*trail, sub])
                if found:
                    return found
        state[name] = 2
        return None

    for name in sorted(flows):
        if name not in state:
            loop = visit(name, [name])
            if loop:
                first = flows[loop[0]]
                errors.append(ConfigError(f"subflow loop: {' -> '.join(loop)}", file=first.file,
                                          key="tasks"))
                break
    return errors


def check_flows(flows_dir: str) -> list[str]:
    """Validate every flow in *flows_dir* with the default registry; one line per problem.

    The ``check`` CLI calls this; an empty list means every flow is valid.
    """
    from mfo_actors.taskflow._builtins import default_registry

    try:
        load_flows(flows_dir, default_registry())
    except FlowLoadError as exc:
        return [str(e) for e in exc.errors]
    except ConfigError as exc:
        return [str(exc)]
    return []
