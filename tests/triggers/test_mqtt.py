"""The MQTT trigger against a real Mosquitto, driven by the real mosquitto_pub client."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiomqtt
import pytest

from flowrun import config as config_module
from flowrun.config import ConfigError
from tests.brokers.mqtt import PASSWORD, USER, Mosquitto, free_port
from tests.daemon_process import Daemon, children_of, is_alive, wait_until
from triggers.mqtt import MqttDestination, parse_url, topic_filter_problem

FUNCTIONS = Path(__file__).resolve().parents[1] / "functions"
FUNCTION = """
state_dir: state
functions:
  {name}:
    handler: mqtt_handlers.{handler}
    code: "{{functions}}"
    timeout_s: 30
    permissions: {{user: root}}  # the handler writes into the test's private folder
    environment: {{OUT_DIR: "{out}"}}
"""


def function_yaml(out: Path, name: str = "rec", handler: str = "record") -> str:
    out.mkdir(parents=True, exist_ok=True)
    return FUNCTION.format(name=name, handler=handler, out=out)


def events_in(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]


def records_in(out: Path) -> list[dict[str, Any]]:
    return [r for e in events_in(out) for r in e["records"]]


async def until(predicate: Callable[[], bool], timeout_s: float = 30) -> None:
    """Poll ``predicate`` until it holds; a generous bound only against hanging."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


@pytest.fixture
def prefix() -> str:
    """A topic prefix of this test's own, so tests sharing the broker never see each other."""
    return f"t-{uuid.uuid4().hex[:8]}"


async def test_a_json_and_a_binary_payload_each_invoke_the_function_with_one_record(
        make_runtime, mosquitto: Mosquitto, tmp_path: Path, prefix: str) -> None:
    out = tmp_path / "out"
    runtime = await make_runtime(function_yaml(out) + f"""
triggers:
  - {{type: mqtt, function: rec, url: "{mosquitto.url}", topics: ["{prefix}/#"], qos: 1}}
""")
    mosquitto.publish(f"{prefix}/json", '{"temp": 21.5}')
    mosquitto.publish(f"{prefix}/bin", b"\x00\xffraw")
    await until(lambda: len(events_in(out)) == 2)
    events = events_in(out)
    assert all(e["eventSource"] == "flowrun:mqtt" and len(e["records"]) == 1 for e in events)
    by_topic = {r["topic"]: r for r in records_in(out)}
    first = by_topic[f"{prefix}/json"]
    assert first["payload"] == {"temp": 21.5} and first["payloadEncoding"] == "json"
    assert (first["qos"], first["retain"], first["duplicate"]) == (1, False, False)
    assert isinstance(first["messageId"], int) and first["receivedAt"].endswith("Z")
    second = by_topic[f"{prefix}/bin"]
    assert second["payloadEncoding"] == "base64"
    assert base64.b64decode(second["payload"]) == b"\x00\xffraw"
    status = runtime.triggers[0].status()
    assert status["state"] == "connected" and status["invoked"] == 2 and status["acked"] == 2


async def test_plus_and_hash_wildcards_route_only_matching_topics(
        make_runtime, mosquitto: Mosquitto, tmp_path: Path, prefix: str) -> None:
    out = tmp_path / "out"
    await make_runtime(function_yaml(out) + f"""
triggers:
  - type: mqtt
    function: rec
    url: "{mosquitto.url}"
    topics: ["{prefix}/+/temp", "{prefix}/house/#"]
""")
    for topic in ("a/temp", "b/humidity", "house", "house/x/y", "a/b/temp", "last/temp"):
        mosquitto.publish(f"{prefix}/{topic}", "1")
    await until(lambda: len(records_in(out)) >= 4)
    await asyncio.sleep(0.3)  # a stray match would show up now
    topics = sorted(r["topic"].removeprefix(f"{prefix}/") for r in records_in(out))
    assert topics == ["a/temp", "house", "house/x/y", "last/temp"]


async def test_two_triggers_on_a_shared_subscription_split_the_messages(
        make_runtime, mosquitto: Mosquitto, tmp_path: Path, prefix: str) -> None:
    out = tmp_path / "out"
    runtime = await make_runtime(function_yaml(out) + f"""
triggers:
  - {{type: mqtt, function: rec, name: left, url: "{mosquitto.url}",
     topics: ["$share/g/{prefix}/#"]}}
  - {{type: mqtt, function: rec, name: right, url: "{mosquitto.url}",
     topics: ["$share/g/{prefix}/#"]}}
""")
    mosquitto.publish_lines(f"{prefix}/s", [str(i) for i in range(20)])
    await until(lambda: len(records_in(out)) >= 20)
    await asyncio.sleep(0.3)  # a copy too many would show up now
    assert sorted(r["payload"] for r in records_in(out)) == list(range(20))
    left, right = (t.status()["invoked"] for t in runtime.triggers)
    assert left > 0 and right > 0 and left + right == 20


async def test_qos1_messages_survive_a_broker_restart_and_an_offline_trigger(
        make_runtime, mosquitto: Mosquitto, tmp_path: Path, prefix: str) -> None:
    out = tmp_path / "out"
    runtime = await make_runtime(function_yaml(out) + f"""
triggers:
  - {{type: mqtt, function: rec, name: durable, url: "{mosquitto.url}",
     topics: ["{prefix}/#"], qos: 1, reconnect_initial_ms: 1500}}
""")
    trigger = runtime.triggers[0]
    mosquitto.publish(f"{prefix}/m", "1")
    await until(lambda: len(records_in(out)) == 1)
    mosquitto.restart()
    await until(lambda: trigger.status()["state"] != "connected")
    mosquitto.publish(f"{prefix}/m", "2")  # the trigger is still waiting to reconnect
    await until(lambda: len(records_in(out)) == 2)
    assert trigger.status()["state"] == "connected"
    assert trigger.status()["reconnects"] >= 1 and trigger.status()["last_error"]
    await runtime.stop()  # the daemon goes away; its session stays on the broker
    mosquitto.publish(f"{prefix}/m", "3")
    mosquitto.restart()
    await make_runtime(function_yaml(out) + f"""
triggers:
  - {{type: mqtt, function: rec, name: durable, url: "{mosquitto.url}",
     topics: ["{prefix}/#"], qos: 1}}
""")
    await until(lambda: len(records_in(out)) == 3)
    assert [r["payload"] for r in records_in(out)] == [1, 2, 3]


async def test_a_message_not_acknowledged_when_the_connection_drops_is_redelivered_as_duplicate(
        make_runtime, mosquitto: Mosquitto, tmp_path: Path, prefix: str) -> None:
    out = tmp_path / "out"
    runtime = await make_runtime(function_yaml(out, handler="record_then_sleep") + f"""
triggers:
  - {{type: mqtt, function: rec, name: redeliver, url: "{mosquitto.url}",
     topics: ["{prefix}/#"], qos: 1, invocation: sync}}
""")
    mosquitto.publish(f"{prefix}/slow", '{"sleep_s": 2}')
    await until(lambda: len(records_in(out)) == 1)
    mosquitto.restart()  # the connection drops while the invocation runs, before its PUBACK
    await until(lambda: len(records_in(out)) == 2)
    first, second = records_in(out)
    assert first["payload"] == second["payload"] == {"sleep_s": 2}
    assert (first["duplicate"], second["duplicate"]) == (False, True)
    await until(lambda: runtime.triggers[0].status()["acked"] == 1)


def test_a_message_in_flight_when_the_daemon_is_killed_is_invoked_again_after_restart(
        mosquitto: Mosquitto, tmp_path: Path, prefix: str) -> None:
    out = tmp_path / "out"
    api = f"127.0.0.1:{free_port()}"
    config = tmp_path / "flowrun.yaml"
    config.write_text(function_yaml(out, handler="record_then_sleep").replace(
        "{functions}", str(FUNCTIONS)) + f"""
api: {{listen: "{api}"}}
triggers:
  - {{type: mqtt, function: rec, name: killed, url: "{mosquitto.url}",
     topics: ["{prefix}/#"], qos: 1, invocation: sync}}
""")
    daemon = Daemon.start(config, api)
    try:
        mosquitto.publish(f"{prefix}/k", '{"sleep_s": 2}')
        wait_until(lambda: len(records_in(out)) == 1, 30, "the first invocation")
        workers = children_of(daemon.process.pid)
        daemon.kill()  # SIGKILL mid-invocation: no PUBACK was sent
        wait_until(lambda: not any(is_alive(pid) for pid in workers), 30, "orphaned workers")
        daemon = Daemon.start(config, api)
        wait_until(lambda: len(records_in(out)) == 2, 30, "the redelivery")
        assert [r["duplicate"] for r in records_in(out)] == [False, True]
        assert daemon.stop() == 0
    finally:
        daemon.kill()


async def test_a_qos2_message_is_invoked_once_and_acknowledged_after_its_invocation(
        make_runtime, mosquitto: Mosquitto, tmp_path: Path, prefix: str) -> None:
    out = tmp_path / "out"
    runtime = await make_runtime(function_yaml(out) + f"""
triggers:
  - {{type: mqtt, function: rec, name: exactly, url: "{mosquitto.url}",
     topics: ["{prefix}/#"], qos: 2, invocation: sync}}
""")
    trigger = runtime.triggers[0]
    mosquitto.publish(f"{prefix}/q2", '"once"', qos=2)
    await until(lambda: trigger.status()["acked"] == 1)
    mosquitto.restart()  # an incomplete QoS 2 flow would be resumed after this
    await until(lambda: trigger.status()["state"] == "connected"
                and trigger.status()["reconnects"] >= 1)
    mosquitto.publish(f"{prefix}/q2", '"after"', qos=2)
    await until(lambda: len(records_in(out)) == 2)
    assert sorted((r["payload"], r["qos"]) for r in records_in(out)) == [("after", 2),
                                                                         ("once", 2)]


async def test_mqtts_with_a_ca_file_and_user_password_urls_connect_and_a_wrong_password_is_shown(
        make_runtime, mosquitto: Mosquitto, tmp_path: Path, prefix: str) -> None:
    out = tmp_path / "out"
    auth = mosquitto.auth_url.replace("mqtt://", f"mqtt://{USER}:{quote(PASSWORD, safe='')}@")
    denied = mosquitto.auth_url.replace("mqtt://", f"mqtt://{USER}:wrong@")
    runtime = await make_runtime(function_yaml(out) + f"""
triggers:
  - {{type: mqtt, function: rec, name: tls, url: "{mosquitto.tls_url}",
     ca_file: "{mosquitto.ca_file}", topics: ["{prefix}/#"]}}
  - {{type: mqtt, function: rec, name: auth, url: "{auth}", topics: ["{prefix}/#"]}}
  - {{type: mqtt, function: rec, name: denied, url: "{denied}", topics: ["{prefix}/#"]}}
""")
    tls, authed, refused = runtime.triggers
    assert tls.status()["state"] == authed.status()["state"] == "connected"
    mosquitto.publish(f"{prefix}/secure", '"hello"')
    await until(lambda: len(records_in(out)) == 2)
    assert tls.status()["invoked"] == authed.status()["invoked"] == 1
    assert refused.status()["state"] != "connected"
    assert "authoriz" in refused.status()["last_error"].lower() or \
        "password" in refused.status()["last_error"].lower()


async def test_retained_skip_ignores_a_retained_message_that_deliver_hands_over(
        make_runtime, mosquitto: Mosquitto, tmp_path: Path, prefix: str) -> None:
    skipped, delivered = tmp_path / "skipped", tmp_path / "delivered"
    mosquitto.publish(f"{prefix}/state", '"retained"', retain=True)
    await make_runtime(function_yaml(skipped, "skip") + function_yaml(delivered, "keep")
                       .split("functions:\n", 1)[1] + f"""
triggers:
  - {{type: mqtt, function: skip, url: "{mosquitto.url}", topics: ["{prefix}/#"],
     retained: skip}}
  - {{type: mqtt, function: keep, url: "{mosquitto.url}", topics: ["{prefix}/#"]}}
""")
    mosquitto.publish(f"{prefix}/state", '"live"')
    await until(lambda: len(records_in(skipped)) == 1 and len(records_in(delivered)) == 2)
    assert [r["payload"] for r in records_in(skipped)] == ["live"]
    kept = sorted((r["payload"], r["retain"]) for r in records_in(delivered))
    assert kept == [("live", False), ("retained", True)]
    mosquitto.publish(f"{prefix}/state", "", retain=True)  # clear the retained message


async def test_messages_are_batched_by_count_and_by_window(
        make_runtime, mosquitto: Mosquitto, tmp_path: Path, prefix: str) -> None:
    out = tmp_path / "out"
    await make_runtime(function_yaml(out) + f"""
triggers:
  - {{type: mqtt, function: rec, url: "{mosquitto.url}", topics: ["{prefix}/#"],
     batch_size: 5, batch_window_ms: 3000}}
""")
    mosquitto.publish_lines(f"{prefix}/b", [str(i) for i in range(5)])
    await until(lambda: len(events_in(out)) == 1)
    mosquitto.publish_lines(f"{prefix}/b", ["5", "6"])
    await until(lambda: len(events_in(out)) == 2)  # a window later, with 2 of 5
    sizes = [len(e["records"]) for e in events_in(out)]
    assert sizes == [5, 2]
    assert [r["payload"] for r in records_in(out)] == list(range(7))


@pytest.mark.parametrize(("topic", "reason"), [
    ("a/#/b", "'#' must be a whole level and the last one"),
    ("sport+", "'+' must be a whole level"),
    ("#/a", "'#' must be a whole level and the last one"),
    ("$share//a", "non-empty GROUP"),
    ("", "cannot be empty"),
])
def test_an_invalid_topic_filter_is_a_config_error_naming_line_and_reason(
        make_config, topic: str, reason: str) -> None:
    path = make_config(f"""
functions:
  rec: {{handler: mqtt_handlers.record, code: "{{functions}}"}}
triggers:
  - type: mqtt
    function: rec
    url: mqtt://127.0.0.1:1883
    topics:
      - ok//empty/levels/+/#
      - "{topic}"
""")
    with pytest.raises(ConfigError) as caught:
        config_module.load(path)
    message = str(caught.value)
    assert "flowrun.yaml:10: triggers[0].topics[1]: " in message
    assert reason in message


async def test_two_triggers_with_one_client_id_refuse_to_start(
        make_runtime, mosquitto: Mosquitto, tmp_path: Path, prefix: str) -> None:
    trigger = f"{{type: mqtt, function: rec, url: \"{mosquitto.url}\", topics: [{prefix}]}}"
    with pytest.raises(ValueError, match="client id .* is used by another mqtt trigger"):
        await make_runtime(function_yaml(tmp_path / "out") +
                           f"triggers:\n  - {trigger}\n  - {trigger}\n")


def test_the_url_carries_scheme_credentials_and_default_ports() -> None:
    assert parse_url("mqtts://ann:p%40ss@broker.local") == (
        "mqtts", "broker.local", 8883, "ann", "p@ss")
    assert parse_url("mqtt://10.0.0.2") == ("mqtt", "10.0.0.2", 1883, None, None)
    with pytest.raises(ValueError, match="mqtt:// or mqtts://"):
        parse_url("http://broker")


def test_valid_filters_include_empty_levels_wildcards_and_shared_groups() -> None:
    for topic in ("a//b", "/", "+", "#", "a/+/+/#", "$share/g/a/+", "$SYS/#"):
        assert topic_filter_problem(topic) is None, topic


async def test_the_destination_publishes_the_record_as_json_with_qos1(
        mosquitto: Mosquitto, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWRUN_MQTT_URL", mosquitto.url)
    by_url = MqttDestination(f"//127.0.0.1:{mosquitto.port}/{prefix}/a")
    by_env = MqttDestination(f"{prefix}/b")
    async with aiomqtt.Client("127.0.0.1", mosquitto.port) as subscriber:
        await subscriber.subscribe(f"{prefix}/#", qos=1)
        await by_url.send({"n": 1})
        await by_env.send({"n": 2})
        received = []
        async with asyncio.timeout(30):
            async for message in subscriber.messages:
                received.append((str(message.topic), json.loads(message.payload), message.qos))
                if len(received) == 2:
                    break
    await by_url.close()
    await by_env.close()
    assert sorted(received) == [(f"{prefix}/a", {"n": 1}, 1), (f"{prefix}/b", {"n": 2}, 1)]


async def test_a_pipeline_reads_one_topic_and_publishes_results_to_another(
        make_runtime, mosquitto: Mosquitto, tmp_path: Path, prefix: str) -> None:
    await make_runtime(f"""
state_dir: state
functions:
  count:
    handler: mqtt_handlers.count
    code: "{{functions}}"
    on_success: "mqtt://127.0.0.1:{mosquitto.port}/{prefix}/out"
triggers:
  - {{type: mqtt, function: count, url: "{mosquitto.url}", topics: ["{prefix}/in"]}}
""")
    async with aiomqtt.Client("127.0.0.1", mosquitto.port) as subscriber:
        await subscriber.subscribe(f"{prefix}/out", qos=1)
        mosquitto.publish(f"{prefix}/in", '{"reading": 1}')
        async with asyncio.timeout(30):
            message = await anext(aiter(subscriber.messages))
    record = json.loads(message.payload)
    assert record["responsePayload"] == 1
    assert record["requestPayload"]["records"][0]["payload"] == {"reading": 1}
