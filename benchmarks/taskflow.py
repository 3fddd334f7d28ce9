"""Taskflow scheduling overhead: microseconds per no-op task, beside peers in the same run.

Measures :class:`mfo_actors.taskflow.FlowExecutor` running DAGs of N no-op tasks (N = 1,000
and 10,000) in three shapes, on asyncio and trio:

- ``chain``: t0 -> t1 -> ... (no parallelism at all);
- ``fan``: one source, N-2 independent tasks, one sink depending on all of them;
- ``layered``: random layers of 50 tasks, each task depending on ~3 tasks of the layer
  before (seeded, so every run measures the same graph).

Peers, on the same graphs and machine, in the same run:

- ``floor``: a hand-written runner, ``graphlib.TopologicalSorter`` + ``asyncio.create_task``
  per node (what the issue calls the floor);
- ``dask.get``: Dask's synchronous local scheduler (``pip install dask``, the ``bench`` extra);
- ``dagster``: ``execute_in_process`` of a job of N=200 ops (milliseconds per op). Run in a
  subprocess of an interpreter that has dagster: this one, or ``--peer-python PATH`` /
  ``$TASKFLOW_BENCH_PEER_PYTHON`` (a separate venv keeps dagster's dependencies out of
  ours); skipped with a note otherwise.

Every task is a no-op coroutine that returns at once. The ``-y`` columns repeat the run with
tasks that yield to the event loop once (``asyncio.sleep(0)`` / ``anyio.lowlevel.checkpoint()``),
as any task doing I/O does: then the engine cannot run tasks back to back on one worker and
pays for a real switch per task.

The figure is the best of ``--repeat`` runs of (wall time of one run) / N; graph building
and flow loading are not timed. Prints a table and writes ``benchmarks/results/taskflow.json``.

    .venv/bin/python benchmarks/taskflow.py [--sizes 1000 10000] [--repeat 5] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import graphlib
import json
import os
import platform
import random
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

from mfo_actors.observability import configure_logging
from mfo_actors.taskflow import EmptyConfig, FlowExecutor, TaskRegistry, load_flow_data

Graph = dict[str, list[str]]  # task -> its dependencies, in topological order
LAYER_WIDTH = 50
DEPS_PER_TASK = 3
CONCURRENCY = 8  # the engine's workers per run (flows default to 4)
RESULTS = Path(__file__).parent / "results" / "taskflow.json"


def chain(n: int) -> Graph:
    return {f"t{i}": [f"t{i - 1}"] if i else [] for i in range(n)}


def fan(n: int) -> Graph:
    graph: Graph = {"src": []}
    middle = [f"t{i}" for i in range(n - 2)]
    for name in middle:
        graph[name] = ["src"]
    graph["sink"] = middle
    return graph


def layered(n: int, *, seed: int = 42) -> Graph:
    rng = random.Random(seed)
    graph: Graph = {}
    previous: list[str] = []
    current: list[str] = []
    for i in range(n):
        name = f"t{i}"
        graph[name] = rng.sample(previous, min(DEPS_PER_TASK, len(previous))) if previous else []
        current.append(name)
        if len(current) == LAYER_WIDTH:
            previous, current = current, []
    return graph


SHAPES: dict[str, Callable[[int], Graph]] = {"chain": chain, "fan": fan, "layered": layered}


# -- mfo-actors -----------------------------------------------------------------------------

def engine_flow(name: str, graph: Graph, *, yielding: bool = False) -> Any:
    registry = TaskRegistry()

    @registry.factory("noop")
    def _factory(cfg: EmptyConfig) -> Any:
        async def noop(ctx: Any) -> None:
            return None

        async def yield_once(ctx: Any) -> None:
            await anyio.lowlevel.checkpoint()

        return yield_once if yielding else noop

    data = {
        "name": name, "concurrency": CONCURRENCY,
        "tasks": [{"id": t, "type": "noop", "dependencies": deps} for t, deps in graph.items()],
    }  # fmt: skip
    return load_flow_data(data, registry)


def bench_engine(graph: Graph, backend: str, repeat: int, *, yielding: bool = False) -> float:
    flow = engine_flow("bench", graph, yielding=yielding)
    executor = FlowExecutor({"bench": flow})

    async def main() -> float:
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            outcome = await executor.run(flow)
            elapsed = time.perf_counter() - start
            assert outcome.status == "done", outcome.error
            best = min(best, elapsed)
        return best

    return anyio.run(main, backend=backend) / len(graph)


# -- floor: graphlib + asyncio.create_task ----------------------------------------------------

async def _noop() -> None:
    return None


async def _yield_once() -> None:
    await asyncio.sleep(0)


async def floor_run(graph: Graph, *, yielding: bool = False) -> None:
    sorter = graphlib.TopologicalSorter(graph)
    sorter.prepare()
    running: dict[asyncio.Task[None], str] = {}
    work = _yield_once if yielding else _noop
    while sorter.is_active():
        for node in sorter.get_ready():
            running[asyncio.create_task(work())] = node
        done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            sorter.done(running.pop(task))


def bench_floor(graph: Graph, repeat: int, *, yielding: bool = False) -> float:
    async def main() -> float:
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            await floor_run(graph, yielding=yielding)
            best = min(best, time.perf_counter() - start)
        return best

    return asyncio.run(main()) / len(graph)


# -- dask.get -------------------------------------------------------------------------------

def _sync_noop(*args: Any) -> None:
    return None


def bench_dask(graph: Graph, repeat: int) -> float | None:
    try:
        from dask import get as dask_get  # type: ignore[attr-defined]
    except ImportError:
        return None
    dsk = {t: (_sync_noop, *deps) for t, deps in graph.items()}
    has_succ = {d for deps in graph.values() for d in deps}
    leaves = [t for t in graph if t not in has_succ]
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        dask_get(dsk, leaves)
        best = min(best, time.perf_counter() - start)
    return best / len(graph)


# -- dagster (in a subprocess) --------------------------------------------------------------

_DAGSTER_SCRIPT = textwrap.dedent("""
    import json, sys, time, logging, warnings
    warnings.filterwarnings("ignore")
    logging.disable(logging.CRITICAL)
    from dagster import DagsterInstance, In, Nothing, job, op
    graphs = json.load(sys.stdin)
    out = {}
    for shape, graph in graphs.items():
        ops = {}
        for name, deps in graph.items():
            ins = {f"d{i}": In(Nothing) for i in range(len(deps))}
            ops[name] = op(name=name, ins=ins)(lambda context: None)
        def body():
            handles = {}
            for name, deps in graph.items():
                handles[name] = ops[name](**{f"d{i}": handles[d] for i, d in enumerate(deps)})
        bench_job = job(name="bench_" + shape)(body)
        instance = DagsterInstance.ephemeral()
        best = float("inf")
        for _ in range(2):
            start = time.perf_counter()
            result = bench_job.execute_in_process(instance=instance, raise_on_error=True)
            best = min(best, time.perf_counter() - start)
            assert result.success
        out[shape] = best / len(graph)
    print(json.dumps(out))
""")


def find_peer_python(explicit: str | None) -> str | None:
    candidates = [explicit, os.environ.get("TASKFLOW_BENCH_PEER_PYTHON"), sys.executable]
    for python in candidates:
        if not python or not Path(python).exists():
            continue
        probe = subprocess.run([python, "-c", "import dagster"], capture_output=True)
        if probe.returncode == 0:
            return python
    return None


def bench_dagster(n: int, python: str | None) -> tuple[dict[str, float] | None, str]:
    if python is None:
        return None, ("dagster not installed: pip install dagster in a separate venv and pass "
                      "--peer-python; skipped")
    graphs = {shape: make(n) for shape, make in SHAPES.items()}
    proc = subprocess.run([python, "-c", _DAGSTER_SCRIPT], input=json.dumps(graphs),
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return None, f"dagster run failed: {proc.stderr.strip().splitlines()[-1:]}"
    version = subprocess.run([python, "-c", "import dagster; print(dagster.__version__)"],
                             capture_output=True, text=True).stdout.strip()
    return json.loads(proc.stdout.strip().splitlines()[-1]), f"dagster {version}"


# -- main -----------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--peer-n", type=int, default=200, help="N for dagster")
    parser.add_argument("--peer-python", default=None, help="an interpreter that has dagster")
    parser.add_argument("--no-dagster", action="store_true")
    parser.add_argument("--quick", action="store_true", help="sizes 1000, repeat 2")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.repeat = [1000], 2
    configure_logging(level="error")

    rows: list[dict[str, Any]] = []
    header = (f"{'shape':<8} {'N':>6} {'floor':>8} {'asyncio':>8} {'trio':>8} {'dask.get':>9}"
              f" {'asyncio/floor':>14} {'trio/dask':>10}"
              f" | {'floor-y':>8} {'async-y':>8} {'trio-y':>8}")
    print(f"µs per task (best of {args.repeat})")
    print(header)
    for n in args.sizes:
        for shape, make in SHAPES.items():
            graph = make(n)
            repeat = args.repeat if n <= 1000 else max(2, args.repeat // 2)
            row = {
                "shape": shape, "n": n,
                "floor_us": bench_floor(graph, repeat) * 1e6,
                "engine_asyncio_us": bench_engine(graph, "asyncio", repeat) * 1e6,
                "engine_trio_us": bench_engine(graph, "trio", repeat) * 1e6,
            }  # fmt: skip
            row["floor_yield_us"] = bench_floor(graph, repeat, yielding=True) * 1e6
            row["engine_asyncio_yield_us"] = bench_engine(graph, "asyncio", repeat,
                                                          yielding=True) * 1e6
            row["engine_trio_yield_us"] = bench_engine(graph, "trio", repeat,
                                                       yielding=True) * 1e6
            dask_s = bench_dask(graph, repeat)
            row["dask_get_us"] = dask_s * 1e6 if dask_s is not None else None
            rows.append(row)
            dask_text = f"{row['dask_get_us']:9.2f}" if dask_s is not None else f"{'n/a':>9}"
            trio_dask = (f"{row['engine_trio_us'] / row['dask_get_us']:10.2f}"
                         if dask_s is not None else f"{'n/a':>10}")
            print(f"{shape:<8} {n:>6} {row['floor_us']:8.2f} {row['engine_asyncio_us']:8.2f}"
                  f" {row['engine_trio_us']:8.2f} {dask_text}"
                  f" {row['engine_asyncio_us'] / row['floor_us']:14.2f} {trio_dask}"
                  f" | {row['floor_yield_us']:8.2f} {row['engine_asyncio_yield_us']:8.2f}"
                  f" {row['engine_trio_yield_us']:8.2f}")

    dagster: dict[str, Any] = {"n": args.peer_n}
    if args.no_dagster:
        dagster["note"] = "skipped (--no-dagster)"
    else:
        figures, note = bench_dagster(args.peer_n, find_peer_python(args.peer_python))
        dagster["note"] = note
        if figures:
            dagster["us_per_task"] = {k: v * 1e6 for k, v in figures.items()}
            engine_small = {
                shape: bench_engine(make(args.peer_n), "asyncio", args.repeat) * 1e6
                for shape, make in SHAPES.items()
            }
            dagster["engine_asyncio_us"] = engine_small
            print(f"\nN={args.peer_n}: {note}, µs per task")
            for shape in SHAPES:
                print(f"  {shape:<8} dagster {figures[shape] * 1e6:10.1f}"
                      f"   mfo-actors asyncio {engine_small[shape]:6.2f}")
    if "us_per_task" not in dagster:
        print(f"\ndagster: {dagster['note']}")

    try:
        import dask
        dask_version: str | None = str(dask.__version__)  # type: ignore[attr-defined]
    except ImportError:
        dask_version = None
    result = {
        "benchmark": "taskflow scheduling overhead, µs per no-op task (best of repeats)",
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": os.cpu_count()},
        "engine_concurrency": CONCURRENCY,
        "dask_version": dask_version,
        "rows": rows,
        "dagster": dagster,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
