"""Why the scheduler could not (fully) serve a request; each carries its status code (common/status.py)."""

from __future__ import annotations

from common import status
from common.errors import SpecRelayError


class SchedulerError(SpecRelayError):
    """A request could not be (fully) served; `code` is its status (common/status.py)."""

    code = status.INTERNAL
    retry_after_s: float | None = None


class Overloaded(SchedulerError):
    code = status.RESOURCE_EXHAUSTED

    def __init__(self, text: str, retry_after_s: float) -> None:
        super().__init__(text)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(SchedulerError):
    code = status.DEADLINE_EXCEEDED


class Draining(SchedulerError):
    code = status.UNAVAILABLE


class ForwardFailed(SchedulerError):
    code = status.INTERNAL
