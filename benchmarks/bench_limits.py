"""What limits cost: cold start and warm invocation with ``LinuxLimiter`` on versus off.

"on" is the default limiter (cgroups per controller, rlimits, mount namespace with the
private scratch and the hidden state folder); "off" is ``NoIsolation`` (rlimits only). Both
run the same no-op handler on the same event loop, interleaved round by
round. The warm figures use ``memory_mb: 1769`` (one full CPU, so the CPU quota does not
throttle a tight benchmark loop — that would measure the quota, not the mechanism); one extra
row shows a 128 MB function, whose 0.07 CPU share a tight loop does run into.

    python3 benchmarks/bench_limits.py [--cold 20] [--calls 5000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flowrun import config as config_module  # noqa: E402
from flowrun.runtime import Runtime  # noqa: E402
from sandbox.isolation import Limiter, NoIsolation  # noqa: E402
from sandbox.limits.linux import LinuxLimiter  # noqa: E402

HANDLER = "def handler(event, context):\n    return None\n"


@dataclass(frozen=True)
class Figures:
    cold_p50_ms: float
    warm_p50_us: float
    warm_p99_us: float


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


async def run_side(folder: Path, name: str, limiter: Limiter, memory_mb: int, cold: int,
                   calls: int) -> Figures:
    config_path = folder / f"{name}.yaml"
    config_path.write_text(textwrap.dedent(f"""
        state_dir: state-{name}
        functions:
          noop: {{handler: fn.handler, code: ., concurrency: 1, memory_mb: {memory_mb}}}
    """))
    async with Runtime(config_module.load(config_path), limiter=limiter) as runtime:
        pool = runtime.pool.pools["noop"]
        cold_ms = []
        for _ in range(cold):
            await pool.close()  # the next invocation starts (and places) a new worker
            started = time.perf_counter()
            await runtime.invoke("noop")
            cold_ms.append((time.perf_counter() - started) * 1000)
        for _ in range(500):
            await runtime.invoke("noop")
        warm_us = []
        for _ in range(calls):
            started = time.perf_counter()
            await runtime.invoke("noop")
            warm_us.append((time.perf_counter() - started) * 1e6)
    return Figures(statistics.median(cold_ms), percentile(warm_us, 0.5), percentile(warm_us, 0.99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold", type=int, default=20, help="cold starts per side and round")
    parser.add_argument("--calls", type=int, default=5000, help="warm calls per side and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sides = {"off": (lambda: NoIsolation(), 1769), "on": (lambda: LinuxLimiter(), 1769),
             "on, 128 MB": (lambda: LinuxLimiter(), 128)}
    runs: dict[str, list[Figures]] = {name: [] for name in sides}
    print(LinuxLimiter().describe()["memory"])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "fn.py").write_text(HANDLER)
        for _ in range(args.rounds):
            for name, (make, memory_mb) in sides.items():
                loop = asyncio.new_event_loop()
                try:
                    runs[name].append(loop.run_until_complete(run_side(
                        folder, name.replace(", ", "-").replace(" ", ""), make(), memory_mb,
                        args.cold, args.calls)))
                finally:
                    loop.close()
    med = {name: Figures(*(statistics.median(getattr(f, field) for f in figs)
                           for field in ("cold_p50_ms", "warm_p50_us", "warm_p99_us")))
           for name, figs in runs.items()}
    print(f"no-op handler; {args.cold} cold starts and {args.calls} warm calls per side, "
          f"median of {args.rounds} rounds")
    print(f"{'limits':<14}{'cold p50 ms':>13}{'warm p50 µs':>13}{'warm p99 µs':>13}")
    for name, fig in med.items():
        print(f"{name:<14}{fig.cold_p50_ms:>13.1f}{fig.warm_p50_us:>13.1f}{fig.warm_p99_us:>13.1f}")
    on, off = med["on"], med["off"]
    print(f"limits on / off: cold start {on.cold_p50_ms / off.cold_p50_ms:.2f}x, "
          f"warm p50 {on.warm_p50_us / off.warm_p50_us:.2f}x, "
          f"warm p99 {on.warm_p99_us / off.warm_p99_us:.2f}x "
          f"(target: warm within 1.10x)")


if __name__ == "__main__":
    main()
