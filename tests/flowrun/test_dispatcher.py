"""The dispatcher: the concurrency gate, throttling, accounting and graceful shutdown."""

from __future__ import annotations

import asyncio
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from daemon_process import Daemon, children_of, free_port, is_alive, wait_until

from flowrun.dispatcher import Gate
from flowrun.report import summarize
from flowrun.types import FlowrunError, TooManyRequestsException

CONFIG = """
state_dir: state
functions:
  sleepy:
    handler: lifecycle_handlers.sleep_then_pid
    code: "{functions}"
    concurrency: 2
    queue_size: 1
    timeout_s: 30
"""


# --------------------------------------------------------------------------- the gate


async def test_the_gate_admits_up_to_its_limit_queues_in_order_and_then_refuses() -> None:
    gate = Gate(limit=1, queue_size=2)
    await gate.enter()
    assert not gate.has_room()
    order: list[str] = []

    async def wait_then_note(name: str) -> None:
        await gate.enter()
        order.append(name)

    first = asyncio.create_task(wait_then_note("first"))
    second = asyncio.create_task(wait_then_note("second"))
    await asyncio.sleep(0)
    assert gate.waiting == 2
    with pytest.raises(TooManyRequestsException):
        await gate.enter()
    gate.leave()
    await first
    gate.leave()
    await second
    assert order == ["first", "second"]
    gate.leave()
    assert gate.active == 0 and gate.has_room()


async def test_a_cancelled_waiter_gives_up_its_place_without_leaking_a_slot() -> None:
    gate = Gate(limit=1, queue_size=5)
    await gate.enter()
    waiter = asyncio.create_task(gate.enter())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert gate.waiting == 0
    gate.leave()
    assert gate.active == 0
    await asyncio.wait_for(gate.enter(), 5)
    assert gate.active == 1


async def test_wait_for_room_returns_once_a_slot_frees() -> None:
    gate = Gate(limit=1, queue_size=0)
    await gate.enter()
    room = asyncio.create_task(gate.wait_for_room())
    await asyncio.sleep(0.01)
    assert not room.done()
    gate.leave()
    await asyncio.wait_for(room, 5)


# --------------------------------------------------------------------------- throttling


async def test_a_burst_past_concurrency_and_queue_is_throttled_and_accounted(
        make_runtime: Any) -> None:
    runtime = await make_runtime(CONFIG)
    burst = [runtime.invoke("sleepy", {"seconds": 0.5}) for _ in range(7)]
    outcomes = await asyncio.gather(*burst, return_exceptions=True)
    ran = [o for o in outcomes if not isinstance(o, BaseException)]
    throttled = [o for o in outcomes if isinstance(o, TooManyRequestsException)]
    # 2 run at once, 1 waits, the other 4 are refused at once.
    assert (len(ran), len(throttled)) == (3, 4)
    assert all(r.status == "success" for r in ran)
    assert all(t.error_type == "TooManyRequestsException" for t in throttled)
    assert {o.http_status for o in throttled} == {429}
    assert len({r.payload["pid"] for r in ran}) == 2  # never more workers than concurrency

    rows = list(runtime.ledger.rows())
    assert sorted(r.status for r in rows) == ["success"] * 3 + ["throttled"] * 4
    assert {r.error_type for r in rows if r.status == "throttled"} == {"TooManyRequestsException"}
    (report,) = summarize(rows, runtime.config.billing)
    assert (report.invocations, report.throttles, report.errors) == (3, 4, 0)
    assert runtime.status()["functions"]["sleepy"]["throttles"] == 4


async def test_an_unknown_function_is_resource_not_found(make_runtime: Any) -> None:
    runtime = await make_runtime(CONFIG)
    with pytest.raises(FlowrunError) as caught:
        await runtime.invoke("nosuch", {})
    assert caught.value.error_type == "ResourceNotFoundException"
    assert "defined: sleepy" in str(caught.value)


# --------------------------------------------------------------------------- shutdown


async def test_stop_lets_an_in_flight_invocation_finish_within_the_grace(
        make_runtime: Any) -> None:
    runtime = await make_runtime(CONFIG)
    in_flight = asyncio.create_task(runtime.invoke("sleepy", {"seconds": 0.5}))
    await _until(lambda: runtime.dispatcher.gates["sleepy"].active == 1)
    stopping = asyncio.create_task(runtime.stop(grace_s=30))
    await _until(lambda: not runtime.dispatcher.accepting)
    with pytest.raises(TooManyRequestsException) as refused:
        await runtime.dispatcher.invoke("sleepy", b"{}")
    assert refused.value.reason == "ShuttingDown"
    result = await in_flight
    await stopping
    assert result.status == "success" and result.payload["slept_s"] >= 0.5
    assert not is_alive(result.payload["pid"]) or await _gone(result.payload["pid"])


async def test_stop_does_not_wait_past_the_grace_for_a_stuck_invocation(
        make_runtime: Any) -> None:
    runtime = await make_runtime(CONFIG)
    stuck = asyncio.create_task(runtime.invoke("sleepy", {"seconds": 25}))
    await _until(lambda: runtime.dispatcher.gates["sleepy"].active == 1)
    started = asyncio.get_running_loop().time()
    await runtime.stop(grace_s=0.2)
    assert asyncio.get_running_loop().time() - started < 20
    outcome = (await asyncio.gather(stuck, return_exceptions=True))[0]
    assert isinstance(outcome, BaseException) or outcome.status != "success"


def sleepy_daemon(tmp_path: Path, functions_dir: Path, grace_s: float) -> Daemon:
    api = f"127.0.0.1:{free_port()}"
    config = tmp_path / "flowrun.yaml"
    config.write_text(f"""
state_dir: state
api: {{listen: "{api}"}}
shutdown_grace_s: {grace_s}
functions:
  sleepy: {{handler: lifecycle_handlers.sleep_then_pid, code: "{functions_dir}",
            timeout_s: {grace_s}}}
""")
    return Daemon.start(config, api)


def invoke_in_background(daemon: Daemon, seconds: float) -> tuple[threading.Thread,
                                                                   dict[str, Any], list[int]]:
    """Start a blocking invoke of ``sleepy`` in a thread; returns once it runs in a worker."""
    answer: dict[str, Any] = {}

    def invoke() -> None:
        answer["status"], answer["body"] = daemon.invoke("sleepy", {"seconds": seconds})

    caller = threading.Thread(target=invoke)
    caller.start()
    wait_until(lambda: daemon.status()["functions"]["sleepy"]["busy"] == 1, 30,
               "the invocation to start")
    workers = children_of(daemon.process.pid)
    assert workers
    return caller, answer, workers


def test_sigterm_to_flowrun_run_lets_an_in_flight_invocation_finish(
        tmp_path: Path, functions_dir: Path) -> None:
    daemon = sleepy_daemon(tmp_path, functions_dir, grace_s=30)
    try:
        caller, answer, workers = invoke_in_background(daemon, 1.5)
        code = daemon.stop()
        caller.join(30)
        assert not caller.is_alive()
    finally:
        daemon.kill()
    assert code == 0, daemon.output()
    assert answer["status"] == 200
    assert answer["body"]["slept_s"] >= 1.5
    assert "flowrun: stopped" in daemon.output()
    wait_until(lambda: not any(is_alive(pid) for pid in workers), 10, "the workers to exit")


def test_a_second_sigterm_during_the_grace_period_stops_flowrun_run_now(
        tmp_path: Path, functions_dir: Path) -> None:
    daemon = sleepy_daemon(tmp_path, functions_dir, grace_s=600)
    try:
        caller, answer, workers = invoke_in_background(daemon, 300)
        daemon.process.send_signal(signal.SIGTERM)
        wait_until(lambda: "signal again to stop now" in daemon.output(), 30,
                   "the daemon to start its grace period")
        code = daemon.stop(timeout_s=120)  # the second SIGTERM; the grace would be 600 s
        caller.join(30)
        assert not caller.is_alive()
    finally:
        daemon.kill()
    output = daemon.output()
    assert code == 0, output
    assert "second signal: stopping now" in output and "Traceback" not in output
    assert output.rstrip().endswith("flowrun: stopped")
    assert answer["body"]["errorType"] == "Runtime.ExitError"  # cut short, and said so
    wait_until(lambda: not any(is_alive(pid) for pid in workers), 10, "the workers to exit")
async def _until(predicate: Any, timeout_s: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.01)


async def _gone(pid: int) -> bool:
    await _until(lambda: not is_alive(pid), 10)
    return True
