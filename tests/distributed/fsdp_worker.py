"""Worker for test_fsdp.py, launched by torchrun (or as one plain process for the 1-rank run).

Trains a small draft for a few steps on a fixed global batch split across ranks, with a DCP
checkpoint in the middle; then rebuilds the model, restores the checkpoint and replays the
remaining steps. Prints one JSON line on rank 0.
"""

import json
import sys
from pathlib import Path

import torch

from draft_trainer.methods.eagle3.config import DraftConfig
from draft_trainer.methods.eagle3.model import Eagle3Draft
from draft_trainer.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from draft_trainer.train.parallel import all_reduce, apply_fsdp, exit_worker, init_distributed


def build(info):
    torch.manual_seed(0)
    cfg = DraftConfig(hidden_size=32, target_hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=8, intermediate_size=64, vocab_size=100, draft_vocab_size=50, aux_layer_ids=[0, 1, 2])
    m = Eagle3Draft(cfg)
    if info.distributed:
        apply_fsdp(m, [m.embed_tokens.weight])
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    return m, opt


def steps(m, opt, info, start, stop):
    g = torch.Generator().manual_seed(1)
    B, T = 4, 10
    aux = torch.randn(B, T, 96, generator=g)
    ids = torch.randint(0, 100, (B, T), generator=g)
    tgt = torch.randint(0, 50, (B, T), generator=g)
    per = B // info.world_size
    sl = slice(info.rank * per, (info.rank + 1) * per)
    losses = []
    for _ in range(start, stop):
        outs = m.ttt_forward(aux[sl], ids[sl], 2)
        s = sum(torch.nn.functional.cross_entropy(m.logits(o).flatten(0, 1), tgt[sl].flatten(), reduction="sum")
                for o in outs)
        # Normalise by the *global* token count; FSDP averages gradients over ranks, hence * world.
        loss = s / (B * T) * info.world_size
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append((all_reduce(s.detach(), info) / (B * T)).item())
    return losses


def main(root: str) -> None:
    info = init_distributed("cpu")
    m, opt = build(info)
    first = steps(m, opt, info, 0, 2)
    save_checkpoint(Path(root), 2, m, opt, info, {"note": "test"}, {"cursor": [0, 2 + info.rank]}, {})
    rest = steps(m, opt, info, 2, 4)
    m2, opt2 = build(info)
    state = load_checkpoint(latest_checkpoint(Path(root)), m2, opt2, info)
    replay = steps(m2, opt2, info, 2, 4)
    if info.rank == 0:
        print(json.dumps({"first": first, "rest": rest, "replay": replay, "ranks": state["ranks"]}))
    exit_worker(0)


if __name__ == "__main__":
    main(sys.argv[1])
