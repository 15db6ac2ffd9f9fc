"""``permissions.network``: none | loopback | full, by network namespace when privileged.

- ``none``: a new, empty network namespace; its loopback stays down, so nothing connects,
  not even to 127.0.0.1.
- ``loopback``: the host's 127.0.0.1 and ::1 only — the local broker, the daemon's API —
  enforced by cgroup BPF programs (``sandbox.limits.loopback_bpf``). Where those cannot be
  attached (no cgroup2 mount), a new network namespace with its own loopback up: the
  function may then talk only to itself over 127.0.0.1.
- ``full``: the host's network.
"""

from __future__ import annotations

import struct

from sandbox.limits import syscalls

MODES = ("none", "loopback", "full")
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
IFF_RUNNING = 0x40


def needs_namespace(mode: str) -> bool:
    return mode in ("none", "loopback")


def unshare_flags(mode: str) -> int:
    return syscalls.CLONE_NEWNET if needs_namespace(mode) else 0


def bring_loopback_up() -> None:
    """``ip link set lo up``, by ioctl on a socket of the current namespace."""
    import fcntl
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP | IFF_RUNNING))


def enter(mode: str) -> None:
    """Run inside the worker after ``unshare``: set the new namespace up for ``mode``."""
    if mode == "loopback":
        bring_loopback_up()
