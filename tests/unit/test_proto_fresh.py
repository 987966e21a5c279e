"""The checked-in generated protobuf code must match proto/ (regenerate with `make proto`)."""

from pathlib import Path

from common.rpc import generate


def test_generated_code_is_fresh(tmp_path: Path):
    written = generate.generate(tmp_path)
    stale = [p.name for p in written if p.read_text() != (generate.OUT_DIR / p.name).read_text()]
    assert not stale, f"generated code is stale: {stale}; run `make proto` and commit the result"


def test_generated_imports_are_package_local():
    text = (generate.OUT_DIR / "target_pb2_grpc.py").read_text()
    assert "from common.rpc import target_pb2" in text
    assert "from specrelay" not in text
