"""Where the target servers are: `targets.endpoints` resolved to a set of `host:port` strings.

    host:port,host:port   a fixed list
    dns:NAME:PORT         every address NAME resolves to (a Kubernetes headless Service gives one
                          A record per ready pod), re-resolved every refresh interval
    file:PATH             one endpoint per line (or comma-separated; `#` comments), re-read every
                          refresh interval, so an operator or a script can add and remove servers

A failed re-resolution (DNS hiccup, file being rewritten) keeps the last known set: servers that
really left fail their requests and are marked down by the pool anyway.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

from common.errors import ConfigError, SpecRelayError
from draft_trainer.client.target import parse_endpoint

log = logging.getLogger(__name__)


def _check(endpoint: str, where: str) -> str:
    try:
        parse_endpoint(endpoint)
    except SpecRelayError as e:
        raise ConfigError(f"{where}: {e}") from None
    return endpoint


def _split(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        out.extend(p.strip() for p in line.split(",") if p.strip())
    return out


class EndpointSource:
    """Parses an endpoints spec once; `resolve()` returns the current set of endpoints."""

    def __init__(self, spec: str) -> None:
        self.spec = spec.strip()
        if not self.spec:
            raise ConfigError("targets.endpoints is empty: give host:port[,host:port], dns:NAME:PORT or file:PATH")
        self._last: set[str] | None = None
        if self.spec.startswith("dns:"):
            self.kind = "dns"
            name, sep, port = self.spec[4:].rpartition(":")
            if not sep or not name or not port.isdigit():
                raise ConfigError(f"targets.endpoints {self.spec!r}: expected dns:NAME:PORT, e.g. "
                                  "dns:target-headless.default.svc.cluster.local:50051")
            self.name, self.port = name, int(port)
        elif self.spec.startswith("file:"):
            self.kind = "file"
            self.path = Path(self.spec[5:])
            if not self.path.is_file():
                raise ConfigError(f"targets.endpoints {self.spec!r}: file {self.path} does not exist "
                                  "(write one host:port per line)")
        else:
            self.kind = "static"
            self._static = {_check(e, f"targets.endpoints {self.spec!r}") for e in _split(self.spec)}

    @property
    def dynamic(self) -> bool:
        return self.kind != "static"

    def _resolve_once(self) -> set[str]:
        if self.kind == "static":
            return set(self._static)
        if self.kind == "file":
            text = self.path.read_text()
            return {_check(e, f"endpoint file {self.path}") for e in _split(text)}
        infos = socket.getaddrinfo(self.name, self.port, type=socket.SOCK_STREAM)
        out = set()
        for family, *_rest, addr in infos:
            host = addr[0]
            out.add(f"[{host}]:{self.port}" if family == socket.AF_INET6 else f"{host}:{self.port}")
        return out

    def resolve(self) -> set[str]:
        """The current endpoints; on a failure after a first success, the last known set."""
        try:
            eps = self._resolve_once()
        except (OSError, ConfigError) as e:
            if self._last is None:
                raise ConfigError(f"targets.endpoints {self.spec!r}: cannot resolve: {e}") from None
            log.warning("endpoints %s: re-resolution failed (%s); keeping the last %d endpoints",
                        self.spec, e, len(self._last))
            return set(self._last)
        if self._last is not None and eps != self._last:
            log.info("endpoints %s changed: +%s -%s", self.spec, sorted(eps - self._last), sorted(self._last - eps))
        self._last = eps
        return set(eps)
