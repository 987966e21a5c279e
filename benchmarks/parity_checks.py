"""Checks of the SpecForge parity benchmark that read drafts with SpecRelay's own Eagle3Draft:

- `check_specforge_model`: SpecForge's initial draft reproduces, in Eagle3Draft's reference TTT,
  the per-step logits SpecForge's own TTT recorded (so the evaluator serves SpecForge's model);
- `unseen_rows` / `unseen_acceptance`: teacher-forced acceptance on cached rows the step plan never
  trains on, a low-noise reading of held-out quality beside the decoding evaluation.

Legend (shapes): K draft steps, B batch, T positions, V target vocabulary, Vd draft vocabulary,
H target hidden.
"""

from __future__ import annotations

import torch

MODEL_CHECK_TOLERANCE = 1e-3  # of the largest |logit|: fp32, the same weights, two implementations


def check_specforge_model(r: dict, handoff: dict, cfg) -> dict:
    """SpecForge's initial draft (its weights, fp32) run by SpecRelay's reference TTT forward on
    batch 0 must give the logits SpecForge's own TTT forward recorded, at every step and every
    position whose step-k input is a real token: then SpecRelay's evaluator, which loads the
    trained weights into the same Eagle3Draft, serves SpecForge's model and not a lookalike."""
    from benchmarks.parity_handoff import batch_at
    from draft_trainer.methods.eagle3.model import Eagle3Draft
    from draft_trainer.model.tensors import shift_left

    saved = torch.load(r["init_state"], weights_only=True)
    theirs = torch.load(r["check_logits"], weights_only=True)["logits_KBTV"]
    model = Eagle3Draft(cfg)
    missing, unexpected = model.load_state_dict(
        {**saved["state"], "embed_tokens.weight": handoff["frozen"]["embed_tokens"].float()}, strict=False)
    if unexpected or any(not k.startswith("rotary.") for k in missing):
        return {"ok": False, "error": f"SpecForge's state does not fit Eagle3Draft: missing {missing}, "
                                      f"unexpected {unexpected}"}
    b = batch_at(handoff, 0)
    K = theirs.shape[0]
    with torch.no_grad():
        ours = torch.stack([model.logits(g) for g in model.eval().ttt_forward(
            b["aux_BT3H"].float(), shift_left(b["input_ids_BT"], 1), K, b["attention_mask_BT"])])
    lengths = b["attention_mask_BT"].sum(1)
    pos_T = torch.arange(ours.shape[2])
    diffs = []
    for k in range(K):
        valid_BT = pos_T[None] + k + 1 < lengths[:, None]   # step k reads token t+k+1: real
        diffs.append(float((ours[k] - theirs[k]).abs()[valid_BT].max()))
    scale = float(theirs.abs().max())
    return {"ok": max(diffs) <= MODEL_CHECK_TOLERANCE * scale, "max_abs_diff_per_step": diffs,
            "max_abs_logit": scale, "tolerance_of_max_logit": MODEL_CHECK_TOLERANCE}


def unseen_rows(handoff: dict, num_steps: int, max_rows: int = 100) -> list[tuple[dict, torch.Tensor]]:
    """Up to `max_rows` cached rows the plan never trains on, each with the teacher's argmax [T]
    (computed once, shared by every draft scored on them)."""
    seen = {j for b in handoff["order"] for j in b}
    head_VH = handoff["frozen"]["lm_head"].float()
    out = []
    with torch.no_grad():
        for j, r in enumerate(handoff["rows"]):
            if len(out) >= max_rows:
                break
            if j not in seen and r["input_ids_T"].numel() > num_steps:
                out.append((r, (r["teacher_TH"].float() @ head_VH.T).argmax(-1)))
    return out


def unseen_acceptance(rows: list[tuple[dict, torch.Tensor]], embed_VH: torch.Tensor, state_path: str, cfg,
                      num_steps: int) -> dict | None:
    """Teacher-forced acceptance on `unseen_rows`. The EAGLE-3 alignment (as the trainer's loss):
    at position t the draft reads the target's features at t and token t+1, so its step k predicts
    token t+2+k, which the target's argmax at t+1+k predicts. Step k is accepted when its argmax
    (mapped to the target vocabulary) equals that teacher argmax and steps 0..k-1 were accepted;
    position t counts when token t+2 (step 0's) is an answer token. On greedy on-policy data the
    draft's inputs are then what it would see when decoding, so `tau` estimates the held-out
    acceptance length from thousands of positions instead of a few hundred decoding rounds."""
    from draft_trainer.methods.eagle3.model import Eagle3Draft
    from draft_trainer.model.tensors import shift_left

    if not rows:
        return None
    saved = torch.load(state_path, weights_only=True)
    model = Eagle3Draft(cfg).eval()
    model.load_state_dict({**saved["state"], "embed_tokens.weight": embed_VH.float()}, strict=False)
    accepted_K = torch.zeros(num_steps)
    positions = 0
    with torch.no_grad():
        for r, teacher_T in rows:
            ids_T = r["input_ids_T"]
            n = ids_T.numel() - num_steps - 1    # positions whose K teacher targets all exist
            gs = model(r["aux_T3H"][None].float(), shift_left(ids_T[None], 1), num_steps)
            match_KT = torch.stack([model.draft_to_target(model.logits(g)[0].argmax(-1))[:n]
                                    == teacher_T[k + 1:k + 1 + n] for k, g in enumerate(gs)])
            answer_T = r["loss_mask_T"][2:n + 2] > 0    # step 0's token is an answer token
            accepted_K += (match_KT.long().cumprod(0).bool() & answer_T).sum(1).float()
            positions += int(answer_T.sum())
    rate_K = (accepted_K / max(positions, 1)).tolist()
    return {"tau": 1 + sum(rate_K), "accept_rate_per_position": rate_K, "positions": positions, "rows": len(rows)}
