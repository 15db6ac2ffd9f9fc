"""Destinations: where a function's result (``on_success``) or failure (``on_failure``) goes.

A destination is named ``scheme:target`` in the config: ``folder:PATH``, ``function:NAME``,
``dlq``, ``kafka:TOPIC``, ``mqtt:TOPIC``. Each scheme is a class found lazily by name (the
Kafka and MQTT ones live with their triggers, so their client libraries load only when used).
``Destinations`` keeps one open instance per target for a runtime and closes them on stop.
"""

from __future__ import annotations

import importlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Protocol


class DestinationHost(Protocol):
    @property
    def state_dir(self) -> Path: ...

    @property
    def config_dir(self) -> Path: ...


class Destination(Protocol):
    async def send(self, record: dict[str, Any]) -> None: ...

    async def close(self) -> None: ...


SCHEMES = {
    "folder": "flowrun.destinations:FolderDestination",
    "function": "flowrun.destinations:FunctionDestination",
    "dlq": "flowrun.destinations:DeadLetterDestination",
    "kafka": "triggers.kafka:KafkaDestination",
    "mqtt": "triggers.mqtt:MqttDestination",
}


def split(name: str) -> tuple[str, str]:
    scheme, _, target = name.partition(":")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown destination {name!r}; valid: "
                         "folder:PATH, function:NAME, dlq, kafka:TOPIC, mqtt:TOPIC")
    return scheme, target


class FolderDestination:
    """One JSON file per record, written atomically (temp file, fsync, rename)."""

    def __init__(self, target: str, host: DestinationHost) -> None:
        path = Path(target)
        self.folder = path if path.is_absolute() else host.config_dir / path
        self.folder.mkdir(parents=True, exist_ok=True)

    async def send(self, record: dict[str, Any]) -> None:
        context = record.get("requestContext") or {}
        request_id = context.get("requestId") or str(uuid.uuid4())
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        final = self.folder / f"{stamp}-{request_id}.json"
        temp = self.folder / f".{final.name}.tmp"
        with open(temp, "w", encoding="utf-8") as file:
            json.dump(record, file, indent=2)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, final)

    async def close(self) -> None:
        pass


def __getattr__(name: str) -> Any:
    # FunctionDestination and DeadLetterDestination come with the durable queue.
    raise AttributeError(name)


class Destinations:
    def __init__(self, host: DestinationHost) -> None:
        self.host = host
        self._open: dict[str, Destination] = {}

    def get(self, name: str) -> Destination:
        if name not in self._open:
            scheme, target = split(name)
            module_name, _, attr = SCHEMES[scheme].partition(":")
            cls = getattr(importlib.import_module(module_name), attr)
            self._open[name] = cls(target, self.host)
        return self._open[name]

    async def send(self, name: str, record: dict[str, Any]) -> None:
        await self.get(name).send(record)

    async def close(self) -> None:
        for destination in self._open.values():
            await destination.close()
        self._open.clear()
