"""The worker pool: real worker processes, warm reuse, errors in Lambda's shape."""

from __future__ import annotations

import os
import signal

import pytest

CONFIG = """
state_dir: state
functions:
  echo: {handler: handlers.echo, code: "{functions}"}
  counter: {handler: handlers.counter, code: "{functions}", concurrency: 1}
  context: {handler: handlers.context_info, code: "{functions}", memory_mb: 256,
            environment: {GREETING: hi}}
  chatty: {handler: handlers.chatty, code: "{functions}"}
  fail: {handler: handlers.fail, code: "{functions}"}
  sleep: {handler: handlers.sleep, code: "{functions}", timeout_s: 0.5}
  exits: {handler: handlers.exit_interpreter, code: "{functions}"}
  marshal: {handler: handlers.unserialisable, code: "{functions}"}
  nomodule: {handler: nowhere.handler, code: "{functions}"}
  nohandler: {handler: handlers.not_there, code: "{functions}"}
  broken: {handler: broken_import.handler, code: "{functions}"}
  tmp: {handler: handlers.write_tmp, code: "{functions}", concurrency: 1}
  fds: {handler: handlers.child_fds, code: "{functions}"}
  corrupt: {handler: handlers.corrupt_protocol, code: "{functions}", timeout_s: 30}
  nopython: {handler: handlers.echo, code: "{functions}", python: /nonexistent/python3}
"""


async def test_a_handler_runs_in_a_worker_process_not_the_daemon(make_runtime):
    runtime = await make_runtime(CONFIG)
    result = await runtime.invoke("counter", {})
    assert result.status == "success"
    assert result.payload["pid"] != os.getpid()


async def test_a_warm_worker_keeps_its_globals_and_only_the_first_call_is_a_cold_start(make_runtime):
    runtime = await make_runtime(CONFIG)
    first = await runtime.invoke("counter", {})
    second = await runtime.invoke("counter", {})
    assert first.payload["pid"] == second.payload["pid"]
    assert (first.payload["calls"], second.payload["calls"]) == (1, 2)
    assert first.init_duration_ms is not None and first.init_duration_ms > 0
    assert second.init_duration_ms is None


async def test_the_private_tmp_folder_survives_between_invocations(make_runtime):
    runtime = await make_runtime(CONFIG)
    assert (await runtime.invoke("tmp", {})).payload == {"before": ""}
    assert (await runtime.invoke("tmp", {})).payload == {"before": "x"}


async def test_the_context_and_environment_are_lambdas(make_runtime):
    runtime = await make_runtime(CONFIG)
    result = await runtime.invoke("context", {})
    info = result.payload
    assert info["aws_request_id"] == result.request_id
    assert info["function_name"] == "context"
    assert info["function_version"] == "$LATEST"
    assert info["invoked_function_arn"].endswith(":function:context")
    assert info["memory_limit_in_mb"] == "256"
    assert info["log_group_name"] == "/aws/lambda/context"
    assert {"aws_request_id", "function_name", "memory_limit_in_mb"} <= set(info["attributes"])
    assert 0 < info["remaining_ms"] <= 3000
    env = info["env"]
    assert env["AWS_LAMBDA_FUNCTION_NAME"] == "context"
    assert env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] == "256"
    assert env["LAMBDA_TASK_ROOT"].endswith("functions")
    assert env["_HANDLER"] == "handlers.context_info"
    assert env["GREETING"] == "hi"


async def test_print_and_logging_output_is_captured_per_invocation(make_runtime):
    runtime = await make_runtime(CONFIG)
    result = await runtime.invoke("chatty", {})
    assert "printed line" in result.logs
    assert "to stderr" in result.logs
    assert "[WARNING]" in result.logs and result.request_id in result.logs
    assert "logged line" in result.logs
    again = await runtime.invoke("echo", 1)
    assert again.logs == ""


async def test_a_raised_exception_keeps_its_type_message_and_stack(make_runtime):
    runtime = await make_runtime(CONFIG)
    result = await runtime.invoke("fail", {})
    assert result.status == "error"
    assert result.error_type == "ValueError"
    assert result.error_message == "something went wrong"
    assert any("handlers.py" in line and "in fail" in line for line in result.stack_trace)
    assert not any("sandbox" in line for line in result.stack_trace)


@pytest.mark.parametrize(
    ("function", "error_type", "message"),
    [
        ("nomodule", "Runtime.ImportModuleError", "Unable to import module 'nowhere'"),
        ("broken", "Runtime.ImportModuleError", "module_that_does_not_exist"),
        ("nohandler", "Runtime.HandlerNotFound", "Handler 'not_there' missing"),
        ("marshal", "Runtime.MarshalError", "Unable to marshal response"),
    ],
)
async def test_runtime_faults_have_lambdas_error_names(make_runtime, function, error_type, message):
    runtime = await make_runtime(CONFIG)
    result = await runtime.invoke(function, {})
    assert result.status == "error"
    assert result.error_type == error_type
    assert message in (result.error_message or "")


async def test_a_worker_that_exits_is_an_exit_error_and_is_replaced(make_runtime):
    runtime = await make_runtime(CONFIG)
    result = await runtime.invoke("exits", {})
    assert result.error_type == "Runtime.ExitError"
    assert "exit status 3" in (result.error_message or "")
    assert runtime.pool.pools["exits"].statistics().workers == 0
    again = await runtime.invoke("exits", {})
    assert again.error_type == "Runtime.ExitError"


async def test_a_timeout_kills_the_worker_and_a_fresh_one_takes_its_place(make_runtime):
    runtime = await make_runtime(CONFIG)
    result = await runtime.invoke("sleep", {"seconds": 30})
    assert result.status == "timeout"
    assert result.error_type == "Sandbox.Timedout"
    assert result.error_message == "Task timed out after 0.50 seconds"
    quick = await runtime.invoke("sleep", {"seconds": 0})
    assert quick.status == "success"
    assert quick.init_duration_ms is not None


async def test_a_killed_worker_does_not_take_the_daemon_down(make_runtime):
    runtime = await make_runtime(CONFIG)
    first = await runtime.invoke("counter", {})
    os.kill(first.payload["pid"], signal.SIGKILL)
    result = await runtime.invoke("counter", {})
    assert result.status in ("success", "error")
    final = await runtime.invoke("counter", {})
    assert final.status == "success"
    assert final.payload["pid"] != first.payload["pid"]


async def test_the_timeout_holds_on_a_cold_start_and_after_many_quick_invocations(make_runtime):
    """One watchdog timer per worker: the init's 10 s deadline must not stand for the first
    invocation, nor an earlier invocation's deadline for a later one."""
    runtime = await make_runtime(CONFIG)
    first = await runtime.invoke("sleep", {"seconds": 3})  # would finish well before 10 s
    assert first.status == "timeout"
    for _ in range(20):
        assert (await runtime.invoke("sleep", {"seconds": 0})).status == "success"
    late = await runtime.invoke("sleep", {"seconds": 3})
    assert late.status == "timeout"
    assert late.error_message == "Task timed out after 0.50 seconds"


async def test_a_handlers_child_does_not_inherit_the_workers_pipes_or_peak_counter(make_runtime):
    runtime = await make_runtime(CONFIG)
    result = await runtime.invoke("fds", {})
    assert result.status == "success", result.error_message
    # stdin, stdout, stderr, the pipes capture_output made, and ls's own directory handle
    assert len(result.payload["child"]) <= 4, result.payload
    assert result.payload["worker"] > len(result.payload["child"])


async def test_a_worker_that_cannot_start_leaves_no_descriptor_behind(make_runtime):
    runtime = await make_runtime(CONFIG)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(FileNotFoundError):
            await runtime.invoke("nopython", {})
    assert len(os.listdir("/proc/self/fd")) == before


async def test_a_worker_that_breaks_the_frame_protocol_is_killed_at_once(make_runtime):
    runtime = await make_runtime(CONFIG)
    result = await runtime.invoke("corrupt", {})
    assert result.status == "error"  # not a timeout: the daemon did not wait for 2 GiB
    assert result.error_type == "Runtime.ExitError"
    assert (await runtime.invoke("echo", 7)).payload == 7
