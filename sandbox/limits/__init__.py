"""Limit mechanisms, one module each: ``rlimits`` (always) and ``cgroups`` (when it can)."""
