"""Every shipped trainer config resumes: a restarted pod, container, torchrun worker or Ray
relaunch continues from the latest checkpoint in output_dir (resume_from=auto) instead of
starting a second run in the same directory.

Each deployment's trainer command is resolved the way it runs (its --config file plus its
key=value arguments) and loaded through draft_trainer's own config loader; a last test checks
that no trainer config under deploy/ escaped this list.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from common.config import load_config
from draft_trainer.cli import build_parser as trainer_parser
from draft_trainer.config import TrainConfig
from tests.deploy.conftest import DEPLOY, require_tool

K8S = DEPLOY / "k8s"
KUSTOMIZATIONS = ["base", "overlays/gpu", "overlays/gpu-tls", "overlays/cpu-demo"]


def load_train(argv: list[str], files: dict[str, Path]) -> TrainConfig:
    """Load a `... train --config=X k=v ...` command line as the trainer would; `files` maps the
    container path of --config to the file to read."""
    args = trainer_parser().parse_args(argv[argv.index("train"):])
    path = files[args.config] if args.config else None
    return load_config(TrainConfig, str(path) if path else None, args.overrides)


def kustomize(path: Path) -> list[dict]:
    kubectl = require_tool("kubectl")
    r = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def resolve_k8s(kustomization: str, tmp_path: Path) -> tuple[TrainConfig, list[str], Path]:
    """The trainer Job's config as it runs (ConfigMap file + args) and the repository file it came from."""
    docs = kustomize(K8S / kustomization)
    (job,) = [d for d in docs if d["kind"] == "Job"]
    (c,) = job["spec"]["template"]["spec"]["containers"]
    argv = [*c["command"], *c["args"]]
    cfg_path = next(a.split("=", 1)[1] for a in argv if a.startswith("--config="))
    mount = next(m for m in c["volumeMounts"] if cfg_path.startswith(m["mountPath"].rstrip("/") + "/"))
    vol = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == vol["configMap"]["name"]]
    text = cm["data"][Path(cfg_path).name]
    local = tmp_path / kustomization.replace("/", "-") / "trainer.yaml"
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_text(text)
    gen = yaml.safe_load((K8S / kustomization / "kustomization.yaml").read_text()).get("configMapGenerator", [])
    (src,) = [K8S / kustomization / f.split("=")[-1] for g in gen for f in g.get("files", [])
              if (K8S / kustomization / f.split("=")[-1]).read_text() == text]
    return load_train(argv, {cfg_path: local}), argv, src.resolve()


def resolve_compose() -> tuple[TrainConfig, Path]:
    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    svc = compose["services"]["trainer"]
    argv = [*svc.get("entrypoint", []), *svc["command"]]
    files = {dst: (DEPLOY / "compose" / src).resolve() for src, dst in
             (v.split(":")[:2] for v in svc["volumes"]) if src.startswith("./")}
    args = trainer_parser().parse_args(argv[argv.index("train"):])
    return load_train(argv, files), files[args.config]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_kubernetes_trainer_job_resumes(kustomization, tmp_path):
    cfg, argv, _ = resolve_k8s(kustomization, tmp_path)
    assert cfg.resume_from == "auto", f"{kustomization}: the trainer Job would start a fresh run on a restart"
    assert any(a.startswith("--max-restarts=") and int(a.split("=")[1]) > 0 for a in argv)  # torchrun restarts too


def test_compose_trainer_resumes():
    cfg, _ = resolve_compose()
    assert cfg.resume_from == "auto"


def test_cpu_demo_image_command_resumes():
    from tests.deploy.dockerfile import parse

    cmd = [i.words() for i in parse(DEPLOY / "docker" / "cpu-demo.Dockerfile") if i.cmd == "CMD"][-1]
    assert load_train(cmd, {}).resume_from == "auto"


def test_ray_launcher_resumes_unless_told_otherwise(tmp_path):
    from deploy.ray.launch import build_parser, trainer_overrides

    args = build_parser().parse_args(["--output", str(tmp_path), "data.path=/x"])
    cfg = load_config(TrainConfig, None, [*trainer_overrides(args), "targets.endpoints=pending:0"])
    assert cfg.resume_from == "auto" and cfg.output_dir == str(tmp_path.resolve() / "train")
    args = build_parser().parse_args(["--output", str(tmp_path), "data.path=/x", "resume_from=/ckpt/step_5"])
    assert load_config(TrainConfig, None, [*trainer_overrides(args), "targets.endpoints=pending:0"]).resume_from \
        == "/ckpt/step_5"


def test_every_trainer_config_under_deploy_is_one_a_deployment_runs(tmp_path):
    """A trainer config is a YAML mapping with output_dir (manifests have apiVersion, compose has
    services); each must be the file a deployment resolved above (none escapes these tests)."""
    found = set()
    for p in DEPLOY.rglob("*.y*ml"):
        try:
            docs = list(yaml.safe_load_all(p.read_text()))
        except yaml.YAMLError:
            continue
        if len(docs) == 1 and isinstance(docs[0], dict) and "output_dir" in docs[0] and "apiVersion" not in docs[0]:
            found.add(p.resolve())
    assert found, "no trainer config found under deploy/: the discovery is broken"
    for p in found:
        raw = yaml.safe_load(p.read_text())
        assert raw.get("resume_from") == "auto", f"{p.relative_to(DEPLOY)}: set resume_from: auto"
    used = {resolve_k8s(k, tmp_path)[2] for k in KUSTOMIZATIONS} | {resolve_compose()[1]}
    unchecked = found - used
    assert not unchecked, f"trainer configs no deployment test resolved: {sorted(map(str, unchecked))}"
