"""Kafka trigger and Kafka destination (aiokafka).

The trigger joins a consumer group, gathers each assigned partition's records into batches
(``batch_size`` records or ``batch_window_ms``, whichever comes first) and invokes the
function with Lambda's self-managed Kafka event. Delivery is at least once:

- one batch per partition is in flight at a time, so records of a partition are handled in
  order, and the next offset is committed only after its batch succeeded;
- a handler may return ``{"batchItemFailures": [{"itemIdentifier": "<offset>"}]}``: the
  records before the first failed one are committed and the batch is retried from it;
- a failing batch is retried ``max_retries`` times, then sent to the ``on_failure``
  destination (the trigger's, else the function's) and committed past, so the partition
  moves on;
- a partition holding a full batch, or every partition while the function has no free
  concurrency, is paused (``consumer.pause``) instead of piling records up in memory;
- on a rebalance the batches of revoked partitions finish (bounded by the function's
  timeout) or are abandoned, and no offset is committed for a partition we no longer own.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.helpers import create_ssl_context
from pydantic import Field, field_validator, model_validator

from flowrun.config import DESTINATION_PATTERN
from flowrun.types import FlowrunError, TooManyRequestsException
from triggers.base import Trigger, TriggerConfig, TriggerHost

log = logging.getLogger("flowrun.kafka")

MAX_BATCH_SIZE = 10_000
SERVERS_ENV = "FLOWRUN_KAFKA_BOOTSTRAP_SERVERS"


class KafkaTriggerConfig(TriggerConfig):
    """``type: kafka`` — consume topics with a consumer group and invoke a batch function."""

    bootstrap_servers: list[str] = Field(
        description="host:port of the brokers; a comma-separated string works too")
    topics: list[str] | None = Field(None, min_length=1, description="topics to consume")
    topic_pattern: str | None = Field(None, description="regular expression of topic names")
    group_id: str | None = Field(None, description="consumer group; default flowrun-FUNCTION")
    client_id: str | None = None
    starting_position: Literal["latest", "earliest"] = Field(
        "latest", description="where a group without committed offsets starts")
    batch_size: int = Field(100, ge=1, le=MAX_BATCH_SIZE, description="most records per batch")
    batch_window_ms: int = Field(500, ge=0, le=300_000,
                                 description="longest wait to fill a batch")
    max_poll_interval_ms: int = Field(300_000, ge=1_000, le=3_600_000)
    session_timeout_ms: int = Field(10_000, ge=1_000, le=3_600_000)
    heartbeat_interval_ms: int = Field(3_000, ge=100, le=3_600_000)
    request_timeout_ms: int = Field(40_000, ge=1_000, le=3_600_000)
    max_partition_fetch_bytes: int = Field(1_048_576, ge=1_024)
    fetch_max_bytes: int = Field(4_194_304, ge=1_024,
                                 description="most bytes one fetch brings, all partitions")
    pipeline_commits: bool = Field(
        False, description="commit a batch while the next one runs: faster, but a crash may "
                           "redeliver two batches per partition instead of one")
    max_retries: int = Field(2, ge=0, le=10_000,
                             description="retries of a failed batch before on_failure")
    retry_backoff_ms: int = Field(500, ge=0, le=600_000,
                                  description="first wait before a retry; doubles each time")
    on_failure: str | None = Field(None, pattern=DESTINATION_PATTERN,
                                   description="where exhausted batches go; default: the "
                                               "function's on_failure, else dlq")
    on_success: str | None = Field(None, pattern=DESTINATION_PATTERN,
                                   description="where successful batch results go; default: "
                                               "the function's on_success")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI",
                            "OAUTHBEARER"] | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: str | None = None
    sasl_kerberos_service_name: str = "kafka"
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: str | None = None
    ssl_check_hostname: bool = True

    @field_validator("bootstrap_servers", mode="before")
    @classmethod
    def _split_servers(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _check(self) -> KafkaTriggerConfig:
        if not self.bootstrap_servers:
            raise ValueError("bootstrap_servers: give at least one host:port")
        if (self.topics is None) == (self.topic_pattern is None):
            raise ValueError("give exactly one of topics (a list) or topic_pattern (a regex)")
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ValueError(f"heartbeat_interval_ms ({self.heartbeat_interval_ms}) must be "
                             f"below session_timeout_ms ({self.session_timeout_ms})")
        if self.request_timeout_ms <= self.session_timeout_ms:
            raise ValueError(f"request_timeout_ms ({self.request_timeout_ms}) must be above "
                             f"session_timeout_ms ({self.session_timeout_ms})")
        if self.security_protocol.startswith("SASL") and self.sasl_mechanism is None:
            raise ValueError(f"security_protocol {self.security_protocol} needs sasl_mechanism")
        return self

    @property
    def group(self) -> str:
        return self.group_id or f"flowrun-{self.function}"


def client_options(config: KafkaTriggerConfig) -> dict[str, Any]:
    """Connection and security keyword arguments shared by consumers and producers."""
    options: dict[str, Any] = {
        "bootstrap_servers": list(config.bootstrap_servers),
        "security_protocol": config.security_protocol,
        "request_timeout_ms": config.request_timeout_ms,
    }
    if config.client_id:
        options["client_id"] = config.client_id
    if config.security_protocol in ("SSL", "SASL_SSL"):
        context = create_ssl_context(cafile=config.ssl_cafile, certfile=config.ssl_certfile,
                                     keyfile=config.ssl_keyfile, password=config.ssl_password)
        context.check_hostname = config.ssl_check_hostname
        options["ssl_context"] = context
    if config.sasl_mechanism is not None:
        options["sasl_mechanism"] = config.sasl_mechanism
        options["sasl_plain_username"] = config.sasl_plain_username
        options["sasl_plain_password"] = config.sasl_plain_password
        options["sasl_kerberos_service_name"] = config.sasl_kerberos_service_name
    return options


# --------------------------------------------------------------------------- the event


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _record_text(record: ConsumerRecord[bytes, bytes], topic_json: str) -> str:
    key = "" if record.key is None else f'"key":"{_b64(record.key)}",'
    value = "null" if record.value is None else f'"{_b64(record.value)}"'
    headers = ",".join(f'{{{json.dumps(name)}:[{",".join(map(str, data or b""))}]}}'
                       for name, data in record.headers)
    kind = "LOG_APPEND_TIME" if record.timestamp_type == 1 else "CREATE_TIME"
    return (f'{{"topic":{topic_json},"partition":{record.partition},"offset":{record.offset},'
            f'"timestamp":{record.timestamp},"timestampType":"{kind}",{key}"value":{value},'
            f'"headers":[{headers}]}}')


def kafka_event_json(records: Sequence[ConsumerRecord[bytes, bytes]],
                     bootstrap_servers: Sequence[str]) -> str:
    """Lambda's self-managed Kafka event as JSON text, written directly (the hot path: no
    dict in between); base64 key and value, headers as lists of byte values."""
    grouped: dict[tuple[str, int], list[str]] = {}
    topics: dict[str, str] = {}
    for record in records:
        topic_json = topics.get(record.topic) or topics.setdefault(record.topic,
                                                                   json.dumps(record.topic))
        grouped.setdefault((record.topic, record.partition), []).append(
            _record_text(record, topic_json))
    parts = ",".join(f'{json.dumps(f"{topic}-{partition}")}:[{",".join(items)}]'
                     for (topic, partition), items in grouped.items())
    servers = json.dumps(",".join(bootstrap_servers))
    return (f'{{"eventSource":"SelfManagedKafka","bootstrapServers":{servers},'
            f'"records":{{{parts}}}}}')


def first_failed_offset(payload: Any, offsets: Sequence[int]) -> int | None:
    """The lowest offset the handler reported in ``batchItemFailures``, else None.

    As on Lambda, a failure naming no record of the batch fails the whole batch (returns the
    batch's first offset); an empty list means every record succeeded.
    """
    if not isinstance(payload, Mapping) or "batchItemFailures" not in payload:
        return None
    failures = payload.get("batchItemFailures")
    if not failures:
        return None
    valid = set(offsets)
    lowest: int | None = None
    for item in failures if isinstance(failures, list) else [failures]:
        identifier = item.get("itemIdentifier") if isinstance(item, Mapping) else None
        try:
            offset = int(str(identifier))
        except ValueError:
            return offsets[0]
        if offset not in valid:
            return offsets[0]
        lowest = offset if lowest is None else min(lowest, offset)
    return lowest


# --------------------------------------------------------------------------- partitions


@dataclass(eq=False)
class _Partition:
    """What the trigger holds for one assigned partition."""

    tp: TopicPartition
    records: deque[ConsumerRecord[bytes, bytes]] = field(default_factory=deque)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    first_at: float | None = None
    next_offset: int | None = None
    committed: int | None = None
    in_flight: int = 0
    revoking: bool = False
    revoked: bool = False
    task: asyncio.Task[None] | None = None

    @property
    def key(self) -> str:
        return f"{self.tp.topic}-{self.tp.partition}"


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, trigger: KafkaTrigger) -> None:
        self.trigger = trigger

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.trigger._revoke(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.trigger._assign(assigned)


@dataclass
class _Counters:
    batches: int = 0
    records: int = 0
    failed_invocations: int = 0
    retries: int = 0
    sent_to_on_failure: int = 0
    commits: int = 0
    commit_failures: int = 0
    rebalances: int = 0


class KafkaTrigger(Trigger):
    config_model: ClassVar[type[TriggerConfig]] = KafkaTriggerConfig
    config: KafkaTriggerConfig

    #: how long the poll loop waits for records when nothing is due sooner
    poll_timeout_ms = 200

    def __init__(self, config: TriggerConfig, host: TriggerHost) -> None:
        assert isinstance(config, KafkaTriggerConfig)
        super().__init__(config, host)
        self._consumer: AIOKafkaConsumer | None = None
        self._partitions: dict[TopicPartition, _Partition] = {}
        self._orphans: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._to_commit: dict[TopicPartition, tuple[_Partition, int]] = {}
        self._next_round: asyncio.Future[None] | None = None
        self._committer: asyncio.Task[None] | None = None
        self._background: set[asyncio.Future[None]] = set()
        self._stopping = False
        self._state = "stopped"
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._counters = _Counters()
        self._own_destinations: Any = None
        fn = self._function_config()
        self._timeout_s = float(getattr(fn, "timeout_s", 3.0))
        # like the durable queue: without a destination, exhausted batches are dead letters
        self._on_failure = self._destinations_for(config.on_failure, fn, "on_failure") or ["dlq"]
        self._on_success = self._destinations_for(config.on_success, fn, "on_success")

    # ---------------------------------------------------------------- config time

    @classmethod
    def check(cls, trigger_config: TriggerConfig, function_config: Any) -> list[str]:
        """Problems that need the function's config too; each is one message."""
        assert isinstance(trigger_config, KafkaTriggerConfig)
        timeout_ms = float(getattr(function_config, "timeout_s", 0)) * 1000
        if trigger_config.max_poll_interval_ms <= timeout_ms:
            return [f"max_poll_interval_ms ({trigger_config.max_poll_interval_ms}) must be "
                    f"longer than the function's timeout ({timeout_ms:.0f} ms), or a batch "
                    "still running would make the group rebalance"]
        return []

    def _function_config(self) -> Any:
        config = getattr(self.host, "config", None)
        functions = getattr(config, "functions", None) or {}
        return functions.get(self.config.function)

    def _destinations_for(self, own: str | None, fn: Any, key: str) -> list[str]:
        if own is not None:
            names = [own]
        else:
            value = getattr(fn, key, None)
            names = [] if value is None else ([value] if isinstance(value, str) else list(value))
        servers = ",".join(self.config.bootstrap_servers)
        return [f"{n}@{servers}" if n.startswith("kafka:") and "@" not in n else n
                for n in names]

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self._stopping = False
        self._state = "connecting"
        self._task = asyncio.create_task(self._run(), name=f"kafka:{self.name}")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._consumer is not None:
            await self._revoke(list(self._partitions))
            consumer, self._consumer = self._consumer, None
            try:  # leaves the group, so the partitions move to others at once
                await asyncio.wait_for(consumer.stop(), self.config.request_timeout_ms / 1000)
            except Exception as exc:
                self._error(f"stop: {exc!r}")
        if self._orphans:
            await asyncio.wait(self._orphans, timeout=self._timeout_s + 1)
            for task in self._orphans:
                task.cancel()
        if self._own_destinations is not None:
            await self._own_destinations.close()
        self._state = "stopped"

    def _new_consumer(self) -> AIOKafkaConsumer:
        config = self.config
        return AIOKafkaConsumer(
            group_id=config.group,
            enable_auto_commit=False,
            auto_offset_reset=config.starting_position,
            max_poll_interval_ms=config.max_poll_interval_ms,
            session_timeout_ms=config.session_timeout_ms,
            heartbeat_interval_ms=config.heartbeat_interval_ms,
            max_partition_fetch_bytes=config.max_partition_fetch_bytes,
            fetch_max_bytes=config.fetch_max_bytes,
            rebalance_timeout_ms=config.max_poll_interval_ms,
            **client_options(config),
        )

    async def _connect(self) -> AIOKafkaConsumer:
        """Start a consumer, retrying with capped exponential backoff until it connects."""
        backoff_s = 0.5
        while True:
            consumer = self._new_consumer()
            try:
                await consumer.start()
            except asyncio.CancelledError:
                await asyncio.shield(consumer.stop())
                raise
            except KafkaError as exc:
                self._error(f"cannot connect to {','.join(self.config.bootstrap_servers)}: "
                            f"{exc}")
                with contextlib.suppress(Exception):
                    await consumer.stop()
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 30)
                continue
            listener = _Listener(self)
            if self.config.topics is not None:
                consumer.subscribe(topics=list(self.config.topics), listener=listener)
            else:
                consumer.subscribe(pattern=self.config.topic_pattern, listener=listener)
            return consumer

    async def _run(self) -> None:
        self._consumer = await self._connect()
        self._state = "running"
        while not self._stopping:
            try:
                await self._poll_once(self._consumer)
            except asyncio.CancelledError:
                raise
            except KafkaError as exc:
                self._error(f"poll: {exc}")
                await asyncio.sleep(0.5)
            except Exception as exc:  # the loop must survive anything a poll raises
                log.exception("kafka trigger %s: poll failed", self.name)
                self._error(f"poll: {exc!r}")
                await asyncio.sleep(0.5)

    async def _poll_once(self, consumer: AIOKafkaConsumer) -> None:
        """Move every record aiokafka has fetched into the partitions' buffers.

        Draining aiokafka completely keeps its fetcher busy (it does not fetch from a broker
        while any partition there still has unread records); ``_apply_backpressure`` bounds
        the buffers by pausing partitions instead.
        """
        data = await consumer.getmany(timeout_ms=self.poll_timeout_ms)
        now = time.monotonic()
        for tp, records in data.items():
            part = self._partitions.get(tp)
            if part is None or part.revoking:
                continue
            for record in records:
                if part.next_offset is None or record.offset >= part.next_offset:
                    part.records.append(record)
                    part.next_offset = record.offset + 1
            if part.first_at is None and part.records:
                part.first_at = now
            part.arrived.set()
        self._apply_backpressure(consumer)

    def _should_pause(self, part: _Partition, room: bool, paused: bool) -> bool:
        """Pause at two buffered batches (one while the function has no room), resume below
        one: a partition never holds more than that plus one fetch response."""
        buffered, size = len(part.records), self.config.batch_size
        if buffered >= 2 * size or (buffered >= size and (paused or not room)):
            return True
        return False

    def _apply_backpressure(self, consumer: AIOKafkaConsumer) -> None:
        room = self.host.has_capacity(self.config.function)
        paused = consumer.paused()
        pause, resume = [], []
        for tp, part in self._partitions.items():
            if part.revoking:
                continue
            should = self._should_pause(part, room, tp in paused)
            if should and tp not in paused:
                pause.append(tp)
            elif not should and tp in paused:
                resume.append(tp)
        if pause:
            consumer.pause(*pause)
        if resume:
            consumer.resume(*resume)

    def _want_more(self, part: _Partition) -> None:
        """A worker took a batch: resume its partition if it has room for more."""
        consumer = self._consumer
        if consumer is None or part.revoking or part.tp not in consumer.paused():
            return
        if not self._should_pause(part, self.host.has_capacity(self.config.function), True):
            consumer.resume(part.tp)

    # ---------------------------------------------------------------- rebalances

    def _assign(self, assigned: list[TopicPartition]) -> None:
        self._counters.rebalances += 1
        consumer = self._consumer
        for tp in assigned:
            if tp in self._partitions:
                continue
            part = _Partition(tp)
            self._partitions[tp] = part
            part.task = asyncio.create_task(self._work(part), name=f"kafka:{tp}")
        if consumer is not None:
            with contextlib.suppress(Exception):
                consumer.resume(*assigned)

    async def _revoke(self, revoked: list[TopicPartition]) -> None:
        """Let the batches of ``revoked`` finish (bounded), then forget those partitions."""
        parts = [self._partitions[tp] for tp in revoked if tp in self._partitions]
        for part in parts:
            part.revoking = True
            part.arrived.set()
        tasks = {part.task for part in parts if part.task is not None and not part.task.done()}
        if tasks:
            await asyncio.wait(tasks, timeout=self._timeout_s + 1)
        await self._flush_commits()
        for part in parts:
            part.revoked = True
            self._partitions.pop(part.tp, None)
            if part.task is not None and not part.task.done():
                self._orphans.add(part.task)  # abandoned: it will not commit
                part.task.add_done_callback(self._orphans.discard)

    # ---------------------------------------------------------------- one partition

    async def _work(self, part: _Partition) -> None:
        """Invoke one batch at a time for ``part`` until it is revoked."""
        while not part.revoking:
            batch = await self._next_batch(part)
            if not batch:
                continue
            part.in_flight = len(batch)
            try:
                await self._deliver(part, batch)
            except Exception as exc:  # never lose the batch: read it again from the broker
                log.exception("kafka trigger %s: %s: delivery failed", self.name, part.key)
                self._error(f"{part.key}: delivery failed: {exc!r}")
                self._rewind(part, batch[0].offset)
                await asyncio.sleep(1)
            finally:
                part.in_flight = 0
            self._want_more(part)

    def _rewind(self, part: _Partition, offset: int) -> None:
        """Drop what is buffered for ``part`` and fetch again from ``offset``."""
        part.records.clear()
        part.first_at = None
        part.next_offset = None
        if self._consumer is not None and not part.revoking:
            with contextlib.suppress(Exception):
                self._consumer.seek(part.tp, offset)

    async def _next_batch(self, part: _Partition) -> list[ConsumerRecord[bytes, bytes]]:
        size = self.config.batch_size
        window_s = self.config.batch_window_ms / 1000
        while not part.revoking:
            if len(part.records) >= size:
                break
            if part.records and part.first_at is not None:
                remaining_s = window_s - (time.monotonic() - part.first_at)
                if remaining_s <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(part.arrived.wait(), remaining_s)
            else:
                await part.arrived.wait()
            part.arrived.clear()
        if part.revoking:
            return []
        count = min(size, len(part.records))
        batch = [part.records.popleft() for _ in range(count)]
        part.first_at = time.monotonic() if part.records else None
        self._want_more(part)
        return batch

    async def _deliver(self, part: _Partition, batch: list[ConsumerRecord[bytes, bytes]]) -> None:
        """Invoke until the batch succeeds or its retries run out; commit as it goes."""
        pending = batch
        failures = 0
        while pending and not part.revoking:
            await self.host.wait_for_capacity(self.config.function)
            event_json = kafka_event_json(pending, self.config.bootstrap_servers)
            try:
                result = await self._invoke(event_json)
            except TooManyRequestsException as exc:
                if exc.reason == "ShuttingDown":
                    return  # uncommitted: the next owner (or the next start) gets it again
                await asyncio.sleep(0.05)  # throttled: not a failure, wait for room
                continue
            except FlowrunError as exc:  # shutting down or not runnable: leave it uncommitted
                self._error(f"invoke: {exc}")
                return
            self._counters.batches += 1
            offsets = [r.offset for r in pending]
            failed_at: int | None
            if result.ok:
                try:
                    failed_at = first_failed_offset(result.payload, offsets)
                except ValueError:
                    failed_at = None
                if failed_at is None:
                    self._counters.records += len(pending)
                    if self.config.pipeline_commits:  # overlap the commit with the next batch
                        self._spawn(self._commit(part, pending[-1].offset + 1))
                    else:
                        await self._commit(part, pending[-1].offset + 1)
                    if self._on_success:
                        record = self._success_record(result, json.loads(event_json))
                        await self._send(self._on_success, record)
                    return
            else:
                failed_at = offsets[0]
                self._error(f"{part.key}: batch at offset {offsets[0]} failed: "
                            f"{result.error_type}: {result.error_message}")
            self._counters.failed_invocations += 1
            if failed_at > offsets[0]:  # partial success: commit what succeeded, reset budget
                done = [r for r in pending if r.offset < failed_at]
                self._counters.records += len(done)
                await self._commit(part, failed_at)
                pending = [r for r in pending if r.offset >= failed_at]
                failures = 0
            failures += 1
            if failures > self.config.max_retries:
                record = self._failure_record(result, pending, failures)
                if await self._send(self._on_failure, record, persist=True):
                    self._counters.sent_to_on_failure += len(pending)
                    await self._commit(part, pending[-1].offset + 1)
                return
            self._counters.retries += 1
            await self._sleep_unless_revoked(part, self._backoff_s(failures))

    async def _invoke(self, event_json: str) -> Any:
        """Invoke with the event as JSON text when the host takes it (the Runtime does)."""
        invoke_json = getattr(self.host, "invoke_json", None)
        if invoke_json is not None:
            return await invoke_json(self.config.function, event_json, source=self.name)
        return await self.host.invoke(self.config.function, json.loads(event_json),
                                      source=self.name)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _flush_commits(self) -> None:
        if self._background:
            await asyncio.wait(set(self._background), timeout=self.config.request_timeout_ms / 1000)

    def _backoff_s(self, failures: int) -> float:
        return float(min(self.config.retry_backoff_ms / 1000 * 2 ** (failures - 1), 60.0))

    async def _sleep_unless_revoked(self, part: _Partition, delay_s: float) -> None:
        part.arrived.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._until_revoked(part), delay_s)

    async def _until_revoked(self, part: _Partition) -> None:
        while not part.revoking:
            await part.arrived.wait()
            part.arrived.clear()
        part.arrived.set()

    async def _commit(self, part: _Partition, offset: int) -> None:
        """Commit ``offset`` for ``part`` and return once the broker answered.

        Commits of all partitions are coalesced: while one commit request is out, the
        offsets that come in meanwhile wait and go together in the next request.
        """
        if self._consumer is None or part.revoked:
            return
        self._to_commit[part.tp] = (part, offset)
        if self._next_round is None:
            self._next_round = asyncio.get_running_loop().create_future()
        round_done = self._next_round
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_rounds())
        await asyncio.shield(round_done)

    async def _commit_rounds(self) -> None:
        while self._to_commit:
            wanted, self._to_commit = self._to_commit, {}
            round_done, self._next_round = self._next_round, None
            offsets = {tp: offset for tp, (part, offset) in wanted.items() if not part.revoked}
            consumer = self._consumer
            try:
                if offsets and consumer is not None:
                    await consumer.commit(offsets)
                    self._counters.commits += 1
                    for tp, (part, offset) in wanted.items():
                        if tp in offsets:
                            part.committed = offset
            except (CommitFailedError, KafkaError) as exc:
                self._counters.commit_failures += 1
                self._error(f"commit of {offsets} failed: {exc}")
            finally:
                if round_done is not None and not round_done.done():
                    round_done.set_result(None)

    # ---------------------------------------------------------------- destinations

    def _destinations(self) -> Any:
        shared = getattr(self.host, "destinations", None)
        if shared is not None:
            return shared
        if self._own_destinations is None:
            from flowrun.destinations import Destinations

            self._own_destinations = Destinations(self.host)
        return self._own_destinations

    async def _send(self, names: list[str], record: dict[str, Any],
                    persist: bool = False) -> bool:
        """Send ``record`` to every destination. With ``persist`` keep trying until it is sent
        (or the partition is revoked); True when it was sent everywhere."""
        ok = True
        for name in names:
            delay_s = 0.5
            while True:
                try:
                    await self._destinations().send(name, record)
                    break
                except Exception as exc:
                    self._error(f"destination {name}: {exc!r}")
                    if not persist or self._stopping:
                        ok = False
                        break
                    await asyncio.sleep(delay_s)
                    delay_s = min(delay_s * 2, 30)
        return ok

    def _function_arn(self) -> str:
        return f"arn:aws:lambda:us-east-1:000000000000:function:{self.config.function}"

    def _success_record(self, result: Any, event: dict[str, Any]) -> dict[str, Any]:
        return {
            "version": "1.0",
            "timestamp": _iso_now(),
            "requestContext": {"requestId": result.request_id, "functionArn": self._function_arn(),
                               "condition": "Success", "approximateInvokeCount": 1},
            "requestPayload": event,
            "responseContext": {"statusCode": 200, "executedVersion": "$LATEST"},
            "responsePayload": result.payload,
        }

    def _failure_record(self, result: Any, records: list[ConsumerRecord[bytes, bytes]],
                        attempts: int) -> dict[str, Any]:
        """Lambda's on-failure record for a Kafka event source, plus the records themselves."""
        info: dict[str, dict[str, Any]] = {}
        for record in records:
            key = f"{record.topic}-{record.partition}"
            entry = info.setdefault(key, {"firstRecordOffset": str(record.offset),
                                          "firstRecordTimestamp": _iso_ms(record.timestamp)})
            entry["lastRecordOffset"] = str(record.offset)
            entry["lastRecordTimestamp"] = _iso_ms(record.timestamp)
        event_text = kafka_event_json(records, self.config.bootstrap_servers)
        event = json.loads(event_text)
        response: dict[str, Any] = {"statusCode": 200, "executedVersion": "$LATEST"}
        if not result.ok:
            response["functionError"] = "Unhandled"
        return {
            "version": "1.0",
            "timestamp": _iso_now(),
            "requestContext": {"requestId": result.request_id or str(uuid.uuid4()),
                               "functionArn": self._function_arn(),
                               "condition": "RetryAttemptsExhausted",
                               "approximateInvokeCount": attempts},
            "responseContext": response,
            "responsePayload": result.error if not result.ok else result.payload,
            "KafkaBatchInfo": {"batchSize": len(records),
                               "bootstrapServers": ",".join(self.config.bootstrap_servers),
                               "payloadSize": len(event_text.encode()),  # what was invoked
                               "recordsInfo": info},
            "requestPayload": event,  # the records themselves: `flowrun dlq` can redrive them
        }

    # ---------------------------------------------------------------- status

    def _error(self, message: str) -> None:
        log.warning("kafka trigger %s: %s", self.name, message)
        self._last_error = message
        self._last_error_at = time.time()

    def status(self) -> dict[str, Any]:
        consumer = self._consumer
        paused = consumer.paused() if consumer is not None else set()
        parts = sorted(self._partitions.values(), key=lambda p: (p.tp.topic, p.tp.partition))
        committed: dict[str, int | None] = {}
        lag: dict[str, int] = {}
        for part in parts:
            committed[part.key] = part.committed
            highwater = consumer.highwater(part.tp) if consumer is not None else None
            start = part.committed if part.committed is not None else (
                part.records[0].offset if part.records else part.next_offset)
            if highwater is not None and start is not None:
                lag[part.key] = max(0, highwater - start)
        counters = self._counters
        return {
            "state": self._state,
            "group_id": self.config.group,
            "topics": list(self.config.topics or []) or self.config.topic_pattern,
            "assigned": [p.key for p in parts],
            "paused": sorted(f"{tp.topic}-{tp.partition}" for tp in paused),
            "buffered_records": sum(len(p.records) for p in parts),
            "in_flight_records": sum(p.in_flight for p in parts),
            "committed": committed,
            "lag": lag,
            "batches": counters.batches,
            "records": counters.records,
            "failed_invocations": counters.failed_invocations,
            "retries": counters.retries,
            "sent_to_on_failure": counters.sent_to_on_failure,
            "commits": counters.commits,
            "commit_failures": counters.commit_failures,
            "rebalances": counters.rebalances,
            "last_error": self._last_error,
            "last_error_at": self._last_error_at,
        }


def _iso_now() -> str:
    return _iso_ms(int(time.time() * 1000))


def _iso_ms(epoch_ms: int) -> str:
    seconds, millis = divmod(int(epoch_ms), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


# --------------------------------------------------------------------------- destination


class KafkaDestination:
    """``kafka:TOPIC`` (or ``kafka:TOPIC@host:port,host:port``): each record as JSON.

    Without ``@servers`` the brokers come from the first Kafka trigger of the runtime's
    config (with its security settings), else from ``$FLOWRUN_KAFKA_BOOTSTRAP_SERVERS``.
    """

    def __init__(self, target: str, host: Any) -> None:
        topic, _, servers = target.partition("@")
        if not topic:
            raise ValueError("kafka destination needs a topic: kafka:TOPIC")
        self.topic = topic
        self.options = self._options(servers, host)
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()

    @staticmethod
    def _options(servers: str, host: Any) -> dict[str, Any]:
        config = getattr(host, "config", None)
        template = next((t for t in getattr(config, "triggers", None) or []
                         if isinstance(t, KafkaTriggerConfig)), None)
        options = client_options(template) if template is not None else {}
        if servers:
            options["bootstrap_servers"] = [s.strip() for s in servers.split(",") if s.strip()]
        elif template is None:
            env = os.environ.get(SERVERS_ENV, "")
            if not env:
                raise ValueError("kafka destination: no brokers; write kafka:TOPIC@host:port, "
                                 f"add a kafka trigger, or set {SERVERS_ENV}")
            options["bootstrap_servers"] = [s.strip() for s in env.split(",") if s.strip()]
        return options

    async def _started(self) -> AIOKafkaProducer:
        async with self._lock:
            if self._producer is None:
                producer = AIOKafkaProducer(acks="all", **self.options)
                try:
                    await producer.start()
                except BaseException:
                    await producer.stop()
                    raise
                self._producer = producer
            return self._producer

    async def send(self, record: dict[str, Any]) -> None:
        producer = await self._started()
        context = record.get("requestContext") or {}
        key = str(context.get("requestId") or "").encode() or None
        await producer.send_and_wait(self.topic, json.dumps(record).encode(), key=key)

    async def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()
