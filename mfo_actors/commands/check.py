"""``mfo-actors check --config FILE|DIR``: validate instance configs (and their flows) offline.

Prints one line per problem (``file:line: key: message``) and exits 1 if there is any;
otherwise prints ``ok: <file>`` per file and exits 0. Flow validation is delegated to
``mfo_actors.taskflow.check_flows(flows_dir) -> list[str]`` when the taskflow package has it.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from pathlib import Path

from mfo_actors.config import InstanceConfig, dump_config, load_config
from mfo_actors.errors import ConfigError, UserError

__all__ = ["check_paths", "register"]

CONFIG_SUFFIXES = (".yaml", ".yml")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "check",
        help="validate instance config files (and their flows) without starting anything",
        description="Validate a config FILE, or every *.yaml/*.yml in DIR. "
        "Prints one line per problem and exits 1 if there is any.",
    )
    parser.add_argument("--config", required=True, metavar="FILE|DIR",
                        help="an instance config file, or a directory of them")
    parser.add_argument("--print", action="store_true", dest="print_config",
                        help="print the effective config of each valid file (defaults and "
                        "MFO_<SECTION>__<KEY> environment overrides applied, secrets masked)")
    parser.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    problems, ok = check_paths(Path(args.config))
    for line in problems:
        print(line)
    if problems:
        return 1
    for file in ok:
        if args.print_config:
            print(f"# {file}")
            print(dump_config(load_config(file)), end="")
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


def _flow_checker() -> Callable[[str], list[str]] | None:
    """The taskflow package's ``check_flows``, if it has one yet."""
    try:
        taskflow = importlib.import_module("mfo_actors.taskflow")
    except ImportError:
        return None
    checker = getattr(taskflow, "check_flows", None)
    return checker if callable(checker) else None


def check_paths(target: Path) -> tuple[list[str], list[str]]:
    """Validate *target* (a file or a directory of configs).

    Returns:
      ``(problems, ok_files)``: one line per problem, and the files with none.

    Raises:
      UserError: *target* does not exist, or is a directory without config files.
    """
    problems: list[str] = []
    ok: list[str] = []
    configs: list[InstanceConfig] = []
    for file in _config_files(target):
        try:
            cfg = load_config(file)
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        configs.append(cfg)
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

    checker = _flow_checker()
    if checker is not None:
        seen: set[Path] = set()
        for cfg in configs:
            flows_dir = Path(cfg.flows.dir)
            if not cfg.flows.enabled or flows_dir.absolute() in seen:
                continue
            seen.add(flows_dir.absolute())
            try:
                found = checker(str(flows_dir))
            except UserError as exc:
                found = [str(exc)]
            flow_problems = [" ".join(p.splitlines()) for p in found]
            problems.extend(flow_problems)
            if flow_problems and cfg.source_file in ok:
                ok.remove(cfg.source_file)
    return problems, ok

