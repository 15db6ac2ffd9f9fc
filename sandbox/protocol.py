"""Length-prefixed msgpack frames between the dispatcher and a worker process.

A frame is a 4-byte big-endian length followed by that many bytes of msgpack.
Every frame is a map with a ``"t"`` key naming its kind:

- worker → daemon ``ready``: ``{"t": "ready", "init_ms": float}`` or with ``"error"``
- daemon → worker ``invoke``: ``{"t": "invoke", "id", "event", "deadline_ms", ...}``
- worker → daemon ``result``: ``{"t": "result", "ok": bool, "payload" | "error", "logs", ...}``
"""

from __future__ import annotations

import os
import struct
from typing import Any

import msgpack

HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 64 * 1024 * 1024


def encode(message: dict[str, Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(body)) + body


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


def write_frame(fd: int, message: dict[str, Any]) -> None:
    data = memoryview(encode(message))
    while data:
        written = os.write(fd, data)
        data = data[written:]


class FrameBuffer:
    """Incremental decoder for frames arriving in arbitrary chunks (the daemon side)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        if not self._buffer and len(data) >= HEADER.size:
            (size,) = HEADER.unpack_from(data)
            if len(data) == HEADER.size + size:  # exactly one whole frame: no copying
                return [decode(memoryview(data)[HEADER.size :])]
        self._buffer += data
        frames = []
        while len(self._buffer) >= HEADER.size:
            (size,) = HEADER.unpack_from(self._buffer)
            end = HEADER.size + size
            if len(self._buffer) < end:
                break
            frames.append(decode(bytes(self._buffer[HEADER.size : end])))
            del self._buffer[:end]
        return frames
