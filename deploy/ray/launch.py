"""Launch SpecRelay on a Ray cluster: N target servers (GPU actors) + a trainer pool (Ray Train).

    # on a running cluster (from a checkout, or an image with the repository at the same path)
    python -m deploy.ray.launch --address auto --num-servers 4 --gpus-per-server 1 \\
        --server-args "--backend sglang --model /models/target --dtype bf16 --device cuda" \\
        --num-trainers 8 --gpus-per-trainer 1 --config trainer.yaml --output /shared/run1

    # locally on CPU (starts a private Ray instance on 127.0.0.1)
    python -m deploy.ray.launch --num-servers 2 --server-args "--backend hf --model /tmp/tiny" \\
        --output runs/ray data.path=/tmp/data max_steps=20

Endpoints are wired automatically (targets.endpoints = the servers' actual addresses). Written
to --output: endpoints.txt, prometheus/specrelay-target.json (file_sd for deploy/prometheus),
summary.json. Servers are drained and stopped when training ends or fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
log = logging.getLogger("deploy.ray.launch")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deploy.ray.launch", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c = p.add_argument_group("cluster")
    c.add_argument("--address", default="", help="Ray cluster address ('auto' = the running cluster); "
                   "empty = start a private local instance")
    c.add_argument("--num-cpus", type=int, default=None, help="CPUs of the private local instance")
    c.add_argument("--working-dir", default="", help="ship this directory to the workers (runtime_env); "
                   "leave empty when the image already holds the repository")
    s = p.add_argument_group("target servers")
    s.add_argument("--num-servers", type=int, default=1)
    s.add_argument("--gpus-per-server", type=float, default=0.0)
    s.add_argument("--cpus-per-server", type=float, default=1.0)
    s.add_argument("--server-args", default="--backend hf", help="`target-server serve` arguments, one string")
    s.add_argument("--bind", default="0.0.0.0", help="server bind address (the node IP is advertised for 0.0.0.0)")
    t = p.add_argument_group("trainer pool")
    t.add_argument("--num-trainers", type=int, default=1, help="Ray Train workers (ranks)")
    t.add_argument("--gpus-per-trainer", type=float, default=0.0)
    t.add_argument("--cpus-per-trainer", type=float, default=1.0)
    t.add_argument("--config", default="", help="trainer YAML config (draft_trainer/config.py)")
    t.add_argument("--output", required=True, help="run directory (output_dir, Ray Train storage, endpoints)")
    t.add_argument("overrides", nargs="*", help="trainer key.sub=value overrides")
    p.add_argument("--log-level", default="INFO")
    return p


def trainer_overrides(args: argparse.Namespace) -> list[str]:
    """The trainer's key=value overrides. `resume_from=auto` comes first (a user's own resume_from
    wins): a relaunch into the same --output, or a restarted worker, continues the run."""
    return ["resume_from=auto", *args.overrides, f"output_dir={Path(args.output).resolve() / 'train'}"]


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from common.config import load_config
    from common.errors import SpecRelayError
    from draft_trainer.config import TrainConfig

    out = Path(args.output).resolve()
    overrides = trainer_overrides(args)
    try:
        # Validate the trainer config before anything starts (endpoints are filled in later).
        load_config(TrainConfig, args.config or None, [*overrides, "targets.endpoints=pending:0"])
    except SpecRelayError as e:
        print(f"deploy.ray.launch: error: {e}", file=sys.stderr)
        return 2
    from deploy.ray.servers import server_config

    server_config(args.server_args, args.bind)  # bad server flags exit here (argparse), before Ray starts
    try:
        import ray
    except ImportError:
        print("deploy.ray.launch: error: Ray is not installed: pip install 'specrelay[ray]'", file=sys.stderr)
        return 2
    from deploy.ray.servers import start_servers, stop_servers
    from deploy.ray.train import run_trainer_pool

    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
    runtime_env = {"working_dir": args.working_dir} if args.working_dir else {"env_vars": env}
    if args.address:
        ray.init(address=args.address, runtime_env=runtime_env)
    else:
        # A private instance on loopback only, no dashboard.
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 runtime_env=runtime_env)
    actors: list = []
    try:
        actors, servers = start_servers(args.num_servers, args.server_args, gpus=args.gpus_per_server,
                                        cpus=args.cpus_per_server, bind_host=args.bind)
        endpoints = [s.endpoint for s in servers]
        out.mkdir(parents=True, exist_ok=True)
        (out / "endpoints.txt").write_text("\n".join(endpoints) + "\n")
        _write_json(out / "prometheus" / "specrelay-target.json",
                    [{"targets": [f"{s.host}:{s.metrics_port}" for s in servers if s.metrics_port],
                      "labels": {"deployment": "ray"}}])
        log.info("training against %s", ",".join(endpoints))
        summary = run_trainer_pool(endpoints, config=str(Path(args.config).resolve()) if args.config else "",
                                   overrides=overrides, num_workers=args.num_trainers,
                                   gpus_per_worker=args.gpus_per_trainer, cpus_per_worker=args.cpus_per_trainer,
                                   storage_path=str(out / "ray"), name="trainer")
        summary["endpoints"] = endpoints
        _write_json(out / "summary.json", summary)
        print(json.dumps(summary, indent=1))
        return 0
    finally:
        if actors:
            stop_servers(actors)
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
