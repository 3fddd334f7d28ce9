"""How fast the CLI answers, beside ``python -c pass`` (the floor: the interpreter starting).

Runs each command as a fresh process N times, interleaved (pass, --version, --help, check,
... then again) so a load spike on this shared machine hits all of them alike, and prints the
median, best and p90 wall time of each. The target for ``--version`` and ``--help`` is 1.5x
``python -c pass`` plus 50 ms (issue 9): they must import no command and no daemon code.
``check`` is shown for what it is (it loads the config and the flows with their task types).
``--demo`` also runs ``mfo-actors demo`` once with its defaults and records its wall time and
summary.

    .venv/bin/python benchmarks/cli_startup.py [--runs 20] [--demo]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = str(Path(sys.executable).parent / "mfo-actors")  # the installed console script

COMMANDS: dict[str, list[str]] = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "mfo-actors --version": [SCRIPT, "--version"],
    "mfo-actors --help": [SCRIPT, "--help"],
    "mfo-actors check --config config/example.yaml": [SCRIPT, "check", "--config",
                                                      "config/example.yaml"],
    "mfo-actors check --flows flows": [SCRIPT, "check", "--flows", "flows"],
}


def once(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=True)
    return time.perf_counter() - start


def bench(runs: int) -> dict[str, dict[str, float]]:
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for argv in COMMANDS.values():  # warm the page cache and .pyc files
        once(argv)
    for _ in range(runs):
        for name, argv in COMMANDS.items():
            times[name].append(once(argv))
    out = {}
    for name, values in times.items():
        ordered = sorted(values)
        out[name] = {"median_ms": statistics.median(values) * 1000, "best_ms": ordered[0] * 1000,
                     "p90_ms": ordered[int(0.9 * (len(ordered) - 1))] * 1000}
    return out


def demo() -> dict[str, object]:
    start = time.perf_counter()
    result = subprocess.run([SCRIPT, "demo"], cwd=REPO, capture_output=True, text=True,
                            check=False)
    wall = time.perf_counter() - start
    lines = result.stdout.splitlines()
    summary = lines[next(i for i, ln in enumerate(lines) if ln.startswith("summary")):]
    return {"exit_code": result.returncode, "wall_s": round(wall, 2), "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--demo", action="store_true", help="also time `mfo-actors demo`")
    args = parser.parse_args()
    results = bench(args.runs)
    floor = results["python -c pass"]["median_ms"]
    target = 1.5 * floor + 50
    print(f"{'command':<48} {'median ms':>10} {'best ms':>8} {'p90 ms':>8}  vs pass")
    for name, r in results.items():
        ratio = r["median_ms"] / floor
        mark = ""
        if name in ("mfo-actors --version", "mfo-actors --help"):
            mark = f"  target {target:.0f} ms: {'met' if r['median_ms'] <= target else 'MISSED'}"
        print(f"{name:<48} {r['median_ms']:>10.1f} {r['best_ms']:>8.1f} {r['p90_ms']:>8.1f}"
              f"  {ratio:5.1f}x{mark}")
    record: dict[str, object] = {
        "runs": args.runs, "python": platform.python_version(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "target_ms": target, "commands": results,
    }
    if args.demo:
        record["demo"] = demo()
        print(f"\nmfo-actors demo: exit {record['demo']['exit_code']}, "  # type: ignore[index]
              f"{record['demo']['wall_s']} s wall")  # type: ignore[index]
        print("\n".join(record["demo"]["summary"]))  # type: ignore[index]
    out = REPO / "benchmarks" / "results" / "cli_startup.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
