"""Warm invocation of a no-op handler: flowrun's ``runtime.invoke`` vs ProcessPoolExecutor.

Both do the same round trip — hand a call to a warm worker process, get its result back —
driven from the same asyncio harness, with 1 and with 2 workers, in one run, once on
asyncio's own event loop and once on uvloop (what ``flowrun run`` uses when installed);
ProcessPoolExecutor runs on asyncio's loop, where it measured fastest (its round trip goes
through threads and ``call_soon_threadsafe``, which cost more on uvloop). Prints p50/p99 latency (µs),
throughput (calls/s) and the ratios, medians over the rounds. The function has
``cpus: 1`` and the host's default limits.

    python3 benchmarks/bench_invoke.py [--calls 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flowrun import config as config_module  # noqa: E402
from flowrun.runtime import Runtime  # noqa: E402

HANDLER = "def handler(event, context):\n    return None\n"
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
try:
    import uvloop

    LOOPS["uvloop"] = uvloop.new_event_loop
except ImportError:  # not on this platform: asyncio's loop only
    pass


def noop() -> None:
    return None


@dataclass(frozen=True)
class Figures:
    name: str
    workers: int
    p50_us: float
    p99_us: float
    calls_per_s: float


async def measure(call: Callable[[], Awaitable[object]], calls: int,
                  workers: int) -> tuple[list[float], float]:
    """Run ``calls`` calls from ``workers`` concurrent loops; latencies (s) and wall time (s)."""
    for _ in range(200):  # warm up every worker
        await asyncio.gather(*(call() for _ in range(workers)))
    latencies: list[float] = []

    async def loop(n: int) -> None:
        for _ in range(n):
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(loop(calls // workers) for _ in range(workers)))
    return latencies, time.perf_counter() - started


def figures(name: str, workers: int, latencies: list[float], wall_s: float) -> Figures:
    latencies.sort()
    return Figures(name, workers, latencies[len(latencies) // 2] * 1e6,
                   latencies[int(len(latencies) * 0.99)] * 1e6, len(latencies) / wall_s)


async def bench_flowrun(folder: Path, workers: int, calls: int, name: str) -> Figures:
    (folder / "fn.py").write_text(HANDLER)
    config_path = folder / "flowrun.yaml"
    config_path.write_text(textwrap.dedent(f"""
        state_dir: state-{name}-{workers}
        functions:
          noop: {{handler: fn.handler, code: ., concurrency: {workers}, cpus: 1}}
    """))
    async with Runtime(config_module.load(config_path)) as runtime:
        latencies, wall_s = await measure(lambda: runtime.invoke("noop"), calls, workers)
    return figures(name, workers, latencies, wall_s)


async def bench_pool_executor(workers: int, calls: int) -> Figures:
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(max_workers=workers) as executor:
        latencies, wall_s = await measure(lambda: loop.run_in_executor(executor, noop),
                                          calls, workers)
    return figures("ProcessPoolExecutor", workers, latencies, wall_s)


def run_on(loop_factory: Callable[[], asyncio.AbstractEventLoop],
           coroutine: Awaitable[Figures]) -> Figures:
    loop = loop_factory()
    try:
        return loop.run_until_complete(coroutine)
    finally:
        loop.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3, help="repeat, report medians")
    args = parser.parse_args()
    results: dict[tuple[str, int], list[Figures]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for _ in range(args.rounds):
            for workers in (1, 2):
                figs = [run_on(factory, bench_flowrun(folder, workers, args.calls,
                                                      f"flowrun ({loop_name})"))
                        for loop_name, factory in LOOPS.items()]
                figs.append(run_on(asyncio.new_event_loop,
                                   bench_pool_executor(workers, args.calls)))
                for fig in figs:
                    results.setdefault((fig.name, fig.workers), []).append(fig)
    print(f"warm no-op invocation, {args.calls} calls, median of {args.rounds} rounds")
    print(f"{'contender':<34}{'workers':>8}{'p50 µs':>10}{'p99 µs':>10}{'calls/s':>11}")
    medians: dict[tuple[str, int], Figures] = {}
    for key, runs in results.items():
        med = Figures(key[0], key[1], statistics.median(f.p50_us for f in runs),
                      statistics.median(f.p99_us for f in runs),
                      statistics.median(f.calls_per_s for f in runs))
        medians[key] = med
        print(f"{med.name:<34}{med.workers:>8}{med.p50_us:>10.1f}{med.p99_us:>10.1f}"
              f"{med.calls_per_s:>11.0f}")
    for loop_name in LOOPS:
        for workers in (1, 2):
            base = medians[("ProcessPoolExecutor", workers)]
            fig = medians[(f"flowrun ({loop_name})", workers)]
            print(f"{loop_name}, {workers} worker(s): flowrun {fig.calls_per_s / base.calls_per_s:.2f}x "
                  f"the throughput of ProcessPoolExecutor, p50 {fig.p50_us:.0f} µs = "
                  f"{fig.p50_us / base.p50_us:.2f}x its latency (target: p50 < 100 µs, >= 5x)")


if __name__ == "__main__":
    main()
