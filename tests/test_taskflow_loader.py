"""Flow loading: every validation error names the file, the task (key path) and the YAML line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from mfo_actors.errors import ConfigError
from mfo_actors.taskflow import (
    EmptyConfig,
    FlowLoadError,
    TaskRegistry,
    builtin_registry,
    check_flows,
    default_registry,
    load_flow,
    load_flow_text,
    load_flows,
    to_mermaid,
)

REPO = Path(__file__).resolve().parent.parent


def registry() -> TaskRegistry:
    reg = builtin_registry()

    @reg.factory("noop")
    def _noop(cfg: EmptyConfig):  # type: ignore[no-untyped-def]
        async def run(ctx):  # type: ignore[no-untyped-def]
            return {}

        return run

    return reg


def write(tmp_path: Path, text: str, name: str = "flow.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def load_error(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_flow(path, registry())
    err = info.value
    assert err.file == str(path)
    return err


def test_valid_flow_loads_and_compiles(tmp_path: Path) -> None:
    path = write(tmp_path, """
        name: ok
        triggers:
          - event: {source: crm, type: "user.*", when: "${event.payload.plan} != 'free'"}
          - cron: "0 9 * * mon-fri"
          - interval: 30s
        timeout: 5m
        outputs: {greeting: "${b.text}"}
        tasks:
          - id: a
            type: set
            config: {values: {name: "${input.name}"}}
          - id: b
            type: set
            dependencies: [a]
            when: "${a.name} != null"
            retry: {max_attempts: 3, initial_backoff: 10ms}
            timeout: 1s
            config: {values: {text: "hello ${a.name}"}}
    """)
    flow = load_flow(path, registry())
    assert flow.name == "ok"
    assert [n.id for n in flow.nodes] == ["a", "b"]
    assert flow.task("b").deps == (0,)
    assert flow.timeout == 300.0
    retry = flow.task("b").retry
    assert retry is not None and retry.initial_backoff == 0.01
    assert [s.kind for s in flow.schedules] == ["cron", "interval"]
    assert flow.matches_event({"source": "crm", "type": "user.signup", "payload": {"plan": "pro"}})
    assert not flow.matches_event({"source": "crm", "type": "user.signup",
                                   "payload": {"plan": "free"}})
    assert not flow.matches_event({"source": "billing", "type": "user.signup", "payload": {}})
    # a missing payload key is no match, not a crash
    assert not flow.matches_event({"source": "crm", "type": "user.x", "payload": {}})


def test_unknown_top_level_key(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
        name: f
        concurency: 3
        tasks: [{id: a, type: noop}]
    """)
    assert err.key == "concurency" and err.line == 2 and "unknown key" in err.message


def test_unknown_task_key_names_the_task(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
        name: f
        tasks:
          - id: first
            type: noop
          - id: second
            type: noop
            dependecies: [first]
    """)
    assert err.key == "tasks.second.dependecies" and err.line == 7


def test_duplicate_ids(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
        name: f
        tasks:
          - id: a
            type: noop
          - id: a
            type: noop
    """)
    assert "duplicate task id 'a'" in err.message and err.line == 5


def test_unknown_dependency(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
        name: f
        tasks:
          - id: a
            type: noop
          - id: b
            type: noop
            dependencies: [a, nope]
    """)
    assert "unknown dependency 'nope'" in err.message
    assert err.key == "tasks.b.dependencies[1]" and err.line == 7


def test_cycle_is_named(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
        name: f
        tasks:
          - {id: a, type: noop, dependencies: [c]}
          - {id: b, type: noop, dependencies: [a]}
          - {id: c, type: noop, dependencies: [b]}
          - {id: d, type: noop}
    """)
    assert "a -> b -> c -> a" in err.message
    assert err.key is not None and err.key.startswith("tasks.")
    assert err.line in (3, 4, 5)


def test_self_dependency(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
        name: f
        tasks:
          - {id: a, type: noop, dependencies: [a]}
    """)
    assert "itself" in err.message and err.key == "tasks.a.dependencies[0]" and err.line == 3


def test_unknown_types_one_line_naming_all_and_known(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
        name: f
        tasks:
          - {id: a, type: frob}
          - {id: b, type: noop}
          - {id: c, type: blarg, dependencies: [a]}
    """)
    assert "unknown task types blarg, frob" in err.message
    assert "known types:" in err.message and "noop" in err.message and "mfo.chat" in err.message
    assert err.key == "tasks.a.type" and err.line == 3
    assert "\n" not in str(err)


def test_seed_flow_fails_naming_both_types_and_known_ones() -> None:
    seed = REPO / "flows" / "examples" / "user_signup.yaml"
    with pytest.raises(ConfigError) as info:
        load_flow(seed, default_registry())
    msg = str(info.value)
    assert "email_verification" in msg and "notification" in msg
    assert "known types: condition, http.request" in msg
    assert info.value.file == str(seed) and info.value.line is not None
    problems = check_flows(str(seed.parent))
    assert len(problems) == 1 and "email_verification, notification" in problems[0]


def test_seed_flow_loads_once_types_exist() -> None:
    reg = builtin_registry()

    class VerifyConfig(EmptyConfig, frozen=True, forbid_unknown_fields=True):
        retry_count: int = 1

    reg.register("email_verification", lambda cfg: None, config=VerifyConfig)  # type: ignore
    reg.register("notification", lambda cfg: None)  # type: ignore
    flow = load_flow(REPO / "flows" / "examples" / "user_signup.yaml", reg)
    assert flow.name == "UserSignupFlow"
    assert flow.task("verify_email").config.retry_count == 3
    assert flow.task("send_welcome_email").deps == (0,)


def test_example_flows_are_valid() -> None:
    assert check_flows(str(REPO / "flows")) == []
    flows = load_flows(REPO / "flows", default_registry())
    assert flows, "the example flows directory should hold at least one flow"
    for flow in flows.values():
        assert to_mermaid(flow).startswith("graph TD\n")


def test_task_config_validated_against_struct(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
        name: f
        tasks:
          - id: nap
            type: sleep
            config:
              duration: soon
    """)
    assert err.key == "tasks.nap.config.duration" and err.line == 6
    assert "invalid duration" in err.message


def test_task_config_unknown_key(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
        name: f
        tasks:
          - id: say
            type: log
            config: {message: hi, colour: red}
    """)
    assert err.key == "tasks.say.config.colour" and err.message == "unknown key"
    assert err.line == 5


def test_task_config_missing_required(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
        name: f
        tasks:
          - id: get
            type: mfo.memory.get
            config: {}
    """)
    assert "key" in err.message and err.key is not None and err.key.startswith("tasks.get.config")


def test_templated_config_checks_static_parts(tmp_path: Path) -> None:
    # a template where an int/duration is expected is accepted (checked at run time) ...
    load_flow_text("name: f\ntasks:\n  - {id: a, type: sleep, config: {duration: '${input.d}'}}\n",
                   registry())
    # ... but the static keys next to it are still checked
    err = load_error(tmp_path, """
        name: f
        tasks:
          - id: a
            type: http.request
            config: {url: "http://x/${input.path}", method: FETCH}
    """)
    assert err.key == "tasks.a.config.method" and err.line == 5


def test_template_reference_to_non_ancestor(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
        name: f
        tasks:
          - id: a
            type: set
            config: {values: {x: 1}}
          - id: b
            type: set
            config:
              values:
                y: "${a.x}"
    """)
    assert "not an ancestor of 'b'" in err.message
    assert err.key == "tasks.b.config.values.y" and err.line == 10


def test_template_reference_to_unknown_task(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
        name: f
        tasks:
          - id: a
            type: log
            config: {message: "${ghost.x}"}
    """)
    assert "${ghost.x} names no task" in err.message and err.key == "tasks.a.config.message"


def test_template_syntax(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
        name: f
        tasks:
          - id: a
            type: log
            config: {message: "hello ${input.name"}
    """)
    assert "unclosed" in err.message and err.line == 5


def test_when_syntax_error(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
        name: f
        tasks:
          - id: a
            type: noop
            when: "__import__('os').system('true')"
    """)
    assert "invalid expression" in err.message and "__import__" in err.message
    assert err.key == "tasks.a.when" and err.line == 5


def test_when_reference_must_be_ancestor(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
        name: f
        tasks:
          - {id: a, type: noop}
          - {id: b, type: noop, when: "${a.ok} == true"}
    """)
    assert "not an ancestor" in err.message and err.key == "tasks.b.when" and err.line == 4


def test_invalid_cron(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
        name: f
        triggers:
          - cron: "61 * * * *"
        tasks: [{id: a, type: noop}]
    """)
    assert "invalid cron expression" in err.message
    assert err.key == "triggers[0].cron" and err.line == 3


def test_bad_interval_and_timezone(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
        name: f
        triggers:
          - interval: often
        tasks: [{id: a, type: noop}]
    """)
    assert err.key == "triggers[0].interval" and err.line == 3
    err = load_error(tmp_path, """
        name: f
        triggers:
          - {cron: "* * * * *", timezone: Mars/Olympus}
        tasks: [{id: a, type: noop}]
    """)
    assert "unknown timezone" in err.message and err.line == 3


def test_trigger_needs_exactly_one_kind(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
        name: f
        triggers:
          - {cron: "* * * * *", interval: 1m}
        tasks: [{id: a, type: noop}]
    """)
    assert "exactly one of event, cron, interval" in err.message and err.line == 3


def test_event_trigger_when_only_reads_event(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
        name: f
        triggers:
          - event: {source: crm, when: "${input.x} == 1"}
        tasks: [{id: a, type: noop}]
    """)
    assert "can only read" in err.message and err.key == "triggers[0].event.when"
    err = load_error(tmp_path, """
        name: f
        triggers:
          - event: {source: crm, when: "${event.type} = 1"}
        tasks: [{id: a, type: noop}]
    """)
    assert "invalid expression" in err.message and err.line == 3


def test_condition_branch_targets_must_be_successors(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
        name: f
        tasks:
          - {id: a, type: noop}
          - id: pick
            type: condition
            dependencies: [a]
            config:
              branches:
                "${a.x} == 1": [b]
              default: a
          - {id: b, type: noop, dependencies: [pick]}
    """)
    assert "branch target 'a' is not a task that depends on 'pick'" in err.message
    assert err.key == "tasks.pick.config.default" and err.line == 10


def test_reserved_and_invalid_task_ids(tmp_path: Path) -> None:
    err = load_error(tmp_path, "name: f\ntasks: [{id: event, type: noop}]\n")
    assert "reserved" in err.message
    err = load_error(tmp_path, "name: f\ntasks: [{id: 'has space', type: noop}]\n")
    assert "task id" in err.message


def test_invalid_yaml_has_line(tmp_path: Path) -> None:
    err = load_error(tmp_path, "name: f\ntasks:\n  - id: a\n   type: noop\n")
    assert "invalid YAML" in err.message and err.line is not None


def test_deeply_nested_yaml_is_a_config_error(tmp_path: Path) -> None:
    """A RecursionError out of the YAML parser would be a traceback in `check`."""
    deep = "[" * 3000 + "]" * 3000
    err = load_error(tmp_path, f"name: f\ntasks:\n  - {{id: a, type: noop, config: {deep}}}\n")
    assert "nested too deeply" in err.message


def test_several_problems_are_all_reported(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
        name: f
        tasks:
          - {id: a, type: noop, when: "1 ==", retry: {max_attempts: 0}}
          - {id: b, type: log, config: {message: "${a.x}"}}
    """)
    assert isinstance(err, FlowLoadError)
    messages = [e.message for e in err.errors]
    assert len(messages) == 3, messages
    assert "more problems" in str(err)


def test_load_flows_collects_errors_across_files(tmp_path: Path) -> None:
    write(tmp_path, "name: one\ntasks: [{id: a, type: noop}]\n", "a.yaml")
    write(tmp_path, "name: one\ntasks: [{id: a, type: noop}]\n", "b.yaml")
    write(tmp_path, "name: two\ntasks: [{id: a, type: nope}]\n", "c.yml")
    write(tmp_path, "name: three\ntasks: [{id: a, type: subflow, config: {flow: ghost}}]\n",
          "d.yaml")
    write(tmp_path, "not: [a flow\n", "e.yaml")
    (tmp_path / "ignored.txt").write_text("nothing")
    with pytest.raises(FlowLoadError) as info:
        load_flows(tmp_path, registry())
    errors = info.value.errors
    files = sorted(Path(e.file or "").name for e in errors)
    assert files == ["b.yaml", "c.yml", "d.yaml", "e.yaml"], [str(e) for e in errors]
    assert any("already defined" in e.message for e in errors)
    assert any("subflow 'ghost'" in e.message for e in errors)


def test_subflow_loop_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "name: a\ntasks: [{id: x, type: subflow, config: {flow: b}}]\n", "a.yaml")
    write(tmp_path, "name: b\ntasks: [{id: y, type: subflow, config: {flow: a}}]\n", "b.yaml")
    with pytest.raises(ConfigError, match="subflow loop: a -> b -> a"):
        load_flows(tmp_path, registry())


def test_missing_directory_has_no_flows(tmp_path: Path) -> None:
    assert load_flows(tmp_path / "nope", registry()) == {}
    assert check_flows(str(tmp_path / "nope")) == []


def test_prompt_file_is_read_and_checked(tmp_path: Path) -> None:
    (tmp_path / "prompt.md").write_text("# Hi\nWelcome ${a.name}, from ${flow.name}.\n")
    path = write(tmp_path, """
        name: f
        tasks:
          - {id: a, type: set, config: {values: {name: Ada}}}
          - {id: chat, type: mfo.chat, dependencies: [a], config: {prompt_file: prompt.md}}
    """)
    flow = load_flow(path, registry())
    assert flow.task("chat").config_tree is not None
    (tmp_path / "prompt.md").write_text("Welcome ${ghost.name}\n")
    with pytest.raises(ConfigError, match="ghost"):
        load_flow(path, registry())
    err = load_error(tmp_path, """
        name: f
        tasks:
          - {id: chat, type: mfo.chat, config: {prompt_file: missing.md}}
    """)
    assert "cannot read" in err.message and err.key == "tasks.chat.config.prompt_file"


def test_chat_needs_exactly_one_message_form(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
        name: f
        tasks:
          - {id: chat, type: mfo.chat, config: {message: hi, messages: []}}
    """)
    assert "exactly one of message, messages, prompt_file" in err.message


def test_registry_rules() -> None:
    reg = TaskRegistry()
    reg.register("x", lambda cfg: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="already registered"):
        reg.register("x", lambda cfg: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match=r"msgspec\.Struct"):
        reg.register("y", lambda cfg: None, config=dict)  # type: ignore[arg-type,return-value]
    assert "x" in reg and reg.names() == ["x"]


def test_entry_point_plugins_are_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    import mfo_actors.taskflow._registry as registry_module

    class FakeEP:
        def __init__(self, name: str, fn: object) -> None:
            self.name, self.value, self._fn = name, f"pkg:{name}", fn

        def load(self) -> object:
            return self._fn

    def good(reg: TaskRegistry) -> None:
        reg.register("plugin.hello", lambda cfg: None)  # type: ignore[arg-type,return-value]

    def bad(reg: TaskRegistry) -> None:
        raise ImportError("broken plugin")

    def fake_entry_points(group: str) -> list[FakeEP]:
        assert group == "mfo_actors.tasks"
        return [FakeEP("good", good), FakeEP("bad", bad)]

    monkeypatch.setattr(registry_module, "entry_points", fake_entry_points)
    reg = default_registry()
    assert "plugin.hello" in reg and "mfo.chat" in reg


def test_mermaid_draws_triggers_tasks_and_branches() -> None:
    flow = load_flow_text(textwrap.dedent("""
        name: m
        triggers: [{event: {source: crm, type: user.signup}}]
        tasks:
          - {id: verify, type: noop}
          - id: route
            type: condition
            dependencies: [verify]
            config: {branches: {"${verify.ok} == true": welcome}, default: [reject]}
          - {id: welcome, type: noop, dependencies: [route]}
          - {id: reject, type: noop, dependencies: [route]}
    """), registry())
    text = to_mermaid(flow)
    assert text.startswith("graph TD\n")
    assert 'trigger0(["event: crm/user.signup"])' in text
    assert "trigger0 --> t0" in text
    assert 't1{"route<br/>condition"}' in text
    assert 't1 -->|"${verify.ok} == true"| t2' in text
    assert 't1 -->|"default"| t3' in text
