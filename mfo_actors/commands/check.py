"""``mfo-actors check --config FILE|DIR`` / ``check --flows DIR``: validate offline.

Prints one line per problem (``file:line: key: message``), every problem of every file (not
only the first), and exits 1 if there is any; otherwise prints ``ok: <file>`` per config file
(``ok: <dir>`` for a flows directory) and exits 0. A config's flows (``flows.dir``) are
checked with it; ``--flows DIR`` checks a flows directory alone, without any config.
Warnings (a weak signing secret) are printed as ``warning: file:line: key: message`` lines
before the problems and do not fail the check.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mfo_actors.config import (
    InstanceConfig,
    check_config,
    dump_config,
    flows_dir_problem,
    load_config,
)
from mfo_actors.errors import UserError

__all__ = ["check_paths", "configure"]

CONFIG_SUFFIXES = (".yaml", ".yml")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Validate a config FILE, or every *.yaml/*.yml in DIR (and the flows each one "
        "uses), or a flows directory alone. Prints one line per problem, every problem, "
        "and exits 1 if there is any."
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--config", metavar="FILE|DIR",
                        help="an instance config file, or a directory of them")
    target.add_argument("--flows", metavar="DIR", help="a directory of flow files")
    parser.add_argument("--print", action="store_true", dest="print_config",
                        help="print the effective config of each valid file (defaults and "
                        "MFO_<SECTION>__<KEY> environment overrides applied, secrets masked)")
    parser.add_argument("--graph", action="store_true",
                        help="print each valid instance's actors and message channels as a "
                        "Mermaid flowchart (message types, bounds)")
    parser.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    warnings: list[str] = []
    if args.flows is not None:
        problems = check_flows_dir(Path(args.flows))
        ok = [] if problems else [args.flows]
    else:
        problems, ok = check_paths(Path(args.config), warnings=warnings)
    for line in warnings:
        print(f"warning: {line}")
    for line in problems:
        print(line)
    if problems:
        return 1
    for file in ok:
        if args.print_config or (args.graph and args.flows is None):
            print(f"# {file}")
            if args.print_config:
                print(dump_config(load_config(file)), end="")
            if args.graph:
                from mfo_actors.daemon import graph_text  # the actors: only when asked

                print(graph_text(load_config(file)), end="")
        else:
            print(f"ok: {file}")
    return 0


def _config_files(target: Path) -> list[Path]:
    if target.is_dir():
        files = sorted(p for p in target.iterdir()
                       if p.suffix in CONFIG_SUFFIXES and p.is_file())
        if not files:
            raise UserError(f"{target}: no *.yaml or *.yml config files in this directory")
        return files
    if not target.exists():
        raise UserError(f"{target}: no such file or directory")
    return [target]


def check_flows_dir(flows_dir: Path) -> list[str]:
    """Every problem of the flows in *flows_dir*, one line each.

    Raises:
      UserError: *flows_dir* is not a directory.
    """
    if not flows_dir.is_dir():
        raise UserError(f"{flows_dir}: not a directory of flows")
    from mfo_actors.taskflow import check_flows  # only when there are flows to check

    try:
        found = check_flows(str(flows_dir))
    except UserError as exc:
        found = [str(exc)]
    return [" ".join(p.splitlines()) for p in found]


def check_paths(target: Path, *, warnings: list[str] | None = None
                ) -> tuple[list[str], list[str]]:
    """Validate *target* (a file or a directory of configs) and the flows they use;
    *warnings* receives the configs' warnings (see ``check_config``).

    Returns:
      ``(problems, ok_files)``: one line per problem, and the files with none.

    Raises:
      UserError: *target* does not exist, or is a directory without config files.
    """
    problems: list[str] = []
    ok: list[str] = []
    configs: list[InstanceConfig] = []
    for file in _config_files(target):
        cfg, found = check_config(file, warnings=warnings)
        problems.extend(str(p) for p in found)
        if cfg is not None:
            configs.append(cfg)
        if not found:
            ok.append(str(file))

    # Two instances sharing a state dir would fight over its lock and its store.
    owners: dict[Path, str] = {}
    for cfg in configs:
        state_dir = cfg.effective_state_dir.absolute()
        name = cfg.source_file or "<config>"
        if state_dir in owners:
            problems.append(f"{name}: state_dir: {state_dir} is also used by {owners[state_dir]}")
            if name in ok:
                ok.remove(name)
        else:
            owners[state_dir] = name

    seen: set[Path] = set()
    for cfg in configs:
        flows_dir = Path(cfg.flows.dir)
        missing = flows_dir_problem(cfg)
        if missing and warnings is not None:
            warnings.append(f"{cfg.source_file or '<config>'}: {missing}")
        if not cfg.flows.enabled or flows_dir.absolute() in seen or missing:
            continue
        seen.add(flows_dir.absolute())
        flow_problems = check_flows_dir(flows_dir)
        problems.extend(flow_problems)
        if flow_problems and cfg.source_file in ok:
            ok.remove(cfg.source_file)
    return problems, ok
