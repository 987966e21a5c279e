"""Regenerate the protobuf/gRPC Python code from proto/ (the one command: `make proto`).

protoc writes absolute imports (`from specrelay.v1 import target_pb2`); we rewrite them to
point into this package so the generated code needs no top-level `specrelay` package.
A test (tests/unit/test_proto_fresh.py) regenerates into a temporary directory and fails if
the checked-in files differ.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "proto"
PROTO_FILES = ["specrelay/v1/target.proto"]
OUT_DIR = Path(__file__).resolve().parent
GENERATED = ["target_pb2.py", "target_pb2.pyi", "target_pb2_grpc.py"]


def generate(out_dir: Path) -> list[Path]:
    """Run grpc_tools.protoc and rewrite imports; returns the generated files in out_dir."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}",
            f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *PROTO_FILES,
        ]
        subprocess.run(cmd, check=True, cwd=REPO)
        written = []
        for name in GENERATED:
            text = (Path(tmp) / "specrelay" / "v1" / name).read_text()
            text = re.sub(r"^from specrelay\.v1 import ", "from common.rpc import ", text, flags=re.M)
            dst = out_dir / name
            dst.write_text(text)
            written.append(dst)
        return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    for path in generate(args.out):
        print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")


if __name__ == "__main__":
    main()
