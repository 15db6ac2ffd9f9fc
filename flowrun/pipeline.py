"""Pipelines: functions chained through ``on_success`` / ``on_failure: function:NAME``.

There is no pipeline object to configure: a pipeline is what the destinations draw. Each
function whose result feeds another (``on_success: function:NEXT``, or a list of them for
fan-out) is a step; a pipeline starts at a step no other step feeds. Each step keeps its
own retries, limits and failure destination. This module finds the pipelines in a config
and describes them, with their queue depths, for ``flowrun status``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flowrun.config import Config
from flowrun.queue import destination_list


def _functions(destinations: list[str]) -> tuple[str, ...]:
    return tuple(d.partition(":")[2] for d in destinations if d.startswith("function:"))


@dataclass(frozen=True)
class Step:
    function: str
    on_success: tuple[str, ...]   # every destination, as configured
    on_failure: tuple[str, ...]
    next: tuple[str, ...]         # the functions this step's results feed

    @property
    def failure_functions(self) -> tuple[str, ...]:
        return _functions(list(self.on_failure))


@dataclass(frozen=True)
class Pipeline:
    name: str                     # its first step
    steps: tuple[Step, ...]       # in the order an event reaches them


def steps_of(config: Config) -> dict[str, Step]:
    out = {}
    for name, fn in config.functions.items():
        success, failure = destination_list(fn.on_success), destination_list(fn.on_failure)
        out[name] = Step(name, tuple(success), tuple(failure),
                         _functions(success) + tuple(f for f in _functions(failure)
                                                     if f not in _functions(success)))
    return out


def pipelines(config: Config) -> list[Pipeline]:
    """Every chain of at least two functions, each once, starting where nothing feeds it."""
    steps = steps_of(config)
    fed = {target for step in steps.values() for target in step.next}
    linked = {name for name, step in steps.items() if step.next} | fed
    roots = [name for name in steps if name in linked and name not in fed]
    seen: set[str] = set()
    found = []
    # Cycles without an entry point still show up: start them at their first function.
    for root in [*roots, *(name for name in steps if name in linked)]:
        if root in seen:
            continue
        order: list[str] = []
        frontier = [root]
        while frontier:
            name = frontier.pop(0)
            if name in seen or name not in steps:
                continue
            seen.add(name)
            order.append(name)
            frontier.extend(steps[name].next)
        if len(order) > 1:
            found.append(Pipeline(root, tuple(steps[n] for n in order)))
    return found


def describe(config: Config, functions: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """JSON-able pipelines for ``flowrun status``; ``functions`` holds per-function status."""
    out = []
    for found in pipelines(config):
        steps = []
        for step in found.steps:
            info = functions.get(step.function, {})
            steps.append({
                "function": step.function,
                "next": list(step.next),
                "on_failure": list(step.on_failure) or ["dlq"],
                **{key: info[key] for key in ("async_queued", "async_retrying",
                                              "async_inflight", "dead_letters") if key in info},
            })
        out.append({"name": found.name, "steps": steps})
    return out


def render(described: list[dict[str, Any]]) -> list[str]:
    """Lines for the human ``flowrun status`` output."""
    lines = []
    for found in described:
        lines.append(f"pipeline {found['name']}:")
        for step in found["steps"]:
            counts = " ".join(f"{key.removeprefix('async_')}={step[key]}"
                              for key in ("async_queued", "async_retrying", "async_inflight",
                                          "dead_letters") if key in step)
            arrow = f" -> {', '.join(step['next'])}" if step["next"] else ""
            lines.append(f"  {step['function']:<16}{arrow:<28} {counts}".rstrip())
    return lines
