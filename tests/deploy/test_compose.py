"""deploy/compose: `docker-compose config` (Debian's docker-compose; needs no Docker engine)
validates the file against the Compose schema, and the resolved services are checked against
the real CLIs, the trainer config and the compose Prometheus config.
"""

from __future__ import annotations

import json
import subprocess

import yaml

from common.config import load_config
from draft_trainer.cli import build_parser as trainer_parser
from draft_trainer.config import TrainConfig
from target_server.cli import build_parser as server_parser
from tests.deploy.conftest import DEPLOY, REPO, require_tool

COMPOSE = DEPLOY / "compose"


def mounts(service: dict) -> dict[str, str]:
    """{container path: host source} from short ("src:dst[:mode]") or long volume syntax."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            src, dst = v.split(":")[:2]
        else:
            src, dst = v["source"], v["target"]
        out[dst] = src
    return out


def resolved(tmp_path) -> dict:
    tool = require_tool("docker-compose")
    env = {"PATH": "/usr/bin:/bin", "SPECRELAY_MODEL_DIR": str(tmp_path / "model"),
           "SPECRELAY_DATA_DIR": str(tmp_path / "data"), "HOME": str(tmp_path)}
    q = subprocess.run([tool, "-f", str(COMPOSE / "docker-compose.yml"), "config", "-q"], capture_output=True,
                       text=True, timeout=60, env=env)
    assert q.returncode == 0, q.stderr
    r = subprocess.run([tool, "-f", str(COMPOSE / "docker-compose.yml"), "config"], capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)


def test_compose_file_validates_and_wires_the_services(tmp_path):
    cfg = resolved(tmp_path)
    svcs = cfg["services"]
    assert set(svcs) == {"target-0", "target-1", "trainer", "prometheus", "grafana"}
    targets = {n: s for n, s in svcs.items() if n.startswith("target-")}

    # Target servers: the real CLI accepts their arguments; all interfaces bound explicitly.
    metrics_ports = {}
    for name, s in targets.items():
        argv = list(s["command"])
        args = server_parser().parse_args(["serve", *argv])
        assert args.host == "0.0.0.0" and args.backend == "sglang"
        metrics_ports[name] = (args.grpc_port, args.metrics_port)
        assert s["healthcheck"]["test"][-1] == str(args.grpc_port)
        assert s["build"]["context"] == str(REPO)
        assert (REPO / s["build"]["dockerfile"]).is_file()
    # GPUs: no device is given to two services.
    devices = [d for s in svcs.values() for r in [s.get("deploy", {}).get("resources", {}).get("reservations", {})]
               for dev in r.get("devices", []) for d in dev["device_ids"]]
    assert len(devices) == len(set(devices)) and len(devices) == 4

    # Trainer: torchrun over the real trainer CLI, config loads, endpoints are the target services.
    tr = svcs["trainer"]
    assert tr["entrypoint"] == ["torchrun"]
    argv = tr["command"]
    m = argv.index("-m")
    from torch.distributed.run import get_args_parser

    targs = get_args_parser().parse_args([*argv[:m], "--module", argv[m + 1], "x"])
    nproc = int(targs.nproc_per_node)
    assert argv[m + 1] == "draft_trainer" and trainer_parser().parse_args(argv[m + 2:]).command == "train"
    (gpu_res,) = tr["deploy"]["resources"]["reservations"]["devices"]
    assert len(gpu_res["device_ids"]) == nproc
    mounts_ = mounts(tr)
    raw = yaml.safe_load((COMPOSE / "trainer.yaml").read_text())
    assert mounts_["/etc/specrelay/trainer.yaml"] == str(COMPOSE / "trainer.yaml")
    assert raw["metrics_host"] == "0.0.0.0" and raw["metrics_port"] == 9400  # what Prometheus scrapes below
    tmp = tmp_path / "trainer.yaml"
    tmp.write_text(yaml.safe_dump(raw))
    tcfg = load_config(TrainConfig, tmp)
    assert sorted(tcfg.targets.endpoints.split(",")) == sorted(f"{n}:{g}" for n, (g, _m) in metrics_ports.items())
    assert any(tcfg.output_dir.startswith(t) for t in mounts_) and any(tcfg.data.path.startswith(t) for t in mounts_)

    # Prometheus scrapes exactly the servers' metrics ports and one port per trainer rank.
    prom = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    jobs = {j["job_name"]: [t for sc in j["static_configs"] for t in sc["targets"]] for j in prom["scrape_configs"]}
    assert sorted(jobs["specrelay-target"]) == sorted(f"{n}:{mp}" for n, (_g, mp) in metrics_ports.items())
    assert sorted(jobs["specrelay-trainer"]) == [f"trainer:{9400 + r}" for r in range(nproc)]
    pmounts = mounts(svcs["prometheus"])
    assert pmounts["/etc/prometheus/rules"] == str(DEPLOY / "prometheus" / "rules")
    gmounts = mounts(svcs["grafana"])
    assert gmounts["/var/lib/grafana/dashboards"] == str(DEPLOY / "grafana")
    assert gmounts["/etc/grafana/provisioning"] == str(DEPLOY / "grafana" / "provisioning")

    # Security: only Prometheus and Grafana are published, on loopback; secrets are never in git.
    for name, s in svcs.items():
        for p in s.get("ports", []):
            host_ip = p.split(":")[0] if isinstance(p, str) else p.get("host_ip")
            assert name in ("prometheus", "grafana") and host_ip == "127.0.0.1", (name, p)
    assert (COMPOSE / "secrets" / ".gitignore").read_text().splitlines()[-2:] == ["*", "!.gitignore"]
    assert json.dumps(cfg).count("specrelay_token") >= 3
