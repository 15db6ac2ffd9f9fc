"""``network: loopback`` on the host's own 127.0.0.1: cgroup BPF programs that refuse other
destinations.

Four tiny ``BPF_PROG_TYPE_CGROUP_SOCK_ADDR`` programs (TCP/UDP ``connect`` and UDP
``sendmsg``, IPv4 and IPv6) are attached to the worker's cgroup2 directory: a destination in
127.0.0.0/8, ``::1`` or ``::ffff:127.0.0.0/104`` is allowed, anything else fails with EPERM.
So a function may reach the local broker or the daemon's API but nothing beyond the box.
Needs root and a cgroup2 mount (a hybrid host's empty ``unified`` mount will do: no
controller is needed to attach programs). Without them ``loopback`` falls back to a network
namespace of the worker's own (see ``sandbox.limits.network``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
import sys

from sandbox.limits import syscalls

SYS_BPF = 321 if os.uname().machine == "x86_64" else 280  # x86_64, else the generic table
BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
PROG_TYPE_CGROUP_SOCK_ADDR = 18
INET4_CONNECT, INET6_CONNECT, UDP4_SENDMSG, UDP6_SENDMSG = 10, 11, 14, 15
ATTR_SIZE = 128

# struct bpf_sock_addr offsets
USER_IP4 = 4
USER_IP6 = 8

# opcodes
LDX_B, LDX_W = 0x71, 0x61
MOV64_K, AND64_K = 0xB7, 0x57
JEQ32_K, JNE32_K = 0x16, 0x56
EXIT, JA = 0x95, 0x05


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, dst | (src << 4), off, imm)


def _word(data: bytes) -> int:
    """Four address bytes as the signed 32-bit immediate a 4-byte load compares against."""
    return int.from_bytes(data, sys.byteorder, signed=True)


def ipv4_program() -> bytes:
    return b"".join([
        _insn(MOV64_K, dst=0, imm=0),
        _insn(LDX_B, dst=2, src=1, off=USER_IP4),      # first octet, network order
        _insn(JNE32_K, dst=2, off=1, imm=127),
        _insn(MOV64_K, dst=0, imm=1),
        _insn(EXIT),
    ])


def ipv6_program() -> bytes:
    exit_, allow, check_one = 14, 13, 12  # instruction indexes of the labels below

    def to(label: int, at: int) -> int:
        return label - (at + 1)

    return b"".join([
        _insn(MOV64_K, dst=0, imm=0),                                                  # 0
        _insn(LDX_W, dst=2, src=1, off=USER_IP6),                                      # 1
        _insn(JNE32_K, dst=2, off=to(exit_, 2), imm=0),                                # 2
        _insn(LDX_W, dst=2, src=1, off=USER_IP6 + 4),                                  # 3
        _insn(JNE32_K, dst=2, off=to(exit_, 4), imm=0),                                # 4
        _insn(LDX_W, dst=2, src=1, off=USER_IP6 + 8),                                  # 5
        _insn(LDX_W, dst=3, src=1, off=USER_IP6 + 12),                                 # 6
        _insn(JEQ32_K, dst=2, off=to(check_one, 7), imm=0),                            # 7
        _insn(JNE32_K, dst=2, off=to(exit_, 8), imm=_word(b"\x00\x00\xff\xff")),       # 8
        _insn(LDX_B, dst=3, src=1, off=USER_IP6 + 12),  # ::ffff:127.x.x.x              # 9
        _insn(JEQ32_K, dst=3, off=to(allow, 10), imm=127),                             # 10
        _insn(JA, off=to(exit_, 11)),                                                  # 11
        _insn(JNE32_K, dst=3, off=to(exit_, 12), imm=_word(b"\x00\x00\x00\x01")),      # 12 ::1
        _insn(MOV64_K, dst=0, imm=1),                                                  # 13
        _insn(EXIT),                                                                   # 14
    ])


def _bpf(cmd: int, attr: bytes) -> int:
    buffer = ctypes.create_string_buffer(attr.ljust(ATTR_SIZE, b"\0"), ATTR_SIZE)
    fn = syscalls.libc().syscall
    fn.restype = ctypes.c_long
    result = fn(ctypes.c_long(SYS_BPF), ctypes.c_int(cmd), buffer, ctypes.c_uint(ATTR_SIZE))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({cmd}): {os.strerror(err)}")
    return int(result)


def load(program: bytes, attach_type: int) -> int:
    license_buffer = ctypes.create_string_buffer(b"GPL")
    insns = ctypes.create_string_buffer(program, len(program))
    attr = struct.pack("<IIQQIIQII16sII", PROG_TYPE_CGROUP_SOCK_ADDR, len(program) // 8,
                       ctypes.addressof(insns), ctypes.addressof(license_buffer), 0, 0, 0, 0, 0,
                       b"flowrun_lo", 0, attach_type)
    return _bpf(BPF_PROG_LOAD, attr)


class LoopbackOnly:
    """The four programs, loaded once per daemon, attached to each loopback worker's cgroup."""

    def __init__(self) -> None:
        self.programs: list[tuple[int, int]] = []
        try:
            for attach_type, program in ((INET4_CONNECT, ipv4_program()),
                                         (UDP4_SENDMSG, ipv4_program()),
                                         (INET6_CONNECT, ipv6_program()),
                                         (UDP6_SENDMSG, ipv6_program())):
                self.programs.append((attach_type, load(program, attach_type)))
        except BaseException:
            self.close()
            raise

    def attach(self, cgroup_dir: str) -> None:
        fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for attach_type, prog_fd in self.programs:
                _bpf(BPF_PROG_ATTACH, struct.pack("<IIIII", fd, prog_fd, attach_type, 0, 0))
        finally:
            os.close(fd)

    def close(self) -> None:
        for _, prog_fd in self.programs:
            with contextlib.suppress(OSError):
                os.close(prog_fd)
        self.programs = []
