"""The command line: --version, check, and the one-line user-error contract."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from mfo_actors import __version__, cli
from mfo_actors.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config" / "example.yaml"


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """``python -m mfo_actors ARGS`` as a real process."""
    return subprocess.run(
        [sys.executable, "-m", "mfo_actors", *args],
        capture_output=True, text=True, cwd=cwd, timeout=60, check=False,
    )


class TestVersion:
    def test_version(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert cli.main(["--version"]) == 0
        assert capsys.readouterr().out.strip() == f"mfo-actors {__version__}"

    def test_version_as_a_process(self) -> None:
        result = run_cli("--version")
        assert result.returncode == 0
        assert result.stdout.strip() == f"mfo-actors {__version__}"


class TestCheck:
    def test_example_config_is_ok(self) -> None:
        result = run_cli("check", "--config", "config/example.yaml")
        assert result.returncode == 0, result.stderr + result.stdout
        assert result.stdout.strip().splitlines() == ["ok: config/example.yaml"]

    def test_broken_copy_is_one_line_exit_1(self, tmp_path: Path) -> None:
        broken = tmp_path / "example.yaml"
        shutil.copytree(EXAMPLE.parent / "credentials", tmp_path / "credentials")  # its secret
        text = EXAMPLE.read_text().replace("  concurrency: 8 ", "  concurency: 8 ")
        assert text != EXAMPLE.read_text()
        broken.write_text(text)
        line = next(i for i, t in enumerate(text.splitlines(), 1) if "concurency" in t)
        result = run_cli("check", "--config", str(broken))
        assert result.returncode == 1
        assert result.stdout.splitlines() == [
            f"{broken}:{line}: forwarder.concurency: unknown key"
        ]
        assert "Traceback" not in result.stderr

    def test_directory_reports_every_bad_file(self, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
        shutil.copy(EXAMPLE, tmp_path / "a.yaml")
        shutil.copytree(EXAMPLE.parent / "credentials", tmp_path / "credentials")  # its secret
        (tmp_path / "b.yml").write_text("instance: b\nstate_dir: /tmp/b\nbogus: 1\n")
        (tmp_path / "c.yaml").write_text("instance: c\nclient: {timeout: soon}\n")
        (tmp_path / "notes.txt").write_text("not a config")
        assert cli.main(["check", "--config", str(tmp_path)]) == 1
        out = capsys.readouterr().out.splitlines()
        assert out == [
            f"{tmp_path / 'b.yml'}:3: bogus: unknown key",
            f"{tmp_path / 'c.yaml'}:2: client.timeout: "
            "invalid duration 'soon' (use e.g. 500ms, 30s, 1m, 1h)",
        ]

    def test_directory_all_ok(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        (tmp_path / "a.yaml").write_text("state_dir: /tmp/mfo-a\n")
        (tmp_path / "b.yaml").write_text("state_dir: /tmp/mfo-b\n")
        assert cli.main(["check", "--config", str(tmp_path)]) == 0
        assert capsys.readouterr().out.splitlines() == [
            f"ok: {tmp_path / 'a.yaml'}", f"ok: {tmp_path / 'b.yaml'}"
        ]

    def test_two_instances_on_one_state_dir(self, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
        (tmp_path / "a.yaml").write_text("state_dir: /tmp/mfo-same\n")
        (tmp_path / "b.yaml").write_text("state_dir: /tmp/mfo-same\n")
        assert cli.main(["check", "--config", str(tmp_path)]) == 1
        [line] = capsys.readouterr().out.splitlines()
        assert line.startswith(f"{tmp_path / 'b.yaml'}: state_dir: ")

    def test_flow_problems_are_reported(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """When the taskflow package offers check_flows, its problems count."""
        import mfo_actors.taskflow as taskflow

        seen: list[str] = []

        def check_flows(flows_dir: str) -> list[str]:
            seen.append(flows_dir)
            return [f"{flows_dir}/x.yaml:3: tasks[0].type: unknown task type"]

        monkeypatch.setattr(taskflow, "check_flows", check_flows, raising=False)
        flows = tmp_path / "some-flows"
        flows.mkdir()
        (tmp_path / "a.yaml").write_text(f"flows: {{dir: {flows}}}\n")
        assert cli.main(["check", "--config", str(tmp_path / "a.yaml")]) == 1
        assert seen == [str(flows)]
        assert capsys.readouterr().out.splitlines() == [
            f"{flows}/x.yaml:3: tasks[0].type: unknown task type"
        ]

    def test_a_missing_flows_dir_is_a_warning(self, tmp_path: Path) -> None:
        """A typo in flows.dir reads as "no flows": check says so, without failing."""
        config = tmp_path / "inst.yaml"
        config.write_text(f"flows: {{dir: {tmp_path}/flwos}}\n")
        result = run_cli("check", "--config", str(config))
        assert result.returncode == 0, result.stdout
        assert result.stdout.splitlines() == [
            f"warning: {config}: flows.dir: {tmp_path}/flwos does not exist, so no flows are "
            "loaded (create it, or set flows.enabled: false)",
            f"ok: {config}"]

    def test_three_errors_three_lines(self, tmp_path: Path) -> None:
        """A config file with three distinct errors gets three lines from ``check``."""
        bad = tmp_path / "bad.yaml"
        bad.write_text("client: {timeout: soon}\nforwarder: {concurency: 8}\n"
                       "webhook_listener: {port: 70000}\n")
        result = run_cli("check", "--config", str(bad))
        assert result.returncode == 1, result.stderr
        assert result.stdout.splitlines() == [
            f"{bad}:1: client.timeout: invalid duration 'soon' (use e.g. 500ms, 30s, 1m, 1h)",
            f"{bad}:2: forwarder.concurency: unknown key",
            f"{bad}:3: webhook_listener.port: invalid port 70000 (use 8080 or \":8080\")",
        ]

    def test_flows_dir_alone(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert cli.main(["check", "--flows", str(REPO / "flows")]) == 0
        assert capsys.readouterr().out.splitlines() == [f"ok: {REPO / 'flows'}"]
        (tmp_path / "a.yaml").write_text("name: A\ntasks:\n  - {id: x, type: nope}\n")
        (tmp_path / "b.yaml").write_text("name: B\ntasks: [{id: y, type: log, bogus: 1}]\n")
        assert cli.main(["check", "--flows", str(tmp_path)]) == 1
        out = capsys.readouterr().out.splitlines()
        assert len(out) == 2 and out[0].startswith(f"{tmp_path / 'a.yaml'}:3: ")
        assert out[1].startswith(f"{tmp_path / 'b.yaml'}:2: "), out

    def test_flows_and_config_are_exclusive(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert cli.main(["check", "--flows", "a", "--config", "b"]) == 2
        assert "not allowed with" in capsys.readouterr().err

    def test_flows_not_a_directory(self, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
        assert cli.main(["check", "--flows", str(tmp_path / "nope")]) == 1
        assert capsys.readouterr().err == (
            f"mfo-actors: {tmp_path / 'nope'}: not a directory of flows\n")

    def test_missing_path(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert cli.main(["check", "--config", str(tmp_path / "nope.yaml")]) == 1
        err = capsys.readouterr().err
        assert err == f"mfo-actors: {tmp_path / 'nope.yaml'}: no such file or directory\n"


class TestUserErrors:
    def test_user_error_has_no_traceback(self, tmp_path: Path) -> None:
        result = run_cli("run", "--config", str(tmp_path / "missing.yaml"))
        assert result.returncode == 78  # run: EX_CONFIG, which systemd does not retry
        assert result.stderr.count("\n") == 1
        assert result.stderr.startswith(f"mfo-actors: {tmp_path / 'missing.yaml'}: ")
        assert "Traceback" not in result.stderr

    def test_usage_error_exits_2(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert cli.main(["check"]) == 2
        assert "--config" in capsys.readouterr().err

    def test_no_command_prints_help(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert cli.main([]) == 2
        assert "run" in capsys.readouterr().err

    def _with_command(self, monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
        """A ``boom`` command whose module raises *error* when it runs."""

        def boom(_args: argparse.Namespace) -> int:
            raise error

        module = types.ModuleType("tests._boom_command")
        module.configure = lambda parser: parser.set_defaults(func=boom)  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, module.__name__, module)
        monkeypatch.setitem(cli.COMMANDS, "boom", cli.Command(module.__name__, "fails"))

    def test_multiline_user_error_is_one_line(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        self._with_command(monkeypatch, UserError("first\nsecond"))
        assert cli.main(["boom"]) == 1
        assert capsys.readouterr().err == "mfo-actors: first second\n"

    def test_user_error_inside_a_task_group(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        err = ConfigError("bad", file="f.yaml", key="k", line=2)
        self._with_command(monkeypatch, ExceptionGroup("tg", [err]))
        assert cli.main(["boom"]) == 1
        assert capsys.readouterr().err == "mfo-actors: f.yaml:2: k: bad\n"

    def test_keyboard_interrupt_exits_130(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        self._with_command(monkeypatch, KeyboardInterrupt())
        assert cli.main(["boom"]) == 130

    def test_bugs_still_raise(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Only user errors are shortened; a bug keeps its traceback."""
        self._with_command(monkeypatch, ZeroDivisionError("bug"))
        with pytest.raises(ZeroDivisionError):
            cli.main(["boom"])

    def test_every_command_module_configures_its_parser(self) -> None:
        """No command is silently missing: each listed module exists and has ``configure``."""
        parser = cli.build_parser(commands=list(cli.COMMANDS))
        for name in cli.COMMANDS:
            assert name in parser.format_help()
            with pytest.raises(SystemExit):
                parser.parse_args([name, "--help"])


class TestFastStart:
    def test_version_and_help_import_no_command_or_daemon_code(self) -> None:
        """``--version`` and ``--help`` answer without importing any command module."""
        probe = (
            "import sys\n"
            "from mfo_actors import cli\n"
            "for argv in (['--version'], ['--help'], ['bogus']):\n"
            "    try:\n"
            "        cli.main(argv)\n"
            "    except SystemExit:\n"
            "        pass\n"
            "loaded = sorted(m for m in sys.modules if m.startswith(('mfo_actors.', 'anyio',\n"
            "                'httpx', 'structlog', 'msgspec', 'yaml', 'trio')))\n"
            "print(loaded, file=sys.stderr)\n"
            "assert loaded == ['mfo_actors.cli', 'mfo_actors.errors'], loaded\n"
        )
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                timeout=60, check=False)
        assert result.returncode == 0, result.stderr

    def test_a_command_imports_only_its_own_module(self) -> None:
        probe = (
            "import sys\n"
            "from mfo_actors import cli\n"
            "cli.main(['check', '--config', 'config/example.yaml'])\n"
            "assert not any(m.startswith(('mfo_actors.commands.run', 'mfo_actors.daemon',\n"
            "               'mfo_actors.actors', 'httpx', 'mfo_actors.mock_server'))\n"
            "               for m in sys.modules), sorted(sys.modules)\n"
        )
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                timeout=60, check=False, cwd=REPO)
        assert result.returncode == 0, result.stderr


class TestDocs:
    def test_readme_first_command_runs_the_demo_and_ci_runs_the_test_line(self) -> None:
        """The README opens with the demo one-liner; its test one-liner is what CI runs."""
        readme = (REPO / "README.md").read_text()
        blocks = [b.split("```")[0].strip() for b in readme.split("```sh\n")[1:]]
        assert blocks[0] == ("python3 -m venv .venv && .venv/bin/pip install -q . && "
                             ".venv/bin/mfo-actors demo")
        [tests] = [b for b in blocks if "pytest" in b and b.startswith("python3 -m venv .venv")]
        assert "\n" not in tests
        assert tests in (REPO / ".ci" / "run").read_text()
        # Any other pytest line is the fast set: CI's own pytest command, slow tests left out,
        # in four worker processes (pytest-xdist, one of the test extras).
        ci_pytest = tests.split(" && ")[-1]
        others = [b for b in blocks if "pytest" in b and b != tests]
        assert others == [f'{ci_pytest} -m "not slow" -n 4']
