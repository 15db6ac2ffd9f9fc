"""The management API through real clients: boto3's Lambda client and aiohttp."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import pytest
from botocore.config import Config as BotoConfig

from flowrun.api import function_arn, parse_function_name
from flowrun.runtime import Runtime


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


YAML = """
state_dir: state
api:
  listen: 127.0.0.1:{port}
defaults:
  timeout_s: 10
functions:
  tagged: {{handler: http_handlers.tagged, code: "{{functions}}"}}
  fail: {{handler: http_handlers.fail, code: "{{functions}}"}}
  forever: {{handler: http_handlers.forever, code: "{{functions}}", timeout_s: 1}}
  slow: {{handler: http_handlers.slow, code: "{{functions}}", concurrency: 1, queue_size: 0}}
"""


@dataclass
class Api:
    runtime: Runtime
    url: str
    client: Any

    async def invoke(self, **kwargs: Any) -> dict[str, Any]:
        """boto3 is blocking: call it in a thread so the runtime's loop keeps running."""
        response: dict[str, Any] = await asyncio.to_thread(self.client.invoke, **kwargs)
        if "Payload" in response:
            response["Body"] = await asyncio.to_thread(response["Payload"].read)
        return response

    async def get(self, path: str) -> tuple[int, str, str]:
        async with aiohttp.ClientSession() as session, session.get(self.url + path) as answer:
            return answer.status, answer.headers.get("Content-Type", ""), await answer.text()


@pytest.fixture
def lambda_client() -> Iterator[Callable[[str], Any]]:
    clients: list[Any] = []

    def make(url: str) -> Any:
        client = boto3.client(
            "lambda", endpoint_url=url, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
            config=BotoConfig(retries={"total_max_attempts": 1}, read_timeout=60,
                              connect_timeout=10))
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
async def api(make_runtime: Callable[..., Any],
              lambda_client: Callable[[str], Any]) -> AsyncIterator[Api]:
    port = free_port()
    runtime = await make_runtime(YAML.format(port=port))
    url = f"http://127.0.0.1:{port}"
    yield Api(runtime, url, lambda_client(url))


async def test_a_boto3_invoke_round_trips_the_payload(api: Api) -> None:
    response = await api.invoke(FunctionName="tagged", Payload=json.dumps({"n": [1, 2, "x"]}))
    assert response["StatusCode"] == 200
    assert "FunctionError" not in response
    assert response["ExecutedVersion"] == "$LATEST"
    body = json.loads(response["Body"])
    assert body["echo"] == {"n": [1, 2, "x"]}
    assert response["ResponseMetadata"]["HTTPHeaders"]["x-amzn-requestid"] == body["request_id"]


async def test_a_function_named_by_arn_or_with_a_qualifier_is_found(api: Api) -> None:
    for name in (function_arn("tagged"), "tagged:$LATEST", "000000000000:function:tagged"):
        response = await api.invoke(FunctionName=name, Payload=b'"hi"')
        assert json.loads(response["Body"])["echo"] == "hi", name


async def test_a_function_error_comes_back_as_unhandled_with_lambdas_error_document(
        api: Api) -> None:
    response = await api.invoke(FunctionName="fail", Payload=b"{}")
    assert response["StatusCode"] == 200
    assert response["FunctionError"] == "Unhandled"
    error = json.loads(response["Body"])
    assert error["errorType"] == "RuntimeError"
    assert error["errorMessage"] == "handler blew up"
    assert any("handler blew up" in line or "fail" in line for line in error["stackTrace"])


async def test_a_timeout_comes_back_as_unhandled_sandbox_timedout(api: Api) -> None:
    response = await api.invoke(FunctionName="forever", Payload=b"{}")
    assert response["FunctionError"] == "Unhandled"
    error = json.loads(response["Body"])
    assert error["errorType"] == "Sandbox.Timedout"
    assert "Task timed out after 1.00 seconds" in error["errorMessage"]


async def test_log_type_tail_returns_the_invocations_log_lines_base64(api: Api) -> None:
    response = await api.invoke(FunctionName="tagged", Payload=b"{}", LogType="Tail")
    request_id = json.loads(response["Body"])["request_id"]
    tail = base64.b64decode(response["LogResult"]).decode()
    assert tail.startswith(f"START RequestId: {request_id} Version: $LATEST")
    assert "hello from the log" in tail
    assert f"END RequestId: {request_id}" in tail
    assert f"REPORT RequestId: {request_id}\tDuration: " in tail


async def test_an_unknown_function_raises_resource_not_found(api: Api) -> None:
    with pytest.raises(api.client.exceptions.ResourceNotFoundException) as caught:
        await api.invoke(FunctionName="nope", Payload=b"{}")
    error = caught.value.response["Error"]
    assert error["Code"] == "ResourceNotFoundException"
    assert error["Message"] == f"Function not found: {function_arn('nope')}"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


async def test_an_invocation_past_concurrency_and_queue_raises_too_many_requests(
        api: Api) -> None:
    first = asyncio.ensure_future(api.invoke(FunctionName="slow", Payload=b"{}"))
    gate = api.runtime.dispatcher.gates["slow"]
    while gate.active == 0:
        await asyncio.sleep(0.01)
    with pytest.raises(api.client.exceptions.TooManyRequestsException) as caught:
        await api.invoke(FunctionName="slow", Payload=b"{}")
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 429
    assert caught.value.response["Reason"] == "ReservedFunctionConcurrentInvocationLimitExceeded"
    assert json.loads((await first)["Body"]) == {"slept": True}


async def test_a_payload_past_6_mb_raises_request_too_large(api: Api) -> None:
    payload = json.dumps("x" * (6 * 1024 * 1024)).encode()
    with pytest.raises(api.client.exceptions.RequestTooLargeException) as caught:
        await api.invoke(FunctionName="tagged", Payload=payload)
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 413
    assert api.runtime.pool.pools["tagged"].statistics().invocations == 0


async def test_a_payload_that_is_not_json_raises_invalid_request_content(api: Api) -> None:
    with pytest.raises(api.client.exceptions.InvalidRequestContentException):
        await api.invoke(FunctionName="tagged", Payload=b"{not json")


async def test_dry_run_answers_204_without_invoking(api: Api) -> None:
    response = await api.invoke(FunctionName="tagged", InvocationType="DryRun", Payload=b"{}")
    assert response["StatusCode"] == 204
    assert api.runtime.pool.pools["tagged"].statistics().invocations == 0


async def test_an_event_invocation_is_queued_with_202_and_then_run(api: Api) -> None:
    response = await api.invoke(FunctionName="tagged", InvocationType="Event",
                                Payload=b'{"queued": true}')
    assert response["StatusCode"] == 202
    assert response["Body"] == b""
    pool = api.runtime.pool.pools["tagged"]
    for _ in range(3000):
        if pool.statistics().invocations:
            break
        await asyncio.sleep(0.01)
    assert pool.statistics().invocations == 1


async def test_list_functions_names_every_configured_function(api: Api) -> None:
    response = await asyncio.to_thread(api.client.list_functions)
    names = sorted(f["FunctionName"] for f in response["Functions"])
    assert names == ["fail", "forever", "slow", "tagged"]
    forever = next(f for f in response["Functions"] if f["FunctionName"] == "forever")
    assert (forever["MemorySize"], forever["Timeout"]) == (128, 1)


async def test_metrics_count_invocations_errors_throttles_and_durations_per_function(
        api: Api) -> None:
    await api.invoke(FunctionName="tagged", Payload=b"{}")
    await api.invoke(FunctionName="tagged", Payload=b"{}")
    await api.invoke(FunctionName="fail", Payload=b"{}")
    status, content_type, text = await api.get("/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    lines = set(text.splitlines())
    assert 'flowrun_invocations_total{function="tagged"} 2.0' in lines
    assert 'flowrun_errors_total{function="fail"} 1.0' in lines
    assert 'flowrun_errors_total{function="tagged"} 0.0' in lines
    assert 'flowrun_throttles_total{function="slow"} 0.0' in lines
    assert 'flowrun_duration_seconds_count{function="tagged"} 2.0' in lines
    assert 'flowrun_cold_starts_total{function="tagged"} 1.0' in lines


async def test_status_and_healthz_describe_the_running_daemon(api: Api) -> None:
    status, _, text = await api.get("/status")
    assert status == 200
    body = json.loads(text)
    assert set(body["functions"]) == {"tagged", "fail", "forever", "slow"}
    assert body["functions"]["slow"]["concurrency"] == 1
    assert (await api.get("/healthz"))[0] == 200


@pytest.mark.parametrize(("given", "expected"), [
    ("echo", ("echo", None)),
    ("echo:prod", ("echo", "prod")),
    ("arn:aws:lambda:us-east-1:123456789012:function:echo", ("echo", None)),
    ("arn:aws:lambda:us-east-1:123456789012:function:echo:$LATEST", ("echo", "$LATEST")),
    ("123456789012:function:my-fn:7", ("my-fn", "7")),
])
def test_function_names_parse_like_lambdas(given: str, expected: tuple[str, str | None]) -> None:
    assert parse_function_name(given) == expected


async def test_two_runtimes_in_one_process_keep_their_own_metrics(
        api: Api, make_runtime: Callable[..., Any]) -> None:
    port = free_port()
    await make_runtime(YAML.format(port=port).replace("state_dir: state", "state_dir: other"))
    await api.invoke(FunctionName="tagged", Payload=b"{}")
    other = Api(api.runtime, f"http://127.0.0.1:{port}", None)
    _, _, mine = await api.get("/metrics")
    _, _, theirs = await other.get("/metrics")
    assert 'flowrun_invocations_total{function="tagged"} 1.0' in mine.splitlines()
    assert 'flowrun_invocations_total{function="tagged"} 0.0' in theirs.splitlines()


async def test_healthz_answers_503_starting_until_every_trigger_has_started_then_stopping(
        tmp_path: Path, functions_dir: Path) -> None:
    port = free_port()
    gate, stop_gate = tmp_path / "open", tmp_path / "let-stop"
    runtime = Runtime.from_yaml(f"""
state_dir: state
api: {{listen: "127.0.0.1:{port}"}}
functions:
  echo: {{handler: handlers.echo, code: "{functions_dir}"}}
triggers:
  - {{type: "gated_trigger:GatedTrigger", function: echo, gate: "{gate}",
     stop_gate: "{stop_gate}"}}
""", tmp_path)
    starting = asyncio.create_task(runtime.start())
    try:
        async with aiohttp.ClientSession() as session:
            async def healthz() -> tuple[int, Any]:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
                        return response.status, await response.json()
                except aiohttp.ClientConnectionError:
                    return 0, None

            while (answer := await healthz())[0] == 0:  # until the API listens
                await asyncio.sleep(0.02)
            assert answer == (503, {"status": "starting"})
            gate.touch()
            await starting
            assert await healthz() == (200, {"status": "ok"})
            stopping = asyncio.create_task(runtime.stop())
            while (answer := await healthz())[0] == 200:
                await asyncio.sleep(0.02)
            assert answer == (503, {"status": "stopping"})  # its trigger is still stopping
            stop_gate.touch()
            await stopping
    finally:
        gate.touch()
        stop_gate.touch()
        await starting
        await runtime.stop()
