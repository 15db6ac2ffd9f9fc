"""The http trigger through a real aiohttp server, driven by real curl processes."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from flowrun import config as config_module
from flowrun.config import ConfigError
from flowrun.runtime import Runtime

CURL_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[-1] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


async def curl(url: str, *args: str, work_dir: Path) -> Answer:
    """Run curl without blocking the loop the runtime lives in; the final response only."""
    stem = work_dir / uuid.uuid4().hex
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", str(CURL_TIMEOUT_S), "-D", f"{stem}.h", "-o", f"{stem}.b",
        "-w", "%{http_code}", *args, url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    blocks = Path(f"{stem}.h").read_text().replace("\r\n", "\n").strip().split("\n\n")
    headers = [tuple(line.split(": ", 1)) for line in blocks[-1].splitlines()[1:] if ": " in line]
    return Answer(int(out), headers, Path(f"{stem}.b").read_bytes())  # type: ignore[arg-type]


YAML = """
state_dir: state
http:
  listen: 127.0.0.1:{port}
defaults:
  timeout_s: 10
functions:
  event: {{handler: http_handlers.event, code: "{{functions}}"}}
  shaped: {{handler: http_handlers.shaped, code: "{{functions}}"}}
  binary: {{handler: http_handlers.binary_echo, code: "{{functions}}"}}
  bare: {{handler: http_handlers.bare_list, code: "{{functions}}"}}
  nocode: {{handler: http_handlers.status_without_code, code: "{{functions}}"}}
  fail: {{handler: http_handlers.fail, code: "{{functions}}"}}
  forever: {{handler: http_handlers.forever, code: "{{functions}}", timeout_s: 1}}
  slow: {{handler: http_handlers.slow, code: "{{functions}}", concurrency: 1, queue_size: 0}}
triggers:
  - {{type: http, function: event, path: "/items/{{id}}"}}
  - {{type: http, function: event, method: get, path: "/files/{{proxy+}}"}}
  - {{type: http, function: bare, method: GET, path: "/files/readme"}}
  - {{type: http, function: shaped, method: POST, path: "/items/{{id}}"}}
  - {{type: http, function: binary, method: PUT, path: /binary}}
  - {{type: http, function: bare, method: GET, path: /bare}}
  - {{type: http, function: nocode, method: GET, path: /nocode}}
  - {{type: http, function: fail, path: /fail}}
  - {{type: http, function: forever, path: /forever}}
  - {{type: http, function: slow, path: /slow}}
  - type: http
    function: event
    method: GET
    path: /cors
    cors: {{allow_origins: ["https://app.example"], max_age_s: 600}}
"""


@dataclass
class Http:
    runtime: Runtime
    base: str
    work_dir: Path

    async def __call__(self, path: str, *args: str) -> Answer:
        return await curl(self.base + path, *args, work_dir=self.work_dir)


@pytest.fixture
async def http(make_runtime: Callable[..., Any], tmp_path: Path) -> Http:
    port = free_port()
    runtime = await make_runtime(YAML.format(port=port))
    work_dir = tmp_path / "curl"
    work_dir.mkdir()
    return Http(runtime, f"http://127.0.0.1:{port}", work_dir)


async def test_path_query_headers_and_cookies_arrive_as_a_payload_2_0_event(http: Http) -> None:
    answer = await http("/items/42?x=1&x=2&name=a%20b", "-H", "X-Trace: one",
                        "-H", "X-Trace: two", "-b", "session=abc; theme=dark",
                        "-A", "tester/1.0")
    assert answer.status == 200
    assert answer.header("content-type") == "application/json"
    event = answer.json()
    assert event["version"] == "2.0"
    assert event["routeKey"] == "ANY /items/{id}"
    assert event["rawPath"] == "/items/42"
    assert event["rawQueryString"] == "x=1&x=2&name=a%20b"
    assert event["queryStringParameters"] == {"x": "1,2", "name": "a b"}
    assert event["pathParameters"] == {"id": "42"}
    assert event["cookies"] == ["session=abc", "theme=dark"]
    assert event["headers"]["x-trace"] == "one,two"
    assert "cookie" not in event["headers"]
    assert event["isBase64Encoded"] is False and "body" not in event
    context = event["requestContext"]
    assert context["http"] == {"method": "GET", "path": "/items/42", "protocol": "HTTP/1.1",
                               "sourceIp": "127.0.0.1", "userAgent": "tester/1.0"}
    assert context["stage"] == "$default" and context["routeKey"] == "ANY /items/{id}"
    assert context["domainName"] == "127.0.0.1" and context["requestId"]
    assert isinstance(context["timeEpoch"], int) and context["time"].endswith("+0000")
    assert answer.header("apigw-requestid") == context["requestId"]


async def test_a_posted_json_body_arrives_as_plain_text(http: Http) -> None:
    answer = await http("/items/9", "-X", "PATCH", "-H", "Content-Type: application/json",
                        "--data-binary", '{"a": [1, 2]}')
    event = answer.json()
    assert event["body"] == '{"a": [1, 2]}'
    assert event["isBase64Encoded"] is False
    assert event["requestContext"]["http"]["method"] == "PATCH"


async def test_a_binary_body_arrives_base64_and_a_base64_response_goes_back_as_bytes(
        http: Http) -> None:
    data = bytes(range(256)) + os.urandom(1000)
    source = http.work_dir / "blob.bin"
    source.write_bytes(data)
    answer = await http("/binary", "-X", "PUT", "-H", "Content-Type: application/octet-stream",
                        "--data-binary", f"@{source}")
    assert answer.status == 200
    assert answer.header("content-type") == "application/octet-stream"
    assert answer.body == data[::-1]


async def test_a_response_with_a_status_code_sets_status_headers_cookies_and_body(
        http: Http) -> None:
    answer = await http("/items/7", "-X", "POST", "-d", "x=1")
    assert answer.status == 201
    assert answer.header("content-type") == "text/plain"
    assert answer.header("x-custom") == "yes"
    assert answer.all("set-cookie") == ["session=abc; Path=/", "theme=dark"]
    assert answer.body == b"created 7"


async def test_a_bare_value_or_a_dict_without_status_code_becomes_a_json_200(
        http: Http) -> None:
    bare = await http("/bare")
    assert (bare.status, bare.header("content-type")) == (200, "application/json")
    assert bare.json() == [1, "two", {"three": 3}]
    nocode = await http("/nocode")
    assert nocode.status == 200
    assert nocode.json() == {"message": "no statusCode here", "status": 418}


async def test_a_greedy_path_takes_the_rest_and_a_literal_route_wins_over_it(
        http: Http) -> None:
    greedy = (await http("/files/a/b/c.txt")).json()
    assert greedy["routeKey"] == "GET /files/{proxy+}"
    assert greedy["pathParameters"] == {"proxy": "a/b/c.txt"}
    assert (await http("/files/readme")).json() == [1, "two", {"three": 3}]


async def test_an_unknown_path_or_a_method_without_a_route_answers_404_not_found(
        http: Http) -> None:
    for path, args in (("/nowhere", ()), ("/items", ()), ("/bare", ("-X", "DELETE"))):
        answer = await http(path, *args)
        assert answer.status == 404, path
        assert answer.json() == {"message": "Not Found"}


@pytest.mark.parametrize("expect", ["Expect: 100-continue", "Expect:"])
async def test_a_body_past_6_mb_answers_413_without_invoking(http: Http, expect: str) -> None:
    source = http.work_dir / "big.bin"
    source.write_bytes(b"x" * (6 * 1024 * 1024 + 1))
    answer = await http("/items/1", "-X", "POST", "-H", expect, "--data-binary", f"@{source}")
    assert answer.status == 413
    assert answer.json() == {"message": "Request Entity Too Large"}
    assert all(p.statistics().invocations == 0 for p in http.runtime.pool.pools.values())


async def test_a_burst_past_concurrency_and_queue_is_throttled_with_429(http: Http) -> None:
    answers = await asyncio.gather(*(http("/slow") for _ in range(4)))
    statuses = sorted(a.status for a in answers)
    assert statuses[0] == 200 and statuses[-1] == 429, statuses
    assert set(statuses) == {200, 429}
    throttled = [a for a in answers if a.status == 429]
    assert throttled[0].json() == {"message": "Too Many Requests"}
    assert http.runtime.dispatcher.throttles["slow"] == len(throttled)


async def test_a_function_error_answers_502(http: Http) -> None:
    answer = await http("/fail")
    assert answer.status == 502
    assert answer.json() == {"message": "Internal Server Error"}


async def test_a_function_timeout_answers_504(http: Http) -> None:
    answer = await http("/forever")
    assert answer.status == 504
    assert answer.json() == {"message": "Endpoint request timed out"}


async def test_a_cors_preflight_is_answered_by_the_gateway_and_responses_carry_the_origin(
        http: Http) -> None:
    preflight = await http("/cors", "-X", "OPTIONS", "-H", "Origin: https://app.example",
                           "-H", "Access-Control-Request-Method: GET",
                           "-H", "Access-Control-Request-Headers: x-token")
    assert preflight.status == 204
    assert preflight.header("access-control-allow-origin") == "https://app.example"
    assert preflight.header("access-control-allow-headers") == "x-token"
    assert preflight.header("access-control-max-age") == "600"
    assert http.runtime.pool.pools["event"].statistics().invocations == 0
    answer = await http("/cors", "-H", "Origin: https://app.example")
    assert answer.header("access-control-allow-origin") == "https://app.example"
    other = await http("/cors", "-H", "Origin: https://evil.example")
    assert other.header("access-control-allow-origin") is None


async def test_in_flight_requests_finish_while_the_runtime_stops_and_stopped_routes_answer_503(
        http: Http) -> None:
    slow = asyncio.ensure_future(http("/slow"))
    gate = http.runtime.dispatcher.gates["slow"]
    while gate.active == 0:
        await asyncio.sleep(0.01)
    await http.runtime.triggers[0].stop()
    refused = await http("/items/1")
    assert refused.status == 503
    assert refused.json() == {"message": "Service Unavailable"}
    await http.runtime.stop(grace_s=30)
    answer = await slow
    assert (answer.status, answer.json()) == (200, {"slept": True})


def config_error(tmp_path: Path, functions: str, *triggers: str) -> str:
    """The ConfigError text for a config of ``functions`` (one line each) and ``triggers``."""
    text = "functions:\n" + "".join(f"  {line}\n" for line in functions.split("; "))
    text += "triggers:\n" + "".join(f"  - {line}\n" for line in triggers)
    with pytest.raises(ConfigError) as caught:
        config_module.parse(text, "flowrun.yaml", environ={}, base_dir=tmp_path)
    return str(caught.value)


def test_a_route_path_that_is_not_a_path_is_a_config_error_with_its_line(tmp_path: Path) -> None:
    message = config_error(tmp_path, "f: {handler: m.f}", "{type: http, function: f, path: no-slash}")
    assert "flowrun.yaml:4: triggers[0].path" in message
    assert "starting with '/'" in message


def test_two_http_triggers_on_one_route_are_a_config_error_at_the_second(tmp_path: Path) -> None:
    message = config_error(
        tmp_path, "f: {handler: m.f}; g: {handler: m.g}",
        "{type: http, function: f, method: get, path: '/items/{id}'}",
        "{type: cron, function: g, schedule: rate(5 minutes)}",
        "{type: http, function: g, method: GET, path: '//items/{name}/'}",
        "{type: http, function: g, method: POST, path: '/items/{id}'}",
        "{type: http, function: g, method: GET, path: '/items/{id}', enabled: false}")
    assert "flowrun.yaml:7: triggers[2]: http route GET '//items/{name}/' is defined twice" in message
    assert message.count("defined twice") == 1  # POST is another route; a disabled one is none


def test_an_http_trigger_named_by_its_class_shares_the_route_check(tmp_path: Path) -> None:
    message = config_error(tmp_path, "f: {handler: m.f}", "{type: http, function: f, path: /a}",
                           "{type: 'triggers.http:HttpTrigger', function: f, path: /a}")
    assert "flowrun.yaml:5: triggers[1]: http route ANY '/a' is defined twice" in message
