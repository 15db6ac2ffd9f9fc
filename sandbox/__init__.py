"""Sandboxed worker processes: the pool, the worker itself, and the limits put on it."""
