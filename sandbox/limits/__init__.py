"""Limit mechanisms, one module each.

- ``detect``: which cgroup version serves each controller here; ``default_limiter()``.
- ``linux``: ``LinuxLimiter``, the limiter flowrun uses on Linux.
- ``cgroups`` (over ``cgroup_v1`` / ``cgroup_v2`` / ``cgroupfs``): flowrun's subtree, one
  cgroup per worker: memory, CPU quota, pids, OOM and peak counters.
- ``rlimits``: open files, file size, core dumps; address space and processes as fallbacks.
- ``enter``: run inside a new worker: namespaces, ``scratch``, ``network``, ``user``.
- ``loopback_bpf``: cgroup BPF programs keeping ``network: loopback`` on 127.0.0.1.
"""
