"""A third-party-style trigger (``gated_trigger:GatedTrigger``) whose start and stop wait for files."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from triggers.base import Trigger, TriggerConfig


class GatedTriggerConfig(TriggerConfig):
    gate: str  # start() returns once this file exists
    stop_gate: str | None = None  # stop() returns once this file exists


class GatedTrigger(Trigger):
    config_model = GatedTriggerConfig

    async def start(self) -> None:
        assert isinstance(self.config, GatedTriggerConfig)
        while not Path(self.config.gate).exists():
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        assert isinstance(self.config, GatedTriggerConfig)
        while self.config.stop_gate and not Path(self.config.stop_gate).exists():
            await asyncio.sleep(0.02)

    def status(self) -> dict[str, Any]:
        return {"state": "running"}
