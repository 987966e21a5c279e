"""What one dispatcher request does on a server: stream features, or generate completions.

The dispatcher (dispatcher.py) owns balancing, windows, failover, hedging and accounting; a
kind only knows how to send a group of items to one server, check each answer, and what an
item costs the server in tokens. Answers are (item seq, result) pairs.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from common.errors import SchemaError
from common.features import FeatureSpec, SampleFeatures


class FeatureKind:
    """The features of a feature spec over the data plane (the trainer's requests)."""

    name = "features"
    max_items = 1 << 30

    def __init__(self, spec: FeatureSpec, hidden_size: int, dtype: str) -> None:
        self.spec, self.dtype = spec, dtype
        self.widths = (len(spec.layer_ids) * hidden_size,
                       {"hidden": hidden_size, "topk": spec.topk, "none": None}[spec.teacher])

    def cost(self, token_ids) -> int:
        return len(token_ids)

    def send(self, client, works, deadline_s: float) -> Iterator[tuple[int, SampleFeatures]]:
        stream = client.features(
            [w.seq for w in works], [np.asarray(w.sample.token_ids).tolist() for w in works],
            teacher=self.spec.teacher, topk=self.spec.topk, layer_ids=self.spec.layer_ids, deadline_s=deadline_s,
            expect_dtype=self.dtype, tensor_dtypes=self.spec.tensor_dtypes)
        for f in stream:
            yield f.sample_id, f

    def check(self, where: str, w, f: SampleFeatures) -> None:
        width_aux, width_t = self.widths
        t = f.teacher_TH if f.teacher_TH is not None else f.topk_ids_TK
        t_ok = t is None if width_t is None else (t is not None and tuple(t.shape) == (w.tokens, width_t))
        if f.length != w.tokens or f.aux_T3H.shape[1] != width_aux or not t_ok:
            raise SchemaError(
                f"server {where} sent features of shape aux {tuple(f.aux_T3H.shape)} / teacher "
                f"{None if t is None else tuple(t.shape)} for a {w.tokens}-token sample; expected "
                f"[{w.tokens}, {width_aux}] / [{w.tokens}, {width_t}]")


class GenerateKind:
    """Completions over the control plane (Generate). An item's `token_ids` is its prompt; its
    `data["key"]` names it on the wire, so its sampling seed does not depend on which request
    or server carries it. Result: (completion token ids, finish reason)."""

    name = "generate"
    max_items = 256  # the server's prompts-per-call limit

    def __init__(self, *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int = 0, stop_token_ids: list[int] | None = None) -> None:
        self.max_new_tokens, self.temperature, self.top_p, self.top_k = max_new_tokens, temperature, top_p, top_k
        self.seed, self.stop_token_ids = seed, list(stop_token_ids or [])

    def cost(self, token_ids) -> int:
        return len(token_ids) + self.max_new_tokens  # what the server reserves for it

    def send(self, client, works, deadline_s: float) -> Iterator[tuple[int, tuple[list[int], str]]]:
        by_key = {str(w.sample.data["key"]): w.seq for w in works}
        outs = client.generate([(str(w.sample.data["key"]), [int(t) for t in w.sample.token_ids]) for w in works],
                               max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                               top_k=self.top_k, seed=self.seed, stop_token_ids=self.stop_token_ids,
                               timeout_s=deadline_s)
        for key, tokens, reason in outs:
            if key not in by_key:
                raise SchemaError(f"Generate answered for prompt {key!r}, which the request did not send")
            yield by_key[key], (tokens, reason)

    def check(self, where: str, w, result) -> None:
        tokens, reason = result
        if reason not in ("stop", "length") or len(tokens) > self.max_new_tokens:
            raise SchemaError(f"server {where} answered a completion of {len(tokens)} tokens ending {reason!r} "
                              f"(max_new_tokens={self.max_new_tokens})")
