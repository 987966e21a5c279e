"""The `target-server` command's entry point (and `python -m target_server`): chooses the process's malloc before
the server's imports (~2 s of torch, gRPC and Arrow, which a re-execution would pay twice).

jemalloc where the system has it, as `draft-trainer` (common/memory.py; `SPECRELAY_MALLOC` chooses), except with
the sglang backend, whose engine runs its own process tree and memory pools: it keeps the allocator it was started
with. A command line that cannot be read here is left to `cli.main` to report.
"""

from __future__ import annotations

import sys


def named_backend(argv: list[str]) -> str | None:
    """The backend a command line names, with the config system's precedence (an explicit flag, then a key=value
    override, then the `--config` YAML file); None when it names none or the file cannot be read."""
    flag = override = config = None
    for i, a in enumerate(argv):
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if a == "--backend":
            flag = nxt
        elif a.startswith("--backend="):
            flag = a.split("=", 1)[1]
        elif a.startswith("backend="):
            override = a.split("=", 1)[1]
        elif a == "--config":
            config = nxt
        elif a.startswith("--config="):
            config = a.split("=", 1)[1]
    if flag or override:
        return flag or override
    if config:
        import yaml

        try:
            with open(config) as f:
                data = yaml.safe_load(f)
        except (OSError, yaml.YAMLError):
            return None
        return data.get("backend") if isinstance(data, dict) else None
    return None


def console_main() -> int:
    from common.memory import prefer_jemalloc

    if named_backend(sys.argv[1:]) != "sglang":
        prefer_jemalloc()
    from target_server.cli import main

    return main()
