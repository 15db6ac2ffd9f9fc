"""The loop spinner: the daemon's loop polls while a quick reply is due, and only then."""

from __future__ import annotations

import asyncio

CONFIG = """
state_dir: state
functions:
  quick: {handler: handlers.echo, code: "{functions}", cpus: 1}
  slow: {handler: handlers.sleep, code: "{functions}", cpus: 1, spin_us: 100}
  still: {handler: handlers.echo, code: "{functions}", memory_mb: 128}  # spin_us 0
"""


async def test_the_loop_polls_while_a_reply_is_due_and_sleeps_once_it_is_in(make_runtime):
    runtime = await make_runtime(CONFIG)
    await runtime.invoke("quick", {})  # cold start
    spinner = runtime.pool.spinner
    before = spinner.spins
    assert (await runtime.invoke("quick", {"n": 1})).payload == {"n": 1}
    assert spinner.spins > before
    await asyncio.sleep(0.05)
    assert not spinner.running
    idle = spinner.spins
    await asyncio.sleep(0.05)
    assert spinner.spins == idle


async def test_a_slow_handler_lets_the_loop_sleep_after_the_spin_window(make_runtime):
    runtime = await make_runtime(CONFIG)
    await runtime.invoke("slow", {"seconds": 0})
    spinner = runtime.pool.spinner
    before = spinner.spins
    assert (await runtime.invoke("slow", {"seconds": 0.3})).status == "success"
    # a 200 µs window is a few dozen polls; polling for the whole 300 ms would be thousands
    assert spinner.spins - before < 1000


async def test_the_loop_polls_for_a_function_whose_worker_does_not(make_runtime):
    """The worker's spin_us is paid from the function's CPU share; the loop's is the
    daemon's own, so a fractional-CPU function still gets a quick read of its reply."""
    runtime = await make_runtime(CONFIG)
    await runtime.invoke("still", 0)
    spinner = runtime.pool.spinner
    before = spinner.spins
    assert (await runtime.invoke("still", 1)).payload == 1
    assert spinner.spins > before
