"""The feature handoff of the SpecForge parity benchmark: one file both trainers read.

bench_parity_specforge.py writes it once; specrelay_parity_worker.py (this repo's venv) and
specforge_parity_worker.py (SpecForge's venv, which has torch but not this project's
dependencies) read it. So this module imports torch and the standard library only.

What it holds (torch.save of a dict, `FORMAT` names the layout):
  rows        per training sample: input_ids_T int64, loss_mask_T float32, aux_T3H and teacher_TH
              (the target's three aux hidden states and its final-norm input, cache dtype);
  order       per optimizer step, the row indices of its batch: both sides run the same batches
              in the same order, so equal steps = equal tokens;
  frozen      the target's embed_tokens and lm_head [V, H];
  used_Vd     the draft vocabulary (ascending target ids);
  schedule    lr, warmup_steps, total_steps (= len(order)), grad_clip, weight_decay, ttt_steps,
              batch_size, seed;
  draft_config, model_info  SpecRelay's DraftConfig and ModelInfo as dicts (geometry, rope).

Legend (shapes): B batch, T longest sample of the batch (right padding), H target hidden, V
target vocabulary, Vd draft vocabulary.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

FORMAT = "specrelay-parity-handoff/1"
ROW_KEYS = ("input_ids_T", "loss_mask_T", "aux_T3H", "teacher_TH")
SCHEDULE_KEYS = ("lr", "warmup_steps", "total_steps", "grad_clip", "weight_decay", "ttt_steps", "batch_size", "seed")


class HandoffError(ValueError):
    """A handoff file that is not what both trainers expect."""


def plan_order(lengths: list[int], batch_size: int, tokens: int, seed: int, holdout: int = 0) -> list[list[int]]:
    """Batches of `batch_size` row indices until `tokens` real tokens are covered: each epoch a
    fresh seeded permutation of the rows (the trainer's sampling: shuffled, no replacement within
    an epoch); the last batch of an epoch may be short. The last `holdout` rows are never planned
    (scored teacher-forced after training)."""
    trained = len(lengths) - holdout
    if trained < 1:
        raise HandoffError(f"no training samples: {len(lengths)} rows, {holdout} held out")
    if batch_size < 1 or tokens < 1:
        raise HandoffError(f"batch_size and tokens must be >= 1, got {batch_size}, {tokens}")
    order, total, epoch = [], 0, 0
    while total < tokens:
        perm = torch.randperm(trained, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for i in range(0, len(perm), batch_size):
            batch = perm[i:i + batch_size]
            order.append(batch)
            total += sum(lengths[j] for j in batch)
            if total >= tokens:
                break
        epoch += 1
    return order


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """int(ratio * total): how both SpecForge's BF16Optimizer and SpecRelay's LRSchedule round it."""
    return int(warmup_ratio * total_steps)


def save_handoff(path: str | Path, **content) -> Path:
    """Validate and write atomically (a temp file renamed into place: never half-written)."""
    data = {"format": FORMAT, **content}
    check(data)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(data, tmp)
    os.replace(tmp, path)
    return path


def load_handoff(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise HandoffError(f"{path}: no handoff file; bench_parity_specforge.py writes it before starting the workers")
    data = torch.load(path, weights_only=True)  # read whole: the workers' RSS after loading is then the data's
    check(data, str(path))
    return data


def check(data: dict, where: str = "handoff") -> None:
    """Every field both sides read, with consistent shapes; a clear error naming what is wrong."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise HandoffError(f"{where}: format {got!r}, expected {FORMAT!r}; re-run bench_parity_specforge.py")
    missing = [k for k in ("rows", "order", "frozen", "used_Vd", "schedule", "draft_config", "model_info")
               if k not in data]
    if missing:
        raise HandoffError(f"{where}: missing fields {missing}")
    sched = data["schedule"]
    missing = [k for k in SCHEDULE_KEYS if k not in sched]
    if missing:
        raise HandoffError(f"{where}: schedule lacks {missing}")
    if sched["total_steps"] != len(data["order"]):
        raise HandoffError(f"{where}: schedule total_steps {sched['total_steps']} != "
                           f"{len(data['order'])} planned steps")
    if not 1 <= sched["warmup_steps"] < sched["total_steps"]:
        raise HandoffError(f"{where}: warmup_steps {sched['warmup_steps']} must be in [1, total_steps="
                           f"{sched['total_steps']}): raise --tokens or --warmup-ratio")
    rows, H = data["rows"], data["frozen"]["lm_head"].shape[1]
    for i, r in enumerate(rows):
        absent = [k for k in ROW_KEYS if k not in r]
        if absent:
            raise HandoffError(f"{where}: row {i} lacks {absent}")
        T = r["input_ids_T"].shape[0]
        shapes = {k: tuple(r[k].shape) for k in ROW_KEYS}
        if shapes != {"input_ids_T": (T,), "loss_mask_T": (T,), "aux_T3H": (T, 3 * H), "teacher_TH": (T, H)}:
            raise HandoffError(f"{where}: row {i} has shapes {shapes}; expected T={T}, H={H} (aux 3H)")
    bad = [b for b in data["order"] if not b or any(not 0 <= j < len(rows) for j in b)]
    if bad:
        raise HandoffError(f"{where}: order has empty or out-of-range batches, e.g. {bad[0]} ({len(rows)} rows)")
    if data["frozen"]["embed_tokens"].shape != data["frozen"]["lm_head"].shape:
        raise HandoffError(f"{where}: embed_tokens {tuple(data['frozen']['embed_tokens'].shape)} and lm_head "
                           f"{tuple(data['frozen']['lm_head'].shape)} differ")
    used = data["used_Vd"]
    if used.dtype != torch.int64 or used.numel() != data["draft_config"]["draft_vocab_size"] or \
            bool((used[1:] <= used[:-1]).any()):
        raise HandoffError(f"{where}: used_Vd must be {data['draft_config']['draft_vocab_size']} ascending int64 ids")


def batch_at(data: dict, step: int) -> dict[str, torch.Tensor]:
    """The padded batch of `step`: input_ids_BT, loss_mask_BT, attention_mask_BT (1 = real token),
    aux_BT3H, teacher_BTH (the rows' dtype). Padding is zeros with masks 0."""
    rows = [data["rows"][j] for j in data["order"][step]]
    B, T = len(rows), max(r["input_ids_T"].shape[0] for r in rows)
    first = rows[0]
    out = {"input_ids_BT": torch.zeros(B, T, dtype=torch.long),
           "loss_mask_BT": torch.zeros(B, T, dtype=torch.float32),
           "attention_mask_BT": torch.zeros(B, T, dtype=torch.long),
           "aux_BT3H": torch.zeros(B, T, first["aux_T3H"].shape[1], dtype=first["aux_T3H"].dtype),
           "teacher_BTH": torch.zeros(B, T, first["teacher_TH"].shape[1], dtype=first["teacher_TH"].dtype)}
    for b, r in enumerate(rows):
        n = r["input_ids_T"].shape[0]
        out["input_ids_BT"][b, :n] = r["input_ids_T"]
        out["loss_mask_BT"][b, :n] = r["loss_mask_T"]
        out["attention_mask_BT"][b, :n] = 1
        out["aux_BT3H"][b, :n] = r["aux_T3H"]
        out["teacher_BTH"][b, :n] = r["teacher_TH"]
    return out


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the C compiler torch.compile runs)."""
    import resource
    import time

    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def _usage() -> tuple[float, float, int]:
    """(CPU seconds, of them in the kernel, minor page faults) of this process and its finished children."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    sys_s = me.ru_stime + kids.ru_stime
    return me.ru_utime + kids.ru_utime + sys_s, sys_s, me.ru_minflt + kids.ru_minflt


class StepMeter:
    """What each training step cost: CPU seconds (user + system), the system part, minor page faults,
    and the step's real tokens. `by_quarter` says whether a side slows down as a run goes on and where
    the time went (a rising system share and fault count point at the allocator returning and
    re-faulting memory; a flat one at the arithmetic)."""

    def __init__(self) -> None:
        self.cpu_s: list[float] = []
        self.sys_s: list[float] = []
        self.faults: list[int] = []
        self.tokens: list[int] = []
        self._last = _usage()

    def step(self, tokens: int) -> None:
        now = _usage()
        self.cpu_s.append(now[0] - self._last[0])
        self.sys_s.append(now[1] - self._last[1])
        self.faults.append(now[2] - self._last[2])
        self.tokens.append(tokens)
        self._last = now

    def by_quarter(self) -> dict[str, list[float]]:
        quarters = _bounds(len(self.tokens), 4)
        return {"tokens_per_cpu_s_by_quarter": rates_by_part(self.cpu_s, self.tokens),
                "sys_share_by_quarter": [sum(self.sys_s[i:j]) / max(sum(self.cpu_s[i:j]), 1e-9) for i, j in quarters],
                "minor_faults_per_step_by_quarter": [sum(self.faults[i:j]) / (j - i) for i, j in quarters]}


def rss_mb() -> float:
    """This process's resident memory now (VmRSS), MB: taken after loading the handoff, so a worker
    can report its peak RSS beside what the shared data alone occupies."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """`parts` consecutive, equal runs of n steps (the last takes the remainder); none when n < parts."""
    b = [n * i // parts for i in range(parts + 1)]
    return list(zip(b, b[1:])) if n >= parts else []


def rates_by_part(step_cpu_s: list[float], step_tok: list[int], parts: int = 4) -> list[float]:
    """Tokens per CPU-second over each of `parts` consecutive, equal runs of steps (the last takes the
    remainder): whether a side slows down over a run. Both sides train the same batches in the same
    order, so part i of one side is comparable to part i of the other; the first part of a side that
    compiles includes the compile."""
    if len(step_cpu_s) != len(step_tok):
        raise ValueError(f"{len(step_cpu_s)} step times for {len(step_tok)} steps")
    return [sum(step_tok[a:b]) / max(sum(step_cpu_s[a:b]), 1e-9) for a, b in _bounds(len(step_tok), parts)]


def step_tokens(data: dict, step: int) -> tuple[int, int]:
    """(real tokens, supervised tokens) of one step's batch."""
    rows = [data["rows"][j] for j in data["order"][step]]
    return sum(r["input_ids_T"].shape[0] for r in rows), int(sum(float(r["loss_mask_T"].sum()) for r in rows))
