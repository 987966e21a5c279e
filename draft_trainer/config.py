"""The trainer's typed configuration (YAML file + `key.sub=value` overrides; see common/config.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from common.errors import ConfigError


@dataclass
class DataConfig:
    path: str = ""                   # tokenized dataset directory (draft-trainer prepare-data)
    max_length: int = 2048           # longer samples are truncated (counted in the summary)
    draft_vocab_size: int = 32000    # capped at the target vocabulary
    vocab_path: str = ""             # a pinned draft vocabulary (default: <path>/vocab.json, else computed)


@dataclass
class TargetsConfig:
    endpoints: str = ""              # host:port,host:port | dns:NAME:PORT | file:PATH; empty = embedded server
    embedded_model: str = ""         # model directory for the embedded local server (HF backend)
    embedded_dtype: str = "fp32"
    teacher: Literal["hidden", "topk"] = "hidden"
    topk: int = 0                    # for teacher=topk
    request_timeout_s: float = 120.0
    startup_timeout_s: float = 300.0
    auth_token_file: str = ""        # the servers' bearer token (same file as their --auth-token-file)
    tls_root_cert: str = ""          # PEM root that signed the servers' --tls-cert; enables TLS
    tls_server_name: str = ""        # name to verify when the certificate does not name the dialled address


@dataclass
class ModelConfig:
    ttt_steps: int = 7
    precision: Literal["auto", "bf16", "fp32"] = "auto"   # compute dtype; auto = bf16 where supported


@dataclass
class OptimConfig:
    lr: float = 1e-4
    warmup_ratio: float = 0.015
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 0.5


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    output_dir: str = "runs/draft"
    seed: int = 0
    batch_size: int = 1              # samples per optimizer step
    max_steps: int = 100
    epochs: int = 1
    log_every: int = 1
    save_every: int = 0              # 0 = only at the end

    def validate(self) -> None:
        if not self.data.path:
            raise ConfigError("data.path: required (a tokenized dataset from `draft-trainer prepare-data`)")
        if not self.targets.endpoints and not self.targets.embedded_model:
            raise ConfigError("give targets.endpoints (running target servers) or targets.embedded_model "
                              "(a model directory to serve from a local embedded server)")
        if self.batch_size <= 0 or self.max_steps <= 0 or self.model.ttt_steps <= 0:
            raise ConfigError("batch_size, max_steps and model.ttt_steps must be > 0")
        if self.targets.teacher == "topk" and self.targets.topk <= 0:
            raise ConfigError("targets.topk must be > 0 when targets.teacher=topk")
