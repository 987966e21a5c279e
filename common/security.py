"""Bearer-token auth and TLS material shared by the target server and its clients.

One convention for both planes: the client sends `authorization: Bearer <token>` as gRPC
metadata (control plane) and as a Flight call header (data plane). TLS is all-or-nothing per
server: when the server has a certificate, both ports speak TLS, and a client given a root
certificate uses TLS on both.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from common.errors import ConfigError

AUTH_HEADER = "authorization"
BEARER = "Bearer "


def read_token_file(path: str | Path) -> str:
    """The token in `path` (surrounding whitespace stripped); ConfigError if missing or empty."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"auth token file {p} does not exist; write the shared token into it (one line)")
    token = p.read_text(errors="strict").strip()
    if not token:
        raise ConfigError(f"auth token file {p} is empty; write the shared token into it (one line)")
    if any(c.isspace() for c in token):
        raise ConfigError(f"auth token in {p} contains whitespace; use one line without spaces")
    return token


def read_pem(path: str | Path, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist (a PEM file is expected)")
    data = p.read_bytes()
    if b"-----BEGIN" not in data:
        raise ConfigError(f"{what} {p} is not a PEM file (no '-----BEGIN' line)")
    return data


def bearer_value(token: str) -> str:
    return BEARER + token


def token_matches(header_value: str | bytes | None, token: str) -> bool:
    """Constant-time check of an `authorization` header value against the expected token."""
    if header_value is None:
        return False
    if isinstance(header_value, bytes):
        header_value = header_value.decode("latin-1")
    if not header_value.startswith(BEARER):
        return False
    return hmac.compare_digest(header_value[len(BEARER):].encode(), token.encode())
