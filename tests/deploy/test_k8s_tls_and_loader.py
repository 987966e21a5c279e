"""deploy/k8s/overlays/gpu-tls and deploy/k8s/examples/load-model-and-data.yaml: strict schemas,
and what a schema cannot check: the paths each side reads are the ones mounted, the commands
parse with the real CLIs, and the certificate recipe of docs/operations.md gives a certificate
the real server serves and the real probe accepts."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from common.config import load_config
from draft_trainer.cli import build_parser as trainer_parser
from draft_trainer.config import TrainConfig
from target_server.cli import build_parser as server_parser
from tests.deploy.conftest import DEPLOY, REPO, require_module, require_tool
from tests.support.procs import env_with_repo, start_server

K8S = DEPLOY / "k8s"
LOADER = K8S / "examples" / "load-model-and-data.yaml"
VERSIONS = ["1.29", "1.37"]


def kustomize(path: Path) -> list[dict]:
    r = subprocess.run([require_tool("kubectl"), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def one(docs, kind):
    (d,) = [d for d in docs if d["kind"] == kind]
    return d


def mounted(pod_spec: dict, container: dict, path: str) -> dict:
    """The volume `path` lies on in `container` (fails if none)."""
    for m in container.get("volumeMounts", []):
        if path.startswith(m["mountPath"].rstrip("/") + "/"):
            return next(v for v in pod_spec["volumes"] if v["name"] == m["name"])
    raise AssertionError(f"{path} is on no volume of container {container['name']}")


def healthcheck_parser():
    sys.path.insert(0, str(DEPLOY / "docker"))
    try:
        import healthcheck
    finally:
        sys.path.pop(0)
    return healthcheck.build_parser()


def validate_strict(docs: list[dict]) -> None:
    require_module("kubernetes_validate")
    import kubernetes_validate

    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com"):
            continue  # the CRDs are checked by test_k8s.py on the same objects of the gpu overlay
        for version in VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


# ----------------------------------------------------------------------------- gpu-tls

def test_gpu_tls_overlay_wires_certificates_probes_and_trainer_keys(tmp_path):
    docs = kustomize(K8S / "overlays" / "gpu-tls")
    validate_strict(docs)
    sts, job = one(docs, "StatefulSet"), one(docs, "Job")
    sspec, jspec = sts["spec"]["template"]["spec"], job["spec"]["template"]["spec"]
    (server,), (trainer,) = sspec["containers"], jspec["containers"]

    args = server_parser().parse_args(["serve", *server["args"]])
    for path, key in ((args.tls_cert, "tls.crt"), (args.tls_key, "tls.key")):
        vol = mounted(sspec, server, path)
        assert vol["secret"]["secretName"] == "specrelay-tls" and Path(path).name == key
    # The trainers get the CA only, never the server key.
    assert all(v.get("secret", {}).get("secretName") != "specrelay-tls" for v in jspec["volumes"])

    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("specrelay-trainer-config"))
    (tmp_path / "trainer.yaml").write_text(cm["data"]["trainer.yaml"])
    targv = trainer["args"][trainer["args"].index("train"):]
    targs = trainer_parser().parse_args(targv)
    cfg = load_config(TrainConfig, str(tmp_path / "trainer.yaml"), targs.overrides)
    ca_vol = mounted(jspec, trainer, cfg.targets.tls_root_cert)
    assert ca_vol["secret"]["secretName"] == "specrelay-tls-ca" and Path(cfg.targets.tls_root_cert).name == "ca.crt"
    assert cfg.targets.tls_server_name and cfg.resume_from == "auto"

    hc = healthcheck_parser()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        p = server[probe]
        assert "grpc" not in p, f"{probe}: kubelet's grpc probe cannot speak TLS"
        cmd = p["exec"]["command"]
        assert cmd[1] == "/usr/local/bin/specrelay-healthcheck"
        h = hc.parse_args(cmd[2:])
        assert h.port == args.grpc_port and h.tls_server_name == cfg.targets.tls_server_name
        assert mounted(sspec, server, h.tls_ca)["secret"]["secretName"] == "specrelay-tls-ca"
        assert p.get("timeoutSeconds", 1) >= 4, f"{probe}: a Python probe needs more than kubelet's 1 s default"
    assert hc.parse_args(server["livenessProbe"]["exec"]["command"][2:]).service == "specrelay.v1.TargetService"


def _doc_block(heading: str, first_word: str) -> str:
    """The first ```bash block under `heading` in docs/operations.md whose first command starts with `first_word`."""
    text = (REPO / "docs" / "operations.md").read_text()
    section = text.split(heading, 1)[1]
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        if block.strip().startswith(first_word):
            return block
    raise AssertionError(f"no ```bash block starting with {first_word} under {heading}")


def test_documented_certificate_recipe_works_with_the_server_and_the_probe(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command-line tool")
    recipe = _doc_block("## TLS on Kubernetes", "openssl")
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", recipe], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    srv = start_server(tmp_path, "--backend", "synthetic", "--synthetic-hidden-size", "16",
                       "--tls-cert", str(tmp_path / "tls.crt"), "--tls-key", str(tmp_path / "tls.key"))
    try:
        def probe(*extra):
            return subprocess.run([sys.executable, str(DEPLOY / "docker" / "healthcheck.py"), "grpc", "--port",
                                   str(srv.grpc_port), "--timeout", "5", *extra], capture_output=True, text=True,
                                  timeout=30, env=env_with_repo())
        # As the gpu-tls probes run it: the CA and the service name the certificate carries.
        ok = probe("--tls-ca", str(tmp_path / "ca.crt"), "--tls-server-name", "specrelay-target")
        assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stdout + ok.stderr
        wrong = probe("--tls-ca", str(tmp_path / "ca.crt"), "--tls-server-name", "not-in-the-certificate")
        assert wrong.returncode == 1, wrong.stdout
    finally:
        srv.stop()


# ----------------------------------------------------------------------------- loader Job

def test_loader_job_fills_the_paths_the_gpu_overlay_reads():
    docs = [d for d in yaml.safe_load_all(LOADER.read_text()) if d]
    validate_strict(docs)
    job = one(docs, "Job")
    spec = job["spec"]["template"]["spec"]
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    assert {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v} <= claims
    steps = {c["name"]: c for c in [*spec["initContainers"], *spec["containers"]]}

    def rel(container, path):  # (claim, path inside the claim)
        vol = mounted(spec, container, path)
        m = next(m for m in container["volumeMounts"] if m["name"] == vol["name"])
        return vol["persistentVolumeClaim"]["claimName"], str(Path(path).relative_to(m["mountPath"]))

    model_cmd = steps["model"]["command"]
    assert model_cmd[:2] == ["hf", "download"]
    model_dir = model_cmd[model_cmd.index("--local-dir") + 1]
    prep = trainer_parser().parse_args(steps["prepare"]["command"][1:])
    assert prep.func.__name__ == "_prepare_data"
    # prepare-data reads the target's own tokenizer: the directory the model step wrote.
    assert rel(steps["prepare"], prep.model) == rel(steps["model"], model_dir)
    raw_cmd = steps["raw-data"]["command"]
    raw = str(Path(raw_cmd[raw_cmd.index("--local-dir") + 1]) / raw_cmd[3])
    assert rel(steps["prepare"], prep.input[0]) == rel(steps["raw-data"], raw)

    # The gpu overlay serves the model and trains on the data from the same places inside the claims.
    gpu = kustomize(K8S / "overlays" / "gpu")
    gsts, gjob = one(gpu, "StatefulSet"), one(gpu, "Job")
    gs_spec, gj_spec = gsts["spec"]["template"]["spec"], gjob["spec"]["template"]["spec"]
    served = server_parser().parse_args(["serve", *gs_spec["containers"][0]["args"]]).model
    m = next(m for m in gs_spec["containers"][0]["volumeMounts"] if served.startswith(m["mountPath"] + "/"))
    assert str(Path(served).relative_to(m["mountPath"])) == rel(steps["model"], model_dir)[1]
    data_path = yaml.safe_load(next(d for d in gpu if d["kind"] == "ConfigMap")["data"]["trainer.yaml"])["data"]["path"]
    m = next(m for m in gj_spec["containers"][0]["volumeMounts"] if data_path.startswith(m["mountPath"] + "/"))
    assert str(Path(data_path).relative_to(m["mountPath"])) == rel(steps["prepare"], prep.output)[1]


def test_loader_download_commands_use_real_hf_flags():
    hf = shutil.which("hf", path=str(Path(sys.executable).parent)) or shutil.which("hf")
    if hf is None:
        pytest.skip("needs huggingface_hub's `hf` command (installed with transformers)")
    text = subprocess.run([hf, "download", "--help"], capture_output=True, text=True, timeout=60).stdout
    docs = [d for d in yaml.safe_load_all(LOADER.read_text()) if d]
    spec = one(docs, "Job")["spec"]["template"]["spec"]
    for c in spec["initContainers"]:
        for flag in (a for a in c["command"] if a.startswith("--")):
            assert flag in text, f"{c['name']}: `hf download` has no {flag}"
