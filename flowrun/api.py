"""The management API on ``api.listen``: Lambda's Invoke API, status, health and metrics.

``POST /2015-03-31/functions/{name}/invocations`` speaks the Lambda Invoke API, so boto3,
the AWS CLI and every SDK call local functions unchanged (``endpoint_url``). Errors come
back in Lambda's shape (``{"Type": "User", "message": ...}`` with ``x-amzn-ErrorType``), which
botocore turns into ``client.exceptions.<Type>``. Also ``GET /status`` (``runtime.status()``),
``GET /healthz``, ``GET /metrics`` (Prometheus text) and ``GET /2015-03-31/functions``.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from flowrun import logs
from flowrun.types import (
    ASYNC_PAYLOAD_LIMIT_BYTES,
    SYNC_PAYLOAD_LIMIT_BYTES,
    FlowrunError,
    InvocationMode,
    InvocationResult,
    TooManyRequestsException,
)

if TYPE_CHECKING:
    from flowrun.runtime import Runtime

log = logging.getLogger("flowrun.api")

ACCOUNT_ID = "000000000000"
LOG_TAIL_BYTES = 4096
DRAIN_CAP_BYTES = 64 * 1024 * 1024
INVOCATION_TYPES = ("RequestResponse", "Event", "DryRun")
DURATION_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
                      300, 900)
_ARN = re.compile(
    r"^(?:arn:[^:]+:lambda:[^:]*:)?(?:\d{12}:)?(?:function:)?(?P<name>[A-Za-z0-9_\-]+)"
    r"(?::(?P<qualifier>[A-Za-z0-9_$\-]+))?$"
)


def parse_function_name(value: str) -> tuple[str, str | None]:
    """Name and qualifier from a name, ``name:qualifier``, a full or a partial ARN."""
    match = _ARN.match(value)
    if match is None:
        return value, None
    return match.group("name"), match.group("qualifier")


def function_arn(name: str, region: str = "us-east-1") -> str:
    return f"arn:aws:lambda:{region}:{ACCOUNT_ID}:function:{name}"


def lambda_error(status: int, error_type: str, message: str, request_id: str = "",
                 **fields: str) -> web.Response:
    """An error answer the way Lambda sends it, which is what botocore parses."""
    key = "Message" if error_type == "ResourceNotFoundException" else "message"
    body: dict[str, str] = {"Type": "User", key: message, **fields}
    headers = {"x-amzn-ErrorType": error_type}
    if request_id:
        headers["x-amzn-RequestId"] = request_id
    return web.json_response(body, status=status, headers=headers)


def log_tail(result: InvocationResult) -> str:
    """Base64 of the last 4 KB of the invocation's log lines (``X-Amz-Log-Result``)."""
    data = logs.lines(result).encode("utf-8")[-LOG_TAIL_BYTES:]
    return base64.b64encode(data).decode("ascii")


async def read_limited(request: web.Request, limit_bytes: int) -> bytes | None:
    """The body, or None past ``limit_bytes``; an oversized body is read and dropped so the
    client gets the error answer rather than a reset connection."""
    length = request.content_length
    if length is not None and length > limit_bytes:
        if length <= DRAIN_CAP_BYTES:
            async for _ in request.content.iter_chunked(1 << 16):
                pass
        return None
    data = bytearray()
    async for chunk in request.content.iter_chunked(1 << 16):
        data += chunk
        if len(data) > limit_bytes:
            return None
    return bytes(data)


class Metrics:
    """Per-runtime Prometheus metrics, fed by a dispatcher listener."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["function"]
        self.invocations = Counter("flowrun_invocations", "Invocations run (not throttled)",
                                   labels, registry=self.registry)
        self.errors = Counter("flowrun_errors", "Invocations that ended in a function error",
                              labels, registry=self.registry)
        self.timeouts = Counter("flowrun_timeouts", "Invocations that timed out",
                                labels, registry=self.registry)
        self.throttles = Counter("flowrun_throttles", "Invocations refused by throttling",
                                 labels, registry=self.registry)
        self.cold_starts = Counter("flowrun_cold_starts", "Invocations that started a worker",
                                   labels, registry=self.registry)
        self.gb_seconds = Counter("flowrun_billed_gb_seconds", "Billed GB-seconds",
                                  labels, registry=self.registry)
        self.duration = Histogram("flowrun_duration_seconds", "Invocation duration",
                                  labels, buckets=DURATION_BUCKETS_S, registry=self.registry)

    def listen(self, function_names: list[str]) -> Callable[[InvocationResult, str], None]:
        for name in function_names:  # every function shows up at 0 before its first call
            for metric in (self.invocations, self.errors, self.timeouts, self.throttles,
                           self.cold_starts, self.gb_seconds):
                metric.labels(name)
            self.duration.labels(name)
        return self.record

    def record(self, result: InvocationResult, source: str) -> None:
        name = result.function
        if result.status == "throttled":
            self.throttles.labels(name).inc()
            return
        self.invocations.labels(name).inc()
        if result.status == "error":
            self.errors.labels(name).inc()
        elif result.status == "timeout":
            self.errors.labels(name).inc()
            self.timeouts.labels(name).inc()
        if result.init_duration_ms is not None:
            self.cold_starts.labels(name).inc()
        self.duration.labels(name).observe(result.duration_ms / 1000)
        self.gb_seconds.labels(name).inc(
            result.billed_duration_ms / 1000 * result.memory_size_mb / 1024)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ManagementApi:
    """The daemon's HTTP API. ``start()`` returns once it listens; ``stop()`` closes it."""

    def __init__(self, runtime: Runtime, listen: str) -> None:
        self.runtime = runtime
        self.listen = listen
        self.metrics = Metrics()
        self._listener: Callable[[InvocationResult, str], None] | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.listen}"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=DRAIN_CAP_BYTES)
        app.router.add_post("/2015-03-31/functions/{name}/invocations", self.invoke)
        app.router.add_get("/2015-03-31/functions", self.list_functions)
        app.router.add_get("/2015-03-31/functions/", self.list_functions)
        app.router.add_get("/2015-03-31/functions/{name}", self.get_function)
        app.router.add_get("/status", self.status)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.render_metrics)
        return app

    async def start(self) -> None:
        host, _, port = self.listen.rpartition(":")
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False,
                               shutdown_timeout=5)
        await runner.setup()
        try:
            await web.TCPSite(runner, host.strip("[]"), int(port), reuse_address=True).start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        self._listener = self.metrics.listen(list(self.runtime.config.functions))
        self.runtime.dispatcher.listeners.append(self._listener)
        log.info("management API on %s", self.url)

    async def stop(self) -> None:
        if self._listener is not None:
            listeners = self.runtime.dispatcher.listeners
            if self._listener in listeners:
                listeners.remove(self._listener)
            self._listener = None
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # ------------------------------------------------------------------ Invoke

    async def invoke(self, request: web.Request) -> web.Response:
        name, qualifier = parse_function_name(request.match_info["name"])
        qualifier = request.query.get("Qualifier", qualifier)
        if name not in self.runtime.config.functions:
            arn = function_arn(name) + (f":{qualifier}" if qualifier else "")
            return lambda_error(404, "ResourceNotFoundException", f"Function not found: {arn}")
        kind = request.headers.get("X-Amz-Invocation-Type", "RequestResponse")
        if kind not in INVOCATION_TYPES:
            return lambda_error(400, "InvalidParameterValueException",
                                f"Invalid invocation type {kind!r}; valid: "
                                f"{', '.join(INVOCATION_TYPES)}")
        limit = ASYNC_PAYLOAD_LIMIT_BYTES if kind == "Event" else SYNC_PAYLOAD_LIMIT_BYTES
        body = await read_limited(request, limit)
        if body is None:
            operation = "InvokeAsync" if kind == "Event" else "InvokeFunction"
            return lambda_error(413, "RequestTooLargeException",
                                f"Request must be smaller than {limit} bytes for the "
                                f"{operation} operation")
        payload = body if body.strip() else b"{}"
        try:
            json.loads(payload)
        except ValueError as exc:
            return lambda_error(400, "InvalidRequestContentException",
                                f"Could not parse request body into json: {exc}")
        if kind == "DryRun":
            return web.Response(status=204, headers={"X-Amz-Executed-Version": "$LATEST"})
        mode: InvocationMode = "event" if kind == "Event" else "sync"
        try:
            result = await self.runtime.invoke_json(name, payload, mode=mode, source="api")
        except TooManyRequestsException as exc:
            if exc.reason == "ShuttingDown":
                return lambda_error(503, "ServiceException", str(exc))
            return lambda_error(429, "TooManyRequestsException", str(exc), Reason=exc.reason)
        except FlowrunError as exc:
            return lambda_error(exc.http_status, exc.error_type, str(exc))
        headers = {"x-amzn-RequestId": result.request_id, "X-Amz-Executed-Version": "$LATEST"}
        if kind == "Event":
            return web.Response(status=202, headers=headers)
        if request.headers.get("X-Amz-Log-Type", "None") == "Tail":
            headers["X-Amz-Log-Result"] = log_tail(result)
        if result.ok:
            return web.Response(status=200, body=result.payload_json.encode(),
                                content_type="application/json", headers=headers)
        headers["X-Amz-Function-Error"] = "Unhandled"
        return web.Response(status=200, body=json.dumps(result.error).encode(),
                            content_type="application/json", headers=headers)

    # ------------------------------------------------------------------ reading

    def _configuration(self, name: str) -> dict[str, Any]:
        fn = self.runtime.config.functions[name]
        return {
            "FunctionName": name,
            "FunctionArn": function_arn(name),
            "Runtime": "python3",
            "Handler": fn.handler,
            "Description": fn.description,
            "MemorySize": fn.memory_mb,
            "Timeout": fn.timeout_s,
            "Version": "$LATEST",
            "State": "Active",
            "PackageType": "Zip",
            "Environment": {"Variables": dict(fn.environment)},
        }

    async def list_functions(self, request: web.Request) -> web.Response:
        functions = [self._configuration(n) for n in sorted(self.runtime.config.functions)]
        return web.json_response({"Functions": functions})

    async def get_function(self, request: web.Request) -> web.Response:
        name, _ = parse_function_name(request.match_info["name"])
        if name not in self.runtime.config.functions:
            return lambda_error(404, "ResourceNotFoundException",
                                f"Function not found: {function_arn(name)}")
        return web.json_response({"Configuration": self._configuration(name)})

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self.runtime.status())

    async def healthz(self, request: web.Request) -> web.Response:
        """200 once every trigger has started; 503 while starting or stopping."""
        if self.runtime.stopping or not self.runtime.dispatcher.accepting:
            return web.json_response({"status": "stopping"}, status=503)
        if not self.runtime.ready:
            return web.json_response({"status": "starting"}, status=503)
        return web.json_response({"status": "ok"})

    async def render_metrics(self, request: web.Request) -> web.Response:
        response = web.Response(body=self.metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response
