"""The Trigger interface every adapter implements, and what the runtime offers it.

A trigger turns events from its source into invocations through a ``TriggerHost`` and
acknowledges its source only once the host says the invocation finished (or was durably
queued). Adapters are looked up by ``type`` in ``triggers.registry``.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from flowrun.types import InvocationMode, InvocationResult


class TriggerConfig(BaseModel):
    """Keys every trigger has; each adapter subclasses it with its own keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str = Field(description="adapter name (file, http, cron, kafka, mqtt) or module:Class")
    function: str = Field(description="the function this trigger invokes")
    enabled: bool = True
    name: str | None = Field(default=None, description="a name for status and logs")


T = TypeVar("T")


class TriggerHost(Protocol):
    """What the runtime gives a trigger: invocation, shared services and its folders."""

    @property
    def state_dir(self) -> Path: ...

    @property
    def config_dir(self) -> Path: ...

    async def invoke(
        self,
        function: str,
        event: Any,
        *,
        mode: InvocationMode = "sync",
        source: str = "",
        request_id: str | None = None,
    ) -> InvocationResult: ...

    def has_capacity(self, function: str) -> bool:
        """True while the function can take another invocation without waiting."""
        ...

    async def wait_for_capacity(self, function: str) -> None:
        """Return once the function can take another invocation without waiting."""
        ...

    def shared(self, key: str, factory: Callable[[], T]) -> T:
        """One object per key for all triggers of a runtime (e.g. one HTTP server)."""
        ...

    def on_stop(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` once when the runtime stops, after all triggers stopped."""
        ...


class Trigger(abc.ABC):
    """An event source. ``start`` returns once it is listening; ``stop`` once it has let go."""

    config_model: ClassVar[type[TriggerConfig]] = TriggerConfig

    def __init__(self, config: TriggerConfig, host: TriggerHost) -> None:
        self.config = config
        self.host = host

    @property
    def name(self) -> str:
        return self.config.name or f"{self.config.type}:{self.config.function}"

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...

    def status(self) -> dict[str, Any]:
        """A JSON-able snapshot for ``flowrun status``: state, counters, last error."""
        return {"state": "running"}
