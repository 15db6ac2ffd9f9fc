"""flowrun: an event-driven function runtime — a Lambda you run yourself."""

from flowrun.types import (
    FlowrunError,
    InvocationResult,
    RequestTooLargeException,
    ResourceNotFoundException,
    TooManyRequestsException,
)

__all__ = [
    "FlowrunError",
    "InvocationResult",
    "RequestTooLargeException",
    "ResourceNotFoundException",
    "Runtime",
    "TooManyRequestsException",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    if name == "Runtime":
        from flowrun.runtime import Runtime

        return Runtime
    raise AttributeError(name)
