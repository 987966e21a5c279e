"""deploy/docker: lint (hadolint), build context (every COPY source exists and is not ignored),
non-root users, pinned bases, health checks, and the images' commands against the real CLIs.

No Docker engine runs here, so images are not built; the health-check script and the demo asset
script the images run are exercised for real instead.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

import pytest

from common.config import load_config
from draft_trainer.config import TrainConfig
from target_server.cli import build_parser as server_parser
from tests.deploy.conftest import DEPLOY, REPO, require_tool
from tests.deploy.dockerfile import dockerignore_excludes, healthcheck_cmd, parse
from tests.support.procs import env_with_repo, start_server

DOCKERFILES = sorted((DEPLOY / "docker").glob("*.Dockerfile"))
IGNORE = REPO / ".dockerignore"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"


def test_the_three_images_exist():
    assert {p.name for p in DOCKERFILES} == {"target-server.Dockerfile", "trainer.Dockerfile", "cpu-demo.Dockerfile"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(path):
    hadolint = require_tool("hadolint")
    r = subprocess.run([hadolint, "--no-color", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"hadolint {path.name}:\n{r.stdout}{r.stderr}"


def test_dockerignore_matcher_follows_docker_rules():
    # The matcher below decides what the COPY test accepts, so check it on known cases first.
    assert dockerignore_excludes(IGNORE, ".venv/lib/python3.11/site.py")
    assert dockerignore_excludes(IGNORE, "common/__pycache__/config.cpython-311.pyc")
    assert dockerignore_excludes(IGNORE, "runs/demo/train/metrics.jsonl")
    assert dockerignore_excludes(IGNORE, "deploy/k8s/base/kustomization.yaml")
    assert not dockerignore_excludes(IGNORE, "common/config.py")
    assert not dockerignore_excludes(IGNORE, "deploy/docker/healthcheck.py")


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_copy_source_exists_in_the_build_context(path):
    copies = [i for i in parse(path) if i.cmd in ("COPY", "ADD")]
    assert copies, f"{path.name} copies nothing"
    for ins in copies:
        assert ins.cmd == "COPY", f"{path.name}:{ins.line}: use COPY, not ADD"
        if "from" in ins.flags:
            continue
        *sources, _dest = ins.words()
        for src in sources:
            assert (REPO / src).exists(), f"{path.name}:{ins.line}: COPY source {src} does not exist"
            assert not dockerignore_excludes(IGNORE, src), f"{path.name}:{ins.line}: {src} is excluded by .dockerignore"
            if (REPO / src).is_dir():  # the files the image needs must survive the ignore rules
                files = [p for p in (REPO / src).rglob("*") if p.is_file() and p.suffix in (".py", ".proto")]
                assert files and not any(dockerignore_excludes(IGNORE, str(p.relative_to(REPO))) for p in files)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_non_root_with_a_healthcheck(path):
    ins = parse(path)
    users = [i.args.split(":")[0] for i in ins if i.cmd == "USER"]
    assert users and users[-1] not in ("root", "0"), f"{path.name}: the final USER must be non-root"
    checks = [i for i in ins if i.cmd == "HEALTHCHECK"]
    assert len(checks) == 1, f"{path.name}: exactly one HEALTHCHECK"
    cmd = healthcheck_cmd(checks[0])
    script = cmd[1]
    copied = [i.words()[-1] for i in ins if i.cmd == "COPY"]
    assert script in copied, f"{path.name}: HEALTHCHECK runs {script}, which no COPY puts in the image"
    # The probe's arguments must parse with the script's own parser.
    sys.path.insert(0, str(HEALTHCHECK.parent))
    try:
        import healthcheck
    finally:
        sys.path.pop(0)
    with pytest.raises(SystemExit) as e:
        healthcheck.main([*cmd[2:], "--help"])
    assert e.value.code == 0


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned(path):
    ins = parse(path)
    args = {i.args.split("=")[0]: i.args.split("=", 1)[1] for i in ins if i.cmd == "ARG" and "=" in i.args}
    for f in (i for i in ins if i.cmd == "FROM"):
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], f.args.split()[0])
        name, _, tag = image.partition(":")
        assert tag and tag != "latest" and "latest" not in tag, f"{path.name}: base image {image} is not pinned"


def test_target_server_image_matches_the_sglang_pin():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    (pin,) = [d for d in pyproject["project"]["optional-dependencies"]["sglang"] if d.startswith("sglang==")]
    version = pin.split("==")[1]
    ins = parse(DEPLOY / "docker" / "target-server.Dockerfile")
    (arg,) = [i.args for i in ins if i.cmd == "ARG" and i.args.startswith("SGLANG_IMAGE=")]
    assert arg == f"SGLANG_IMAGE=lmsysorg/sglang:v{version}", f"{arg} does not match the sglang extra ({pin})"


def _entry(path):
    ins = parse(path)
    entry = [i.words() for i in ins if i.cmd == "ENTRYPOINT"]
    cmd = [i.words() for i in ins if i.cmd == "CMD"]
    return (entry[-1] if entry else []) + (cmd[-1] if cmd else [])


def test_target_server_image_command_parses_with_the_server_cli():
    argv = _entry(DEPLOY / "docker" / "target-server.Dockerfile")
    assert argv[:2] == ["target-server", "serve"]
    args = server_parser().parse_args(argv[1:])
    assert args.backend == "sglang" and args.host == "0.0.0.0" and args.device == "cuda"


def test_cpu_demo_command_resolves_to_a_valid_train_config():
    argv = _entry(DEPLOY / "docker" / "cpu-demo.Dockerfile")
    assert argv[:2] == ["draft-trainer", "train"]
    cfg = load_config(TrainConfig, None, argv[2:])
    assert cfg.data.path == "/opt/specrelay/demo/data" and cfg.targets.embedded_model == "/opt/specrelay/demo/model"
    # The paths it names are the ones the image bakes.
    baked = [i.args for i in parse(DEPLOY / "docker" / "cpu-demo.Dockerfile") if i.cmd == "RUN" and "demo_assets.py" in i.args]
    assert baked and "--output /opt/specrelay/demo" in baked[0]


def _health(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HEALTHCHECK), *args], capture_output=True, text=True, timeout=30,
                          env=env_with_repo())


def test_healthcheck_script_against_a_real_server(tmp_path):
    srv = start_server(tmp_path, "--backend", "synthetic", "--metrics-port", "0")
    try:
        ok = _health("grpc", "--port", str(srv.grpc_port))
        assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stdout + ok.stderr
        svc = _health("grpc", "--port", str(srv.grpc_port), "--service", "specrelay.v1.TargetService")
        assert svc.returncode == 0, svc.stdout
        unknown = _health("grpc", "--port", str(srv.grpc_port), "--service", "no.such.Service")
        assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stdout
        metrics = _health("http", "--url", f"http://127.0.0.1:{srv.metrics_port}/metrics")
        assert metrics.returncode == 0, metrics.stdout
    finally:
        assert srv.stop() == 0, srv.log()
    down = _health("grpc", "--port", str(srv.grpc_port), "--timeout", "2")
    assert down.returncode == 1 and "UNAVAILABLE" in down.stdout, down.stdout
    gone = _health("http", "--url", f"http://127.0.0.1:{srv.metrics_port}/metrics", "--timeout", "2")
    assert gone.returncode == 1


def test_demo_assets_script_builds_a_loadable_model_and_dataset(tmp_path):
    r = subprocess.run([sys.executable, str(DEPLOY / "docker" / "demo_assets.py"), "--output", str(tmp_path),
                        "--samples", "16"], capture_output=True, text=True, timeout=300, env=env_with_repo(), cwd=REPO)
    assert r.returncode == 0, r.stderr
    from draft_trainer.data.dataset import TokenizedDataset

    ds = TokenizedDataset(tmp_path / "data")
    assert len(ds) == 16
    assert (tmp_path / "model" / "config.json").is_file()
