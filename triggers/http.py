"""The *http* trigger: API Gateway HTTP API (payload format 2.0) on a local aiohttp server.

Every http trigger of a runtime registers a route on ONE shared server listening on
``http.listen``. A request becomes a 2.0 event (``version``, ``routeKey``, ``rawPath``,
``headers`` lower-cased with duplicates comma-joined, ``cookies``, ``queryStringParameters``,
``pathParameters``, ``requestContext``, ``body`` with ``isBase64Encoded`` for binary
content); the handler's return value becomes the response by the 2.0 rules: a dict with
``statusCode`` describes the response, anything else is a JSON 200.

Gateway errors answer as API Gateway does, with a ``{"message": ...}`` body: 404 for no
route, 413 past ``http.max_body_mb``, 429 when throttled, 502 on a function error, 504 on a
timeout and 503 while shutting down.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import hdrs, web
from multidict import CIMultiDict
from pydantic import BaseModel, ConfigDict, Field, field_validator

from flowrun.api import DRAIN_CAP_BYTES, read_limited
from flowrun.types import FlowrunError, RequestTooLargeException, TooManyRequestsException
from triggers.base import Trigger, TriggerConfig, TriggerHost

log = logging.getLogger("flowrun.http")

Method = Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "ANY"]
ACCOUNT_ID = "000000000000"
API_ID = "flowrun"
TEXT_TYPES = ("text/", "application/json", "application/xml", "application/javascript",
              "application/x-www-form-urlencoded", "application/graphql", "application/yaml")
TEXT_SUFFIXES = ("+json", "+xml", "+yaml")
_SEGMENT = re.compile(r"^(\{[A-Za-z_][A-Za-z0-9_\-]*\+?\}|[^{}]*)$")


class CorsConfig(BaseModel):
    """CORS like API Gateway's: preflight answered by the gateway, headers added to responses."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allow_origins: list[str] = Field(default_factory=lambda: ["*"])
    allow_methods: list[str] = Field(default_factory=lambda: ["*"])
    allow_headers: list[str] = Field(default_factory=lambda: ["*"])
    expose_headers: list[str] = Field(default_factory=list)
    allow_credentials: bool = False
    max_age_s: int = Field(0, ge=0, le=86_400)


class HttpTriggerConfig(TriggerConfig):
    method: Method = Field("ANY", description="HTTP method of the route, or ANY")
    path: str = Field(description="route path; {name} is a path parameter, {proxy+} is greedy")
    cors: CorsConfig | None = Field(None, description="answer CORS preflights and add headers")

    @field_validator("method", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("path")
    @classmethod
    def _route(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"expected a path starting with '/', got {value!r}")
        segments = value.strip("/").split("/") if value != "/" else []
        for i, segment in enumerate(segments):
            if not _SEGMENT.match(segment):
                raise ValueError(f"segment {segment!r}: expected literal text or one {{name}}")
            if segment.endswith("+}") and i != len(segments) - 1:
                raise ValueError(f"greedy {segment} must be the last segment")
        return value


# ------------------------------------------------------------------------- routing


def route_shape(method: str, path: str) -> str:
    """What the router tells routes apart by: the method and the segments, with parameter
    names and empty segments dropped (``/items/{id}`` and ``//items/{name}/`` are one)."""
    shapes = []
    for segment in (s for s in path.split("/") if s):
        if segment.startswith("{"):
            segment = "{+}" if segment.endswith("+}") else "{}"
        shapes.append(segment)
    return f"{method} /{'/'.join(shapes)}"


@dataclass
class Route:
    """One trigger's route. ``active`` turns False when its trigger stops (503, not 404)."""

    method: str
    path: str
    function: str
    cors: CorsConfig | None = None
    active: bool = True
    segments: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.segments = [s for s in self.path.split("/") if s]

    @property
    def key(self) -> str:
        return f"{self.method} {self.path}"

    def match(self, parts: list[str]) -> dict[str, str] | None:
        """The path parameters when ``parts`` (decoded path segments) fit this route."""
        params: dict[str, str] = {}
        for i, segment in enumerate(self.segments):
            if segment.endswith("+}"):
                rest = parts[i:]
                if not rest:
                    return None
                params[segment[1:-2]] = "/".join(rest)
                return params
            if i >= len(parts):
                return None
            if segment.startswith("{"):
                params[segment[1:-1]] = parts[i]
            elif segment != parts[i]:
                return None
        return params if len(parts) == len(self.segments) else None

    def specificity(self) -> tuple[int, ...]:
        """Higher is more specific: literals beat parameters beat greedy; a method beats ANY."""
        ranks = [0 if s.endswith("+}") else 1 if s.startswith("{") else 2 for s in self.segments]
        return (*ranks, len(ranks), 0 if self.method == "ANY" else 1)


class Router:
    def __init__(self) -> None:
        self.routes: list[Route] = []

    def add(self, route: Route) -> None:
        if any(r.key == route.key and r.active for r in self.routes):
            raise ValueError(f"http route {route.key!r} is defined twice")
        self.routes = [r for r in self.routes if r.key != route.key]
        self.routes.append(route)
        self.routes.sort(key=Route.specificity, reverse=True)

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]] | None:
        parts = [p for p in path.split("/") if p]
        for route in self.routes:
            if route.method not in ("ANY", method):
                continue
            params = route.match(parts)
            if params is not None:
                return route, params
        return None

    def match_any_method(self, path: str) -> Route | None:
        parts = [p for p in path.split("/") if p]
        return next((r for r in self.routes if r.match(parts) is not None), None)


# ------------------------------------------------------------------------- event and response


def is_text(content_type: str) -> bool:
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind.startswith(TEXT_TYPES) or kind.endswith(TEXT_SUFFIXES)


def _joined(pairs: Any, lower: bool) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in pairs:
        key = name.lower() if lower else name
        out[key] = f"{out[key]},{value}" if key in out else value
    return out


def _request_id() -> str:
    return base64.b64encode(os.urandom(12)).decode().rstrip("=")


def build_event(request: web.Request, body: bytes, route: Route,
                params: Mapping[str, str]) -> dict[str, Any]:
    """The API Gateway HTTP API payload format 2.0 event for ``request``."""
    now = time.time()
    headers = _joined(((k, v) for k, v in request.headers.items()
                       if k.lower() != "cookie"), lower=True)
    host = request.headers.get(hdrs.HOST, request.host).rsplit(":", 1)[0]
    route_key = route.key
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": route_key,
        "rawPath": request.rel_url.raw_path,
        "rawQueryString": request.rel_url.raw_query_string,
    }
    cookies = [c.strip() for value in request.headers.getall(hdrs.COOKIE, [])
               for c in value.split(";") if c.strip()]
    if cookies:
        event["cookies"] = cookies
    event["headers"] = headers
    if request.rel_url.query:
        event["queryStringParameters"] = _joined(request.rel_url.query.items(), lower=False)
    peer = request.transport.get_extra_info("peername") if request.transport else None
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if peer:
        headers.setdefault("x-forwarded-for", str(peer[0]))
    if sockname:
        headers.setdefault("x-forwarded-port", str(sockname[1]))
    headers.setdefault("x-forwarded-proto", request.scheme)
    event["requestContext"] = {
        "accountId": ACCOUNT_ID,
        "apiId": API_ID,
        "domainName": host,
        "domainPrefix": host.split(".", 1)[0],
        "http": {
            "method": request.method,
            "path": request.path,
            "protocol": f"HTTP/{request.version.major}.{request.version.minor}",
            "sourceIp": peer[0] if peer else "",
            "userAgent": request.headers.get(hdrs.USER_AGENT, ""),
        },
        "requestId": _request_id(),
        "routeKey": route_key,
        "stage": "$default",
        "time": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)),
        "timeEpoch": int(now * 1000),
    }
    if params:
        event["pathParameters"] = dict(params)
    if body:
        text = is_text(request.headers.get(hdrs.CONTENT_TYPE, "text/plain"))
        if text:
            try:
                event["body"] = body.decode("utf-8")
            except UnicodeDecodeError:
                text = False
        if not text:
            event["body"] = base64.b64encode(body).decode("ascii")
        event["isBase64Encoded"] = not text
    else:
        event["isBase64Encoded"] = False
    return event


def gateway_error(status: int, message: str, request_id: str = "") -> web.Response:
    response = web.json_response({"message": message}, status=status,
                                 dumps=lambda v: json.dumps(v, separators=(",", ":")))
    if request_id:
        response.headers["apigw-requestid"] = request_id
    return response


class BadResponse(ValueError):
    """The handler returned a response API Gateway would not accept."""


def build_response(payload: Any, payload_json: str) -> web.Response:
    """Turn a handler's return value into the HTTP response, by the 2.0 rules."""
    if not (isinstance(payload, dict) and "statusCode" in payload):
        return web.Response(status=200, body=payload_json.encode(),
                            content_type="application/json")
    try:
        status = int(payload["statusCode"])
    except (TypeError, ValueError):
        raise BadResponse(f"statusCode {payload['statusCode']!r} is not a number") from None
    if not 100 <= status <= 599:
        raise BadResponse(f"statusCode {status} is out of range")
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in (payload.get("headers") or {}).items():
        headers[str(name)] = _header_value(value)
    for name, values in (payload.get("multiValueHeaders") or {}).items():
        headers.popall(str(name), None)
        for value in values if isinstance(values, list) else [values]:
            headers.add(str(name), _header_value(value))
    for cookie in payload.get("cookies") or []:
        headers.add(hdrs.SET_COOKIE, str(cookie))
    headers.setdefault(hdrs.CONTENT_TYPE, "application/json")
    body = payload.get("body")
    if body is None:
        data = b""
    elif isinstance(body, str):
        data = body.encode()
    else:
        data = json.dumps(body).encode()
    if payload.get("isBase64Encoded") and data:
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise BadResponse("isBase64Encoded is true but body is not base64") from None
    return web.Response(status=status, body=data, headers=headers)


def _header_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# ------------------------------------------------------------------------- the shared server


@dataclass(frozen=True)
class ServerSettings:
    listen: str = "127.0.0.1:8080"
    max_body_bytes: int = 6 * 1024 * 1024
    shutdown_grace_s: float = 30.0


def _settings(host: TriggerHost) -> ServerSettings:
    config = getattr(host, "config", None)
    http = getattr(config, "http", None)
    if http is None:
        return ServerSettings()
    return ServerSettings(listen=http.listen, max_body_bytes=int(http.max_body_mb * 1024 * 1024),
                          shutdown_grace_s=float(getattr(config, "shutdown_grace_s", 30.0)))


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class HttpServer:
    """One aiohttp server for every http trigger of a runtime; routes come and go."""

    def __init__(self, host: TriggerHost, settings: ServerSettings) -> None:
        self.host = host
        self.settings = settings
        self.router = Router()
        self.closing = False
        self.requests = 0
        self._runner: web.AppRunner | None = None
        self._lock = asyncio.Lock()

    @property
    def listening(self) -> bool:
        return self._runner is not None

    async def start(self) -> bool:
        """Listen, unless already listening; True when this call started it."""
        async with self._lock:
            if self._runner is not None:
                return False
            self.closing = False
            app = web.Application(client_max_size=DRAIN_CAP_BYTES)
            app.router.add_route("*", "/{tail:.*}", self.handle, expect_handler=self._expect)
            runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                   shutdown_timeout=self.settings.shutdown_grace_s)
            await runner.setup()
            address, port = split_listen(self.settings.listen)
            site = web.TCPSite(runner, address, port, reuse_address=True)
            try:
                await site.start()
            except OSError:
                await runner.cleanup()
                raise
            self._runner = runner
            log.info("http triggers listening on http://%s", self.settings.listen)
            return True

    async def close(self) -> None:
        """Refuse new requests, let those in flight finish, close the socket."""
        self.closing = True
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def _too_large(self, request: web.Request) -> bool:
        length = request.content_length
        return length is not None and length > self.settings.max_body_bytes

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
        """Refuse an oversized body before the client sends it (``Expect: 100-continue``)."""
        if self._too_large(request):
            return gateway_error(413, "Request Entity Too Large")
        if request.headers.get(hdrs.EXPECT, "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        return None

    async def _read(self, request: web.Request) -> bytes | None:
        """The body, or None past the limit (an oversized body is drained, see read_limited)."""
        return await read_limited(request, self.settings.max_body_bytes)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if self.closing:
            return gateway_error(503, "Service Unavailable")
        found = self.router.match(request.method, request.path)
        preflight = request.method == "OPTIONS" and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
        if preflight:
            cors_route = found[0] if found else self.router.match_any_method(request.path)
            if cors_route is not None and cors_route.cors is not None:
                return cors_preflight(cors_route.cors, request)
        if found is None:
            return gateway_error(404, "Not Found")
        route, params = found
        if not route.active:
            return gateway_error(503, "Service Unavailable")
        body = await self._read(request)
        if body is None:
            return gateway_error(413, "Request Entity Too Large")
        event = build_event(request, body, route, params)
        response = await self._invoke(route, event)
        if route.cors is not None:
            add_cors_headers(route.cors, request, response)
        return response

    async def _invoke(self, route: Route, event: dict[str, Any]) -> web.Response:
        request_id = event["requestContext"]["requestId"]
        try:
            result = await self.host.invoke(route.function, event, source=f"http:{route.key}")
        except TooManyRequestsException as exc:
            if exc.reason == "ShuttingDown":
                return gateway_error(503, "Service Unavailable", request_id)
            return gateway_error(429, "Too Many Requests", request_id)
        except RequestTooLargeException:
            return gateway_error(413, "Request Entity Too Large", request_id)
        except FlowrunError:  # unknown function, no queue, ...: API Gateway's 500
            return gateway_error(500, "Internal Server Error", request_id)
        if result.status == "timeout":
            return gateway_error(504, "Endpoint request timed out", request_id)
        if not result.ok:
            return gateway_error(502, "Internal Server Error", request_id)
        try:
            response = build_response(result.payload, result.payload_json)
        except BadResponse as exc:
            log.warning("%s: function %s returned a bad response: %s", route.key,
                        route.function, exc)
            return gateway_error(502, "Internal Server Error", request_id)
        response.headers["apigw-requestid"] = request_id
        return response


def _cors_origin(cors: CorsConfig, request: web.Request) -> str | None:
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is None:
        return None
    if "*" in cors.allow_origins:
        return origin if cors.allow_credentials else "*"
    return origin if origin in cors.allow_origins else None


def cors_preflight(cors: CorsConfig, request: web.Request) -> web.Response:
    response = web.Response(status=204)
    origin = _cors_origin(cors, request)
    if origin is None:
        return response
    asked = request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS, "")
    response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
    response.headers[hdrs.ACCESS_CONTROL_ALLOW_METHODS] = (
        request.headers[hdrs.ACCESS_CONTROL_REQUEST_METHOD] if "*" in cors.allow_methods
        else ",".join(cors.allow_methods))
    allowed = asked if "*" in cors.allow_headers else ",".join(cors.allow_headers)
    if allowed:
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = allowed
    if cors.max_age_s:
        response.headers[hdrs.ACCESS_CONTROL_MAX_AGE] = str(cors.max_age_s)
    if cors.allow_credentials:
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS] = "true"
    return response


def add_cors_headers(cors: CorsConfig, request: web.Request, response: web.Response) -> None:
    origin = _cors_origin(cors, request)
    if origin is None:
        return
    response.headers.setdefault(hdrs.ACCESS_CONTROL_ALLOW_ORIGIN, origin)
    if cors.expose_headers:
        response.headers.setdefault(hdrs.ACCESS_CONTROL_EXPOSE_HEADERS,
                                    ",".join(cors.expose_headers))
    if cors.allow_credentials:
        response.headers.setdefault(hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS, "true")


def shared_server(host: TriggerHost) -> HttpServer:
    """The runtime's one HTTP server; the trigger that starts it has it closed on stop."""

    return host.shared("http-server", lambda: HttpServer(host, _settings(host)))


# ------------------------------------------------------------------------- the trigger


class HttpTrigger(Trigger):
    config_model = HttpTriggerConfig

    @classmethod
    def check_together(cls, configs: list[TriggerConfig]) -> list[tuple[int, str]]:
        """Config time, across every http trigger: one route per method and path (they
        share one server). Returns (position in ``configs``, message) pairs."""
        seen: set[str] = set()
        issues = []
        for position, config in enumerate(configs):
            assert isinstance(config, HttpTriggerConfig)
            if not config.enabled:
                continue
            shape = route_shape(config.method, config.path)
            if shape in seen:
                issues.append((position, f"http route {config.method} {config.path!r} is "
                                         "defined twice: an http trigger above matches the "
                                         "same requests (parameter names and extra slashes "
                                         "do not make a route different)"))
            seen.add(shape)
        return issues

    def __init__(self, config: TriggerConfig, host: TriggerHost) -> None:
        super().__init__(config, host)
        assert isinstance(config, HttpTriggerConfig)
        self.http_config = config
        self.route = Route(config.method, config.path, config.function, config.cors)
        self.server: HttpServer | None = None

    @property
    def name(self) -> str:
        return self.config.name or f"http:{self.route.key}"

    async def start(self) -> None:
        server = shared_server(self.host)
        server.router.add(self.route)
        self.route.active = True
        self.server = server
        if await server.start():
            self.host.on_stop(server.close)

    async def stop(self) -> None:
        self.route.active = False

    def status(self) -> dict[str, Any]:
        listening = self.server is not None and self.server.listening and self.route.active
        return {
            "state": "running" if listening else "stopped",
            "route": self.route.key,
            "url": f"http://{self.server.settings.listen}{self.route.path}" if self.server else None,
        }
