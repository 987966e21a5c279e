"""A throwaway self-signed certificate for 127.0.0.1/localhost (tests only), made with openssl."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def self_signed_cert(directory: Path, name: str = "server") -> tuple[Path, Path]:
    """(cert.pem, key.pem) valid for IP 127.0.0.1 and DNS localhost, for one day."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the TLS tests need the openssl command-line tool (apt-get install openssl)")
    cert, key = directory / f"{name}.crt.pem", directory / f"{name}.key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    return cert, key
