"""MQTT messages/s: through flowrun's MQTT trigger vs a bare aiomqtt subscriber, one run.

Both read the same kind of stream from the same Mosquitto (started here on a free port):
N messages are published with ``mosquitto_pub -l`` into a persistent session while the
reader is away, then the reader connects and the clock runs from its connecting until the
N-th message is done — for the bare subscriber, received (and auto-acknowledged); for the
trigger, invoked in a warm worker and acknowledged (manual ack after the invocation).
Scenarios: QoS 0 and QoS 1 with batches of 100, and QoS 1 with batch size 1.

    python3 benchmarks/bench_mqtt.py [--messages 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import textwrap
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiomqtt  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

from flowrun import config as config_module  # noqa: E402
from flowrun.runtime import Runtime  # noqa: E402
from tests.brokers.mqtt import Mosquitto  # noqa: E402
from triggers.mqtt import MqttTrigger  # noqa: E402

HANDLER = "def handler(event, context):\n    return len(event['records'])\n"


@dataclass(frozen=True)
class Scenario:
    qos: int
    batch_size: int


def session_properties() -> Properties:
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 3600
    return properties


def bare_client(broker: Mosquitto, client_id: str) -> aiomqtt.Client:
    return aiomqtt.Client("127.0.0.1", broker.port, identifier=client_id,
                          protocol=aiomqtt.ProtocolVersion.V5, clean_start=False,
                          properties=session_properties())


async def bare_rate(broker: Mosquitto, topic: str, qos: int, messages: int) -> float:
    client_id = f"bench-bare-{uuid.uuid4().hex[:8]}"
    async with bare_client(broker, client_id) as client:
        await client.subscribe(topic, qos=qos)
    broker.publish_lines(topic, [f'{{"n": {i}}}' for i in range(messages)], qos=qos)
    received = 0
    started = time.perf_counter()
    async with bare_client(broker, client_id) as client:
        async for _ in client.messages:
            received += 1
            if received == messages:
                break
        return messages / (time.perf_counter() - started)


def runtime_for(folder: Path, broker: Mosquitto, topic: str, scenario: Scenario,
                name: str) -> Runtime:
    """A runtime whose trigger the benchmark starts itself (start_triggers=False)."""
    text = textwrap.dedent(f"""
        state_dir: state
        functions:
          count: {{handler: bench_mqtt_handler.handler, code: ., concurrency: 2, timeout_s: 30}}
        triggers:
          - type: mqtt
            name: {name}
            function: count
            url: {broker.url}
            topics: ["{topic}"]
            qos: {scenario.qos}
            batch_size: {scenario.batch_size}
            batch_window_ms: 50
            max_queued_messages: 1000000
            invocation: sync
        """)
    (folder / "flowrun.yaml").write_text(text)
    return Runtime(config_module.load(folder / "flowrun.yaml"), start_triggers=False)


async def trigger_rate(folder: Path, broker: Mosquitto, topic: str, scenario: Scenario,
                       messages: int) -> float:
    """Time a fresh trigger (its session made beforehand) over a warm runtime."""
    name = f"bench-{uuid.uuid4().hex[:8]}"
    runtime = runtime_for(folder, broker, topic, scenario, name)
    async with runtime:
        await runtime.invoke("count", {"records": []})  # warm workers, as on a running daemon
        await runtime.invoke("count", {"records": []})
        first = MqttTrigger(runtime.config.triggers[0], runtime)
        await first.start()  # makes the persistent session
        await first.stop()
        broker.publish_lines(topic, [f'{{"n": {i}}}' for i in range(messages)], qos=scenario.qos)
        trigger = MqttTrigger(runtime.config.triggers[0], runtime)
        started = time.perf_counter()
        await trigger.start()
        try:
            deadline = started + 600
            while trigger.counters["invoked"] + trigger.counters["dropped"] < messages:
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"the trigger stalled: {trigger.status()}")
                await asyncio.sleep(0.002)
            if trigger.counters["dropped"]:
                raise RuntimeError(f"the trigger dropped messages: {trigger.status()}")
            return messages / (time.perf_counter() - started)
        finally:
            await trigger.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    scenarios = [Scenario(0, 100), Scenario(1, 100), Scenario(1, 1)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "bench_mqtt_handler.py").write_text(HANDLER)
        broker = Mosquitto(folder / "broker", extra_config=("queue_qos0_messages true",))
        broker.start()
        try:
            print(f"{'scenario':<18}{'bare msg/s':>12}{'trigger msg/s':>15}{'ratio':>8}")
            for scenario in scenarios:
                count = args.messages if scenario.batch_size > 1 else args.messages // 4
                bare, through = [], []
                for _ in range(args.rounds):
                    topic = f"bench/{uuid.uuid4().hex[:8]}"
                    bare.append(await bare_rate(broker, topic, scenario.qos, count))
                    through.append(await trigger_rate(folder, broker, topic + "-t", scenario,
                                                      count))
                b, t = statistics.median(bare), statistics.median(through)
                label = f"qos {scenario.qos} batch {scenario.batch_size}"
                print(f"{label:<18}{b:>12,.0f}{t:>15,.0f}{t / b:>8.2f}")
        finally:
            broker.stop()


if __name__ == "__main__":
    asyncio.run(main())
