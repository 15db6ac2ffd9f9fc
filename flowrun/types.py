"""The shared vocabulary: invocation results, error names and exceptions."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["success", "error", "timeout", "throttled"]
InvocationMode = Literal["sync", "event"]

SYNC_PAYLOAD_LIMIT_BYTES = 6 * 1024 * 1024
ASYNC_PAYLOAD_LIMIT_BYTES = 256 * 1024


class FlowrunError(Exception):
    """Base of the errors flowrun raises to its callers; ``error_type`` is Lambda's name."""

    error_type = "ServiceException"
    http_status = 500

    def to_dict(self) -> dict[str, str]:
        return {"Type": "User", "message": str(self), "errorType": self.error_type}


class ResourceNotFoundException(FlowrunError):
    error_type = "ResourceNotFoundException"
    http_status = 404


class TooManyRequestsException(FlowrunError):
    error_type = "TooManyRequestsException"
    http_status = 429

    def __init__(self, message: str, reason: str = "ReservedFunctionConcurrentInvocationLimitExceeded"):
        super().__init__(message)
        self.reason = reason


class RequestTooLargeException(FlowrunError):
    error_type = "RequestTooLargeException"
    http_status = 413


class InvalidRequestContentException(FlowrunError):
    error_type = "InvalidRequestContentException"
    http_status = 400


class ServiceUnavailableException(FlowrunError):
    error_type = "ServiceException"
    http_status = 503


@dataclass(slots=True)
class InvocationResult:
    """What one invocation produced and what it cost; treat it as read-only.

    ``payload_json`` is the handler's return value as JSON text (or the error document on
    failure); ``payload`` decodes it. (Not a frozen dataclass: one is made per invocation,
    and a frozen one costs five times as much to build.)
    """

    request_id: str
    function: str
    status: Status
    payload_json: str = "null"
    error_type: str | None = None
    error_message: str | None = None
    stack_trace: tuple[str, ...] = ()
    logs: str = ""
    duration_ms: float = 0.0
    billed_duration_ms: int = 0
    init_duration_ms: float | None = None
    memory_size_mb: int = 0
    max_memory_used_mb: int = 0
    cpu_user_ms: float = 0.0
    cpu_system_ms: float = 0.0
    started_at: float = 0.0
    attempt: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def payload(self) -> Any:
        return json.loads(self.payload_json)

    @property
    def ok(self) -> bool:
        return self.status == "success"

    @property
    def error(self) -> dict[str, Any] | None:
        if self.ok:
            return None
        return {
            "errorType": self.error_type,
            "errorMessage": self.error_message,
            "stackTrace": list(self.stack_trace),
        }
