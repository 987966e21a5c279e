"""Bearer-token checks on both planes: a gRPC server interceptor and a Flight server middleware.

Both reject a call without the right `authorization: Bearer <token>` with UNAUTHENTICATED before
any handler runs. The standard health service stays open on purpose: load balancers and
kubelet probes call it without credentials, and it reveals nothing but SERVING/NOT_SERVING.
"""

from __future__ import annotations

import logging
import time

import grpc
import pyarrow.flight as flight

from common import status
from common.security import AUTH_HEADER, token_matches

log = logging.getLogger(__name__)

UNAUTHENTICATED_TEXT = "missing or wrong bearer token; pass the server's token (--auth-token-file) to the client"
OPEN_METHODS_PREFIX = "/grpc.health.v1.Health/"


class _RateLimitedLog:
    """At most one warning per `every_s`, with the count of what was suppressed."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s, self._last, self._suppressed = every_s, 0.0, 0

    def warn(self, msg: str, *args) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            self._suppressed += 1
            return
        extra = f" (+{self._suppressed} similar)" if self._suppressed else ""
        self._last, self._suppressed = now, 0
        log.warning(msg + extra, *args)


_rejections = _RateLimitedLog()


class BearerTokenInterceptor(grpc.ServerInterceptor):
    def __init__(self, token: str, on_reject=None) -> None:
        self.token = token
        self.on_reject = on_reject

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(OPEN_METHODS_PREFIX):
            return continuation(handler_call_details)
        value = dict(handler_call_details.invocation_metadata or ()).get(AUTH_HEADER)
        if token_matches(value, self.token):
            return continuation(handler_call_details)
        _rejections.warn("rejected unauthenticated gRPC call %s", method)
        if self.on_reject is not None:
            self.on_reject()
        handler = continuation(handler_call_details)
        return _abort_handler(handler)


def _abort_handler(handler):
    def abort(_request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_TEXT)

    # The rejecting handler must have the same streaming shape as the real one.
    if handler is None or (not handler.request_streaming and not handler.response_streaming):
        return grpc.unary_unary_rpc_method_handler(abort)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    return grpc.unary_stream_rpc_method_handler(abort)


class BearerTokenMiddlewareFactory(flight.ServerMiddlewareFactory):
    """`on_reject(is_feature_request)` is called for every rejected call."""

    def __init__(self, token: str, on_reject=None) -> None:
        super().__init__()
        self.token = token
        self.on_reject = on_reject

    def start_call(self, info, headers):
        values = headers.get(AUTH_HEADER) or []
        if any(token_matches(v, self.token) for v in values):
            return None
        _rejections.warn("rejected unauthenticated Flight call %s", info.method)
        if self.on_reject is not None:
            self.on_reject(info.method == flight.FlightMethod.DO_GET)
        raise flight.FlightUnauthenticatedError(status.message(status.UNAUTHENTICATED, UNAUTHENTICATED_TEXT))
