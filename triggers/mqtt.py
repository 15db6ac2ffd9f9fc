"""The MQTT trigger (aiomqtt over paho-mqtt, MQTT 5) and the ``mqtt:`` destination.

Each message becomes a record; records are batched by count (``batch_size``, default 1)
and time (``batch_window_ms``) into ``{"eventSource": "flowrun:mqtt", "records": [...]}``.

Delivery is at-least-once for QoS 1 and 2: the trigger turns paho's automatic
acknowledgement off and sends PUBACK (QoS 1) / PUBCOMP (QoS 2) only after the batch's
invocation finished, or was durably queued (``invocation: event``, the default). aiomqtt 2.5 has no public
manual-ack API, so the trigger reaches the paho client aiomqtt wraps — ``aiomqtt.Client._client``,
the one private attribute used — to call ``manual_ack_set(True)`` and ``ack(mid, qos)``, and to
receive paho's own ``MQTTMessage`` (which, unlike aiomqtt's ``Message``, carries the ``dup``
flag). Everything else (connecting, TLS, the socket callbacks, SUBACK, DISCONNECT) is aiomqtt's.

Sessions are MQTT 5 persistent sessions (``clean_start`` false, a session expiry interval), so a
message published while the trigger is away is queued by the broker and delivered after it
reconnects, and a message that was delivered but not acknowledged is delivered again (with
``dup`` set). Every connection gets a fresh client; acknowledgements of QoS 1 messages
received on an earlier connection are dropped (the broker redelivers those).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import ssl
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import AfterValidator, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from flowrun.types import (
    FlowrunError,
    InvocationMode,
    RequestTooLargeException,
    TooManyRequestsException,
)
from triggers.base import Trigger, TriggerConfig, TriggerHost

log = logging.getLogger("flowrun.mqtt")

EVENT_SOURCE = "flowrun:mqtt"
URL_ENV = "FLOWRUN_MQTT_URL"
DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


# --------------------------------------------------------------------------- config


def topic_filter_problem(topic: str) -> str | None:
    """Why ``topic`` is not a valid MQTT subscription filter, or None if it is."""
    if not topic:
        return "a topic filter cannot be empty"
    if "\x00" in topic:
        return "a topic filter cannot contain NUL"
    if len(topic.encode("utf-8")) > 65_535:
        return "a topic filter is at most 65535 bytes"
    if topic.startswith("$share/"):
        parts = topic.split("/", 2)
        if len(parts) < 3 or not parts[1]:
            return "a shared subscription is $share/GROUP/FILTER with a non-empty GROUP"
        if "+" in parts[1] or "#" in parts[1]:
            return "a shared subscription's group name cannot contain + or #"
        if not parts[2]:
            return "a shared subscription needs a filter after $share/GROUP/"
        return topic_filter_problem(parts[2])
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "'#' must be a whole level and the last one (like a/#)"
        if "+" in level and level != "+":
            return "'+' must be a whole level (like a/+/b), not part of one"
    return None


def parse_url(url: str) -> tuple[str, str, int, str | None, str | None]:
    """``mqtt[s]://[user:password@]host[:port]`` → (scheme, host, port, user, password)."""
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS:
        raise ValueError(f"expected an mqtt:// or mqtts:// URL, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"the URL names no host: {url!r}")
    port = parts.port or DEFAULT_PORTS[parts.scheme]
    user = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return parts.scheme, parts.hostname, port, user, password


def _valid_filter(topic: str) -> str:
    problem = topic_filter_problem(topic)
    if problem:
        raise PydanticCustomError("topic_filter", "invalid topic filter: {reason}",
                                  {"reason": problem})
    return topic


TopicFilter = Annotated[str, AfterValidator(_valid_filter)]


class MqttConfig(TriggerConfig):
    """Keys of ``type: mqtt``."""

    url: str = Field(description="mqtt://[user:password@]host[:port] or mqtts://...")
    topics: list[TopicFilter] = Field(min_length=1,
                              description="topic filters: + and # wildcards, $share/GROUP/FILTER")
    qos: Literal[0, 1, 2] = Field(1, description="subscription QoS")
    client_id: str | None = Field(None, max_length=256,
                                  description="default: flowrun-HOSTNAME-TRIGGER, stable")
    clean_session: bool = Field(False, description="true: forget the session on every connect")
    session_expiry_s: int = Field(86_400, ge=0, le=4_294_967_295,
                                  description="how long the broker keeps an offline session")
    retained: Literal["deliver", "skip"] = "deliver"
    batch_size: int = Field(1, ge=1, le=10_000)
    batch_window_ms: int = Field(0, ge=0, le=300_000,
                                 description="wait this long for a batch to fill")
    max_in_flight_batches: int = Field(10, ge=1, le=1000,
                                       description="batches invoked at once (1 keeps order)")
    receive_maximum: int = Field(1000, ge=1, le=65_535,
                                 description="unacknowledged QoS 1/2 messages the broker may send")
    max_queued_messages: int = Field(10_000, ge=1,
                                     description="QoS 0 messages held before dropping")
    keepalive_s: int = Field(60, ge=1, le=65_535)
    connect_timeout_s: float = Field(10, gt=0, le=600)
    reconnect_initial_ms: int = Field(100, ge=1, le=3_600_000)
    reconnect_max_ms: int = Field(30_000, ge=1, le=3_600_000)
    stop_grace_s: float = Field(30, ge=0, le=3600,
                                description="wait this long for in-flight batches on stop")
    invocation: Literal["sync", "event"] = Field(
        "event", description="event: acknowledge once durably queued (the queue retries and "
                             "routes on_success/on_failure); sync: acknowledge once it ran")
    ca_file: Path | None = Field(None, description="CA bundle for mqtts://, relative to the "
                                                    "config's folder")
    tls_insecure: bool = Field(False, description="mqtts:// without checking the certificate")

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        parse_url(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> MqttConfig:
        if self.reconnect_max_ms < self.reconnect_initial_ms:
            raise ValueError("reconnect_max_ms must be at least reconnect_initial_ms")
        if self.qos > 0 and self.receive_maximum < self.batch_size:
            raise ValueError(f"receive_maximum ({self.receive_maximum}) must be at least "
                             f"batch_size ({self.batch_size}), or a QoS {self.qos} batch "
                             "never fills")
        return self


def default_client_id(trigger_name: str) -> str:
    """Stable across restarts (a persistent session is keyed by it), unique per host."""
    raw = f"flowrun-{socket.gethostname()}-{trigger_name}"
    clean = re.sub(r"[^A-Za-z0-9_.\-]", "-", raw)
    if len(clean) <= 64:
        return clean
    return f"{clean[:55]}-{hashlib.sha1(raw.encode()).hexdigest()[:8]}"


def tls_context(scheme: str, ca_file: Path | None, insecure: bool) -> ssl.SSLContext | None:
    if scheme != "mqtts":
        return None
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class Received:
    """A message as paho handed it over, plus the connection it came on."""

    message: paho.MQTTMessage
    connection: int
    received_at: float


def iso_time(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def record_of(item: Received) -> dict[str, Any]:
    """One event record: JSON payloads as JSON values, anything else base64."""
    msg = item.message
    raw = msg.payload
    try:
        payload: Any = json.loads(raw)
        encoding = "json"
    except (ValueError, UnicodeDecodeError):
        payload = base64.b64encode(raw).decode("ascii")
        encoding = "base64"
    return {
        "topic": msg.topic,
        "payload": payload,
        "payloadEncoding": encoding,
        "qos": msg.qos,
        "retain": bool(msg.retain),
        "duplicate": bool(msg.dup),
        "messageId": msg.mid,
        "receivedAt": iso_time(item.received_at),
    }


# --------------------------------------------------------------------------- trigger


class MqttTrigger(Trigger):
    """Subscribe, batch, invoke, then acknowledge; reconnect with capped exponential backoff."""

    config_model = MqttConfig
    config: MqttConfig

    def __init__(self, config: TriggerConfig, host: TriggerHost) -> None:
        super().__init__(config, host)
        cfg = self.config
        self.scheme, self.hostname, self.port, self.username, self.password = parse_url(cfg.url)
        self.client_id = cfg.client_id or default_client_id(self.name)
        self.ca_file = host.config_dir / cfg.ca_file if cfg.ca_file else None
        self.state = "stopped"
        self.counters = dict.fromkeys(
            ("received", "invoked", "batches", "acked", "duplicates", "skipped_retained",
             "dropped", "rejected", "errors", "reconnects"), 0)
        self.last_error: str | None = None
        self.last_error_at: str | None = None
        self._pending: deque[Received] = deque()
        self._arrived = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._connection = 0
        self._in_flight: set[asyncio.Task[None]] = set()
        self._in_flight_messages = 0
        self._slots = asyncio.Semaphore(cfg.max_in_flight_batches)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._window_s = cfg.batch_window_ms / 1000
        self._first_attempt: asyncio.Future[None] | None = None
        self._warned_fallback = False

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Claim the client id, start connecting; returns once the first connect settled."""
        claimed: set[str] = self.host.shared("mqtt:client_ids", set)
        if self.client_id in claimed:
            raise ValueError(f"trigger {self.name}: MQTT client id {self.client_id!r} is used by "
                             "another mqtt trigger; set client_id or name")
        claimed.add(self.client_id)
        first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._first_attempt = first
        self._tasks = [asyncio.create_task(self._connection_loop(), name=f"{self.name} conn"),
                       asyncio.create_task(self._batch_loop(), name=f"{self.name} batches")]
        await asyncio.wait([first, self._tasks[0]],
                           return_when=asyncio.FIRST_COMPLETED)

    async def stop(self) -> None:
        """Stop taking messages, let in-flight batches finish and ack, then disconnect."""
        self._stopping = True
        batches = self._tasks[1:] if self._tasks else []
        for task in batches:
            task.cancel()
        await asyncio.gather(*batches, return_exceptions=True)
        if self._in_flight:
            _, late = await asyncio.wait(self._in_flight, timeout=self.config.stop_grace_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if self._tasks:
            self._tasks[0].cancel()
            await asyncio.gather(self._tasks[0], return_exceptions=True)
        self._tasks = []
        self.host.shared("mqtt:client_ids", set).discard(self.client_id)
        self.state = "stopped"

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "broker": f"{self.scheme}://{self.hostname}:{self.port}",
            "client_id": self.client_id,
            "topics": list(self.config.topics),
            **self.counters,
            "pending": len(self._pending),
            "in_flight": self._in_flight_messages,
            "lag": len(self._pending) + self._in_flight_messages,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
        }

    def _error(self, message: str) -> None:
        self.last_error = message
        self.last_error_at = iso_time(time.time())
        self.counters["errors"] += 1

    # ------------------------------------------------------------ connection

    def _new_client(self) -> aiomqtt.Client:
        cfg = self.config
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 0 if cfg.clean_session else cfg.session_expiry_s
        properties.ReceiveMaximum = cfg.receive_maximum
        client = aiomqtt.Client(
            self.hostname, self.port, username=self.username, password=self.password,
            identifier=self.client_id, protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=cfg.clean_session, keepalive=cfg.keepalive_s,
            timeout=cfg.connect_timeout_s, properties=properties,
            tls_context=tls_context(self.scheme, self.ca_file, cfg.tls_insecure), logger=log,
        )
        # The one reach below aiomqtt: its paho client, for manual acks and the dup flag.
        inner: paho.Client = client._client
        inner.manual_ack_set(True)
        self._connection += 1  # before connecting: messages may follow CONNACK at once
        connection = self._connection
        inner.on_message = lambda _c, _u, message: self._on_message(message, connection)
        return client

    async def _connection_loop(self) -> None:
        delay_ms = self.config.reconnect_initial_ms
        while not self._stopping:
            self.state = "connecting" if self._connection == 0 else "reconnecting"
            try:
                client = self._new_client()
                async with client:
                    self._client = client
                    await self._subscribe(client)
                    self.state = "connected"
                    self._settle_first_attempt()
                    delay_ms = self.config.reconnect_initial_ms
                    async for _ in client.messages:  # nothing arrives here: on_message is ours
                        pass
            except Exception as exc:  # aiomqtt.MqttError mostly; anything else is retried too
                self._error(f"{type(exc).__name__}: {exc}")
                log.warning("mqtt %s: %s; reconnecting in %d ms", self.name, exc, delay_ms,
                            exc_info=not isinstance(exc, aiomqtt.MqttError))
            finally:
                self._client = None
            self._settle_first_attempt()
            if self._stopping:
                break
            self.state = "reconnecting"
            self.counters["reconnects"] += 1
            await asyncio.sleep(delay_ms / 1000)
            delay_ms = min(delay_ms * 2, self.config.reconnect_max_ms)

    def _settle_first_attempt(self) -> None:
        if self._first_attempt is not None and not self._first_attempt.done():
            self._first_attempt.set_result(None)

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        handling = (SubscribeOptions.RETAIN_DO_NOT_SEND if self.config.retained == "skip"
                    else SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
        topics = [(t, SubscribeOptions(qos=self.config.qos, retainHandling=handling))
                  for t in self.config.topics]
        codes = await client.subscribe(topics)
        for topic, code in zip(self.config.topics, codes, strict=False):
            if isinstance(code, ReasonCode) and code.is_failure:
                raise aiomqtt.MqttError(f"subscription to {topic!r} refused: {code}")

    def _on_message(self, message: paho.MQTTMessage, connection: int) -> None:
        """paho's on_message, on the event loop thread (aiomqtt reads the socket there)."""
        self.counters["received"] += 1
        if message.dup:
            self.counters["duplicates"] += 1
        if message.qos == 0 and len(self._pending) >= self.config.max_queued_messages:
            self.counters["dropped"] += 1
            return
        self._pending.append(Received(message, connection, time.time()))
        self._arrived.set()

    # ------------------------------------------------------------ batches

    def _take(self, batch: list[Received]) -> None:
        """Move pending messages into ``batch``; drop QoS 1 ones the broker will resend."""
        while self._pending and len(batch) < self.config.batch_size:
            item = self._pending.popleft()
            if (item.message.qos == 1 and item.connection != self._connection
                    and not self.config.clean_session):
                continue  # received on a lost connection: the session will deliver it again
            if item.message.retain and self.config.retained == "skip":
                self.counters["skipped_retained"] += 1
                self._ack(item)
                continue
            batch.append(item)

    async def _next_batch(self) -> list[Received]:
        batch: list[Received] = []
        while not batch:
            self._take(batch)
            if not batch:
                self._arrived.clear()
                await self._arrived.wait()
        if len(batch) < self.config.batch_size and self._window_s > 0:
            deadline = asyncio.get_running_loop().time() + self._window_s
            while len(batch) < self.config.batch_size:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                self._take(batch)
        return batch

    async def _batch_loop(self) -> None:
        while True:
            batch = await self._next_batch()
            await self._slots.acquire()
            try:
                if self._mode() == "sync":  # event mode waits on the queue's bound instead
                    await self.host.wait_for_capacity(self.config.function)
            except BaseException:
                self._slots.release()
                raise
            self._in_flight_messages += len(batch)
            task = asyncio.create_task(self._invoke(batch))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)
            await asyncio.sleep(0)  # let it pass the function's gate before we look again

    def _mode(self) -> InvocationMode:
        if self.config.invocation == "event":
            if getattr(self.host, "async_queue", None) is not None:
                return "event"
            if not self._warned_fallback:
                self._warned_fallback = True
                log.warning("mqtt %s: no durable queue; invoking synchronously", self.name)
        return "sync"

    async def _invoke(self, batch: list[Received]) -> None:
        try:
            event = {"eventSource": EVENT_SOURCE, "records": [record_of(i) for i in batch]}
            if await self._invoke_until_taken(event):
                self.counters["invoked"] += len(batch)
                self.counters["batches"] += 1
                for item in batch:
                    self._ack(item)
        except Exception as exc:  # left unacknowledged: the broker redelivers on reconnect
            self._error(f"{type(exc).__name__}: {exc}")
            log.exception("mqtt %s: a batch of %d failed", self.name, len(batch))
        finally:
            self._in_flight_messages -= len(batch)
            self._slots.release()

    async def _invoke_until_taken(self, event: dict[str, Any]) -> bool:
        """True once the invocation finished or was queued; False to leave it unacknowledged.

        Throttled (the function or its queue is full): wait, then try again. Too large for
        the asynchronous queue (256 KB): invoke synchronously (6 MB). Too large even then, or
        refused for good: acknowledge, so one bad batch does not block the subscription.
        """
        mode = self._mode()
        pause_s = 0.01
        while True:
            try:
                result = await self.host.invoke(self.config.function, event, mode=mode,
                                                source=self.name)
            except TooManyRequestsException as exc:
                if getattr(exc, "reason", "") == "ShuttingDown" or self._stopping:
                    return False
                await self.host.wait_for_capacity(self.config.function)
                await asyncio.sleep(pause_s)
                pause_s = min(pause_s * 2, 1.0)
                continue
            except RequestTooLargeException as exc:
                if mode == "event":
                    mode = "sync"
                    continue
                self.counters["rejected"] += len(event["records"])
                self._error(f"{exc.error_type}: {exc}")
                return True
            except FlowrunError as exc:
                self._error(f"{exc.error_type}: {exc}")
                return not self._stopping and exc.error_type != "ServiceException"
            if not result.ok:
                self._error(f"{result.error_type}: {result.error_message}")
            return True

    def _ack(self, item: Received) -> None:
        """PUBACK / PUBCOMP now, if the connection the message came on (QoS 1) is still up.

        A QoS 2 packet id stays reserved in the session until PUBCOMP, so it is acknowledged
        on whatever connection is current.
        """
        qos = item.message.qos
        client = self._client
        if qos == 0 or client is None:
            return
        if qos == 1 and item.connection != self._connection:
            return
        client._client.ack(item.message.mid, qos)
        self.counters["acked"] += 1


# --------------------------------------------------------------------------- destination


class MqttDestination:
    """``mqtt:TOPIC`` (broker from $FLOWRUN_MQTT_URL) or ``mqtt://host:port/TOPIC``.

    Publishes the record as JSON with QoS 1 and returns once the broker acknowledged it.
    """

    def __init__(self, target: str, host: Any = None) -> None:
        if target.startswith("//"):
            netloc, _, topic = target[2:].partition("/")
            url = f"mqtt://{netloc}"
        else:
            url = os.environ.get(URL_ENV, "")
            topic = target
            if not url:
                raise ValueError(f"destination mqtt:{target} needs the broker URL in ${URL_ENV} "
                                 "(or write mqtt://host:port/topic)")
        if not topic or "+" in topic or "#" in topic:
            raise ValueError(f"destination mqtt:{target}: expected a topic name without wildcards")
        self.scheme, self.hostname, self.port, self.username, self.password = parse_url(url)
        self.topic = topic
        self._client: aiomqtt.Client | None = None
        self._lock = asyncio.Lock()

    async def _connected(self) -> aiomqtt.Client:
        if self._client is None:
            client = aiomqtt.Client(self.hostname, self.port, username=self.username,
                                    password=self.password, protocol=aiomqtt.ProtocolVersion.V5,
                                    tls_context=tls_context(self.scheme, None, False), logger=log)
            await client.__aenter__()
            self._client = client
        return self._client

    async def send(self, record: dict[str, Any]) -> None:
        payload = json.dumps(record)
        async with self._lock:
            for attempt in (1, 2):
                client = await self._connected()
                try:
                    await client.publish(self.topic, payload, qos=1)
                    return
                except aiomqtt.MqttError:
                    await self._drop()
                    if attempt == 2:
                        raise

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.__aexit__(None, None, None)

    async def close(self) -> None:
        async with self._lock:
            await self._drop()
