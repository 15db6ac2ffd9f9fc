"""Destinations: where a function's result (``on_success``) or failure (``on_failure``) goes.

A destination is named ``scheme:target`` in the config: ``folder:PATH``, ``function:NAME``,
``dlq``, ``kafka:TOPIC``, ``mqtt:TOPIC``. Each scheme is a class found lazily by name (the
Kafka and MQTT ones live with their triggers, so their client libraries load only when used).
``Destinations`` keeps one open instance per target for a runtime and closes them on stop.
"""

from __future__ import annotations

import asyncio
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
        # the fsync must not stall the event loop (the queue's consumers share it)
        await asyncio.to_thread(self._write, record)

    def _write(self, record: dict[str, Any]) -> None:
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


def _function_of(context: dict[str, Any]) -> str:
    """The function name in a record's ``functionArn`` (``...:function:NAME:$LATEST``)."""
    return str(context.get("functionArn", "")).split(":function:")[-1].split(":")[0]


class FunctionDestination:
    """Queue the record as the event of another function (a pipeline's next step).

    The next invocation's request id is derived from the record's, so a step that runs again
    after a crash hands its successor the same request id (idempotent handlers stay so).
    The queue's bound does not apply: a finished step's result is never throttled away.
    """

    def __init__(self, target: str, host: DestinationHost) -> None:
        self.function = target
        self.host = host

    async def send(self, record: dict[str, Any]) -> None:
        from flowrun.queue import derived_request_id

        queue = getattr(self.host, "async_queue", None)
        if queue is None:
            raise RuntimeError(f"function:{self.function} needs the durable queue")
        context = record.get("requestContext") or {}
        request_id = derived_request_id(str(context.get("requestId") or uuid.uuid4()),
                                        f"function:{self.function}")
        await queue.enqueue(self.function, json.dumps(record),
                            source=f"function:{_function_of(context)}", request_id=request_id,
                            bounded=False)

    async def close(self) -> None:
        pass


class DeadLetterDestination:
    """Keep the record in the dead-letter store (``flowrun dlq``).

    The queue writes its own failures to the store directly, with every attempt's error; this
    class is for records that arrive from elsewhere.
    """

    def __init__(self, target: str, host: DestinationHost) -> None:
        self.host = host

    async def send(self, record: dict[str, Any]) -> None:
        from flowrun import dlq

        context = record.get("requestContext") or {}
        response = record.get("responsePayload")
        condition = str(context.get("condition", "Success"))
        attempts = int(context.get("approximateInvokeCount") or 0)
        errors: list[dict[str, Any]] = []
        if condition != "Success" and isinstance(response, dict):
            errors.append({"kind": "function", "attempt": attempts, "at": dlq.iso(time.time()),
                           "errorType": response.get("errorType"),
                           "errorMessage": response.get("errorMessage")})
        letter: dict[str, Any] = {
            "request_id": str(context.get("requestId") or uuid.uuid4()),
            "function": _function_of(context),
            "event_json": json.dumps(record.get("requestPayload")),
            "source": "destination", "condition": condition, "attempts": attempts,
            "errors": errors, "enqueued_at": time.time(), "failed_at": time.time(),
            "record": record,
        }
        queue = getattr(self.host, "async_queue", None)
        if queue is not None and queue.journal.db is not None:
            await queue.keep_dead_letter(**letter)  # group-committed with the queue's writes
            return
        await asyncio.to_thread(self._write, letter)

    def _write(self, letter: dict[str, Any]) -> None:
        from flowrun import dlq

        db = dlq.open_store(self.host.state_dir)
        try:
            dlq.add(db, **letter)
        finally:
            db.close()

    async def close(self) -> None:
        pass


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
