"""Find trigger adapters by name: built-ins, the ``flowrun.triggers`` entry points, or
``package.module:Class``. Built-ins are imported lazily so a missing optional dependency
only matters to the configs that use it."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from triggers.base import Trigger

BUILTINS = {
    "file": "triggers.file:FileTrigger",
    "http": "triggers.http:HttpTrigger",
    "cron": "triggers.cron:CronTrigger",
    "kafka": "triggers.kafka:KafkaTrigger",
    "mqtt": "triggers.mqtt:MqttTrigger",
}
ENTRY_POINT_GROUP = "flowrun.triggers"


class UnknownTriggerError(LookupError):
    pass


def available() -> list[str]:
    names = set(BUILTINS)
    names.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def _target(name: str) -> str:
    if name in BUILTINS:
        return BUILTINS[name]
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return str(ep.value)
    if ":" in name:
        return name
    raise UnknownTriggerError(
        f"unknown trigger type {name!r}; valid: {', '.join(available())} or 'package.module:Class'"
    )


def load(name: str) -> type[Trigger]:
    """The adapter class for ``name``; ImportError says which extra to install."""
    module_name, _, attr = _target(name).partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if name in BUILTINS and exc.name and not exc.name.startswith(module_name):
            raise ImportError(
                f"trigger {name!r} needs {exc.name!r}: pip install 'flowrun[{name}]'"
            ) from exc
        raise UnknownTriggerError(f"trigger type {name!r}: cannot import {module_name!r}") from exc
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Trigger)):
        raise UnknownTriggerError(f"trigger type {name!r}: {attr!r} is not a Trigger subclass")
    return cls
