"""Status conventions on the data plane.

Arrow Flight has no RESOURCE_EXHAUSTED / INVALID_ARGUMENT error classes in Python, so the
server puts the gRPC status name first in the error message (`"RESOURCE_EXHAUSTED: ...
retry_after_ms=200"`) inside the closest Flight error class, and clients classify with
`classify()`. One place defines the convention for both sides.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow.flight as flight

OK = "OK"
RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"   # overloaded: back off and retry (same or other server)
UNAVAILABLE = "UNAVAILABLE"                 # draining / unreachable: retry elsewhere
DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"     # retry elsewhere
INVALID_ARGUMENT = "INVALID_ARGUMENT"       # the request itself is bad: do not retry
UNAUTHENTICATED = "UNAUTHENTICATED"         # fix the token: do not retry
INTERNAL = "INTERNAL"                       # server-side failure: retry elsewhere

RETRYABLE = {RESOURCE_EXHAUSTED, UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL}

_RETRY_RE = re.compile(r"retry_after_ms=(\d+)")
_CODE_RE = re.compile(r"\b(RESOURCE_EXHAUSTED|UNAVAILABLE|DEADLINE_EXCEEDED|INVALID_ARGUMENT|UNAUTHENTICATED|INTERNAL):")


def message(code: str, text: str, retry_after_s: float | None = None) -> str:
    hint = f"; retry_after_ms={int(retry_after_s * 1000)}" if retry_after_s is not None else ""
    return f"{code}: {text}{hint}"


# The Flight error class each code travels in (the closest one; the message prefix is what counts).
_FLIGHT_CLASS = {
    RESOURCE_EXHAUSTED: flight.FlightUnavailableError,
    UNAVAILABLE: flight.FlightUnavailableError,
    DEADLINE_EXCEEDED: flight.FlightTimedOutError,
    INVALID_ARGUMENT: flight.FlightServerError,
    UNAUTHENTICATED: flight.FlightUnauthenticatedError,
    INTERNAL: flight.FlightInternalError,
}


def flight_error(code: str, text: str, retry_after_s: float | None = None) -> flight.FlightError:
    """Server side: the exception to raise from a Flight handler for `code`."""
    return _FLIGHT_CLASS.get(code, flight.FlightInternalError)(message(code, text, retry_after_s))


@dataclass
class Classified:
    code: str
    retryable: bool
    retry_after_s: float | None
    detail: str


def classify(exc: BaseException) -> Classified:
    """Map an exception from a Flight call to a status code (the message prefix wins)."""
    text = str(exc)
    m = _CODE_RE.search(text)
    if m:
        code = m.group(1)
    elif isinstance(exc, flight.FlightUnauthenticatedError):
        code = UNAUTHENTICATED
    elif isinstance(exc, flight.FlightTimedOutError):
        code = DEADLINE_EXCEEDED
    elif isinstance(exc, (flight.FlightUnavailableError, ConnectionError, OSError)):
        code = UNAVAILABLE
    else:
        code = INTERNAL
    r = _RETRY_RE.search(text)
    return Classified(code, code in RETRYABLE, int(r.group(1)) / 1000 if r else None, text)
