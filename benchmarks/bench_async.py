"""Durable asynchronous invocation of a no-op handler vs synchronous invoke, in one run.

Contenders, each on a fresh runtime and state dir, on flowrun's spin loop (what
``flowrun run`` uses), with the same no-op function and concurrency:

* ``sync invoke`` — ``runtime.invoke`` from ``concurrency`` loops (the baseline);
* ``async, synchronous=FULL`` — ``runtime.invoke(mode="event")`` from many concurrent
  callers: each call returns once its invocation is committed and fsynced (group commit);
  then the queue runs them all. Reported: acknowledged enqueues/s, and invocations/s from
  the first enqueue to the last invocation finished (enqueue + run);
* ``async, synchronous=NORMAL`` — the same without an fsync per commit (a power cut may
  lose the last commits; never corrupts);
* ``enqueue only`` — ``run_queue=False``: durable acceptance alone, FULL and NORMAL.

    python3 benchmarks/bench_async.py [--calls 20000] [--rounds 3] [--concurrency 2] [--no-limits]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flowrun import config as config_module  # noqa: E402
from flowrun import queue  # noqa: E402
from flowrun.runtime import Runtime  # noqa: E402
from sandbox.isolation import Limiter, NoIsolation  # noqa: E402

HANDLER = "def handler(event, context):\n    return None\n"
CALLERS = 1000  # concurrent enqueuers, like many triggers or API clients at once
LIMITER: Limiter | None = None  # None: the host's default limits; --no-limits: rlimits only


@dataclass(frozen=True)
class Figures:
    name: str
    enqueue_per_s: float | None
    invocations_per_s: float | None
    commits: int | None = None


def write_config(folder: Path, tag: str, concurrency: int) -> Path:
    (folder / "fn.py").write_text(HANDLER)
    path = folder / f"{tag}.yaml"
    path.write_text(textwrap.dedent(f"""
        state_dir: state-{tag}-{time.monotonic_ns()}
        functions:
          noop: {{handler: fn.handler, code: ., concurrency: {concurrency}, cpus: 1,
                  async_queue_size: 10000000, retries: 0}}
    """))
    return path


async def warm(runtime: Runtime, concurrency: int) -> None:
    for _ in range(100):
        await asyncio.gather(*(runtime.invoke("noop") for _ in range(concurrency)))


async def bench_sync(path: Path, calls: int, concurrency: int) -> Figures:
    async with Runtime(config_module.load(path), limiter=LIMITER) as runtime:
        await warm(runtime, concurrency)

        async def loop(n: int) -> None:
            for _ in range(n):
                await runtime.invoke("noop")

        started = time.perf_counter()
        await asyncio.gather(*(loop(calls // concurrency) for _ in range(concurrency)))
        wall_s = time.perf_counter() - started
    return Figures("sync invoke", None, calls // concurrency * concurrency / wall_s)


async def enqueue_all(runtime: Runtime, calls: int) -> None:
    async def caller(n: int) -> None:
        for _ in range(n):
            await runtime.invoke("noop", None, mode="event")

    await asyncio.gather(*(caller(calls // CALLERS) for _ in range(CALLERS)))


async def bench_async(path: Path, calls: int, concurrency: int, synchronous: str,
                      run: bool) -> Figures:
    queue.DEFAULT_SYNCHRONOUS = synchronous  # type: ignore[assignment]
    try:
        async with Runtime(config_module.load(path), run_queue=run, limiter=LIMITER) as runtime:
            await warm(runtime, concurrency)
            assert runtime.async_queue is not None
            commits_before = runtime.async_queue.journal.commits
            total = calls // CALLERS * CALLERS
            started = time.perf_counter()
            await enqueue_all(runtime, calls)
            enqueued_s = time.perf_counter() - started
            commits = runtime.async_queue.journal.commits - commits_before
            invocations_per_s = None
            if run:
                done = runtime.async_queue
                while done.succeeded + done.failed < total:
                    await asyncio.sleep(0.001)
                invocations_per_s = total / (time.perf_counter() - started)
                if done.failed:
                    print(f"warning: {done.failed} invocations failed (see the dead letters)",
                          file=sys.stderr)
    finally:
        queue.DEFAULT_SYNCHRONOUS = "FULL"
    name = f"{'async' if run else 'enqueue only'}, synchronous={synchronous}"
    return Figures(name, total / enqueued_s, invocations_per_s, commits)


def run_on_spin_loop(make: Callable[[], object]) -> Figures:
    loop = asyncio.new_event_loop()
    try:
        result: Figures = loop.run_until_complete(make())  # type: ignore[arg-type]
        return result
    finally:
        loop.close()


def fmt(value: float | None) -> str:
    return f"{value:,.0f}" if value is not None else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3, help="repeat, report medians")
    parser.add_argument("--concurrency", type=int, default=2, help="workers of the function")
    parser.add_argument("--no-limits", action="store_true",
                        help="workers without cgroups/namespaces (the queue's cost alone)")
    args = parser.parse_args()
    global LIMITER
    LIMITER = NoIsolation() if args.no_limits else None
    runs: dict[str, list[Figures]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for _ in range(args.rounds):
            contenders: list[Callable[[], object]] = [
                partial(bench_sync, write_config(folder, "sync", args.concurrency), args.calls,
                        args.concurrency),
            ]
            for synchronous in ("FULL", "NORMAL"):
                for run in (True, False):
                    path = write_config(folder, f"async-{synchronous}-{run}", args.concurrency)
                    contenders.append(partial(bench_async, path, args.calls, args.concurrency,
                                              synchronous, run))
            for make in contenders:
                fig = run_on_spin_loop(make)
                runs.setdefault(fig.name, []).append(fig)
    print(f"no-op handler, {args.calls} invocations, concurrency {args.concurrency}, "
          f"{CALLERS} concurrent enqueuers, median of {args.rounds} rounds, "
          f"{'no limits' if args.no_limits else 'default limits'}")
    print(f"{'contender':<30}{'acked enqueues/s':>18}{'invocations/s':>16}{'commits':>9}")
    medians: dict[str, Figures] = {}
    for name, figs in runs.items():
        enq = [f.enqueue_per_s for f in figs if f.enqueue_per_s is not None]
        inv = [f.invocations_per_s for f in figs if f.invocations_per_s is not None]
        com = [f.commits for f in figs if f.commits is not None]
        med = Figures(name, statistics.median(enq) if enq else None,
                      statistics.median(inv) if inv else None,
                      int(statistics.median(com)) if com else None)
        medians[name] = med
        print(f"{name:<30}{fmt(med.enqueue_per_s):>18}{fmt(med.invocations_per_s):>16}"
              f"{med.commits if med.commits is not None else '-':>9}")
    base = medians["sync invoke"].invocations_per_s or 1.0
    for synchronous in ("FULL", "NORMAL"):
        fig = medians[f"async, synchronous={synchronous}"]
        print(f"async ({synchronous}) enqueue+run: {(fig.invocations_per_s or 0) / base:.2f}x "
              f"the throughput of synchronous invoke; durable acks at "
              f"{(fig.enqueue_per_s or 0) / base:.2f}x its rate")


if __name__ == "__main__":
    main()
