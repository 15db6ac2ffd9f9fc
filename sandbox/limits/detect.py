"""What this host can enforce: which cgroup version serves each controller, and privileges.

Filled in properly by the cgroups work; until then it reports rlimits only.
"""

from __future__ import annotations

from typing import Any


def describe_host() -> dict[str, Any]:
    from sandbox.isolation import NoIsolation

    return NoIsolation().describe()
