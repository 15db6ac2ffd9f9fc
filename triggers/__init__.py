"""Trigger adapters: one module per event source, all behind the ``Trigger`` interface."""

from triggers.base import Trigger, TriggerConfig, TriggerHost

__all__ = ["Trigger", "TriggerConfig", "TriggerHost"]
