"""Length-prefixed msgpack frames between the dispatcher and a worker process.

A frame is a 4-byte big-endian length followed by that many bytes of msgpack.
Every frame is a map with a ``"t"`` key naming its kind:

- worker → daemon ``ready``: ``{"t": "ready", "init_ms": float}`` or with ``"error"``
- daemon → worker ``invoke``: ``{"t": "invoke", "id", "event", "deadline_ms", ...}``
- worker → daemon ``result``: ``{"t": "result", "ok": bool, "payload" | "error", "logs",
  "duration_ms", "cpu_user_ms", "cpu_system_ms", "max_memory_kb"}``
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Any

import msgpack

HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 64 * 1024 * 1024


def encode(message: dict[str, Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def encoder() -> Callable[[dict[str, Any]], bytes]:
    """A frame encoder with its own msgpack packer (reused: cheaper than ``encode`` per
    call); for one thread at a time."""
    pack = msgpack.Packer(use_bin_type=True).pack
    header = HEADER.pack

    def encode_frame(message: dict[str, Any]) -> bytes:
        body = pack(message)
        return header(len(body)) + body

    return encode_frame


def decode(body: bytes | memoryview) -> dict[str, Any]:
    message = msgpack.unpackb(body, raw=False, strict_map_key=False)
    if not isinstance(message, dict):
        raise ValueError("frame is not a map")
    return message


def read_exact(fd: int, size: int) -> bytes:
    """Blocking read of exactly ``size`` bytes; raises EOFError when the pipe closes."""
    chunks = []
    remaining = size
    while remaining:
        chunk = os.read(fd, remaining)
        if not chunk:
            raise EOFError("pipe closed")
        chunks.append(chunk)
        remaining -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def read_frame(fd: int) -> dict[str, Any]:
    (size,) = HEADER.unpack(read_exact(fd, HEADER.size))
    if size > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {size} bytes is over the {MAX_FRAME_BYTES} byte limit")
    return decode(read_exact(fd, size))


def write_all(fd: int, frame: bytes) -> None:
    data = memoryview(frame)
    while data:
        written = os.write(fd, data)
        data = data[written:]


def write_frame(fd: int, message: dict[str, Any]) -> None:
    write_all(fd, encode(message))


class FrameReader:
    """Blocking reader of whole frames from a pipe (the worker side): one ``read`` per
    frame in the common case, where the frame arrives whole."""

    def __init__(self, fd: int, chunk_bytes: int = 64 * 1024) -> None:
        self.fd = fd
        self.chunk_bytes = chunk_bytes
        self._buffer = b""

    def read(self) -> dict[str, Any]:
        data = self._buffer or self._read_some()
        while len(data) < HEADER.size:
            data += self._read_some()
        (size,) = HEADER.unpack_from(data)
        if size > MAX_FRAME_BYTES:
            raise ValueError(f"frame of {size} bytes is over the {MAX_FRAME_BYTES} byte limit")
        end = HEADER.size + size
        if len(data) < end:
            parts = [data, read_exact(self.fd, end - len(data))]
            data = b"".join(parts)
        self._buffer = data[end:]
        if end == len(data):
            return decode(memoryview(data)[HEADER.size :])
        return decode(data[HEADER.size : end])

    def _read_some(self) -> bytes:
        chunk = os.read(self.fd, self.chunk_bytes)
        if not chunk:
            raise EOFError("pipe closed")
        return chunk


class FrameBuffer:
    """Incremental decoder for frames arriving in arbitrary chunks (the daemon side)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Whole frames decoded so far; raises ValueError on a frame over the size limit."""
        if not self._buffer and len(data) >= HEADER.size:
            (size,) = HEADER.unpack_from(data)
            if len(data) == HEADER.size + size:  # exactly one whole frame: no copying
                return [decode(memoryview(data)[HEADER.size :])]
        self._buffer += data
        frames = []
        while len(self._buffer) >= HEADER.size:
            (size,) = HEADER.unpack_from(self._buffer)
            if size > MAX_FRAME_BYTES:
                raise ValueError(f"frame of {size} bytes is over the {MAX_FRAME_BYTES} byte limit")
            end = HEADER.size + size
            if len(self._buffer) < end:
                break
            frames.append(decode(bytes(self._buffer[HEADER.size : end])))
            del self._buffer[:end]
        return frames
