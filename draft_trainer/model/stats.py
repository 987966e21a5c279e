"""Per-position training metrics shared by every draft method, mergeable over micro-batches and ranks.

Position k is the k-th drafted token after the last verified one (a TTT step for EAGLE-3, a
block offset for block drafters). Metrics per position k, over its supervised positions:
  acc_k       draft argmax == target argmax
  cond_acc_k  acc_k given positions 0..k-1 were all right from the same start
  exp_acc_k   sum_v min(p_v, q_v): acceptance probability under sampling
  sim_accept_len = 1 + sum_k prod_{j<=k} cond_acc_j: tokens per target forward of a greedy chain
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SUM_KEYS = ("n", "ce", "right", "chain", "prev", "ea")


@dataclass
class StepStats:
    """Per-TTT-step metrics. `sums` holds the raw sums behind the ratios (per step: supervised
    positions n, cross-entropy, right, chain-right, chain-eligible prev, expected acceptance), so
    micro-batches and ranks merge exactly (`merged`)."""

    loss: list[float] = field(default_factory=list)
    acc: list[float] = field(default_factory=list)
    cond_acc: list[float] = field(default_factory=list)
    exp_acc: list[float] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    sim_accept_len: float = 1.0
    sums: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in SUM_KEYS})

    def add_step(self, n: float, ce: float, right: float, chain: float, prev: float, ea: float) -> None:
        for key, v in zip(SUM_KEYS, (n, ce, right, chain, prev, ea)):
            self.sums[key].append(float(v))

    @classmethod
    def from_sums(cls, sums: dict[str, list[float]]) -> "StepStats":
        st = cls(sums={k: list(v) for k, v in sums.items()})
        for n, ce, right, chain, prev, ea in zip(*(sums[k] for k in SUM_KEYS)):
            st.loss.append(ce / max(n, 1.0))
            st.acc.append(right / max(n, 1.0))
            st.cond_acc.append(chain / max(prev, 1.0))
            st.exp_acc.append(ea / max(n, 1.0))
            st.positions.append(int(n))
        st.sim_accept_len = sim_accept_len(st.cond_acc)
        return st

    def sums_tensor(self) -> torch.Tensor:
        return torch.tensor([self.sums[k] for k in SUM_KEYS], dtype=torch.float64)

    @classmethod
    def merged(cls, parts: list["StepStats"], all_reduce=None) -> "StepStats":
        """Sum the raw counts of several micro-batches (and, with `all_reduce`, of all ranks)."""
        total = torch.stack([p.sums_tensor() for p in parts]).sum(0)
        if all_reduce is not None:
            total = all_reduce(total)
        return cls.from_sums({k: total[i].tolist() for i, k in enumerate(SUM_KEYS)})


def sim_accept_len(cond_acc: list[float]) -> float:
    """1 + sum_k prod_{j<=k} cond_acc_j: expected tokens per target forward of a K-token chain."""
    total, run = 1.0, 1.0
    for a in cond_acc:
        run *= a
        total += run
    return total
