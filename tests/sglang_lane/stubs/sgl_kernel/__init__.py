"""Stand-in for SGLang's CUDA/AMX kernel package (CPU test lane only; see ../README.md).

The CPU ops SGLang's EAGLE speculative decoding calls are implemented here in plain
Python/torch, one request at a time, following the semantics of SGLang's own Triton versions
of the same kernels (sglang/kernels/ops/speculative/*.py, kvcache/cache_move.py). They are
slow and simple on purpose: tiny models only. Any other attribute is a function raising
NotImplementedError, so a path that needs a kernel we do not provide fails loudly.
"""

from __future__ import annotations

import ctypes

import torch


def copy_all_layer_kv_cache_cpu(data_ptrs, strides, tgt_loc, src_loc) -> None:
    """For every KV buffer (raw base address, bytes per token slot): slot src[i] -> slot tgt[i].

    All sources are read before any target is written (in-place safe, like the Triton kernel).
    """
    src, tgt = src_loc.tolist(), tgt_loc.tolist()
    for base, stride in zip(data_ptrs.tolist(), strides.tolist()):
        rows = [ctypes.string_at(base + s * stride, stride) for s in src]
        for t, row in zip(tgt, rows):
            ctypes.memmove(base + t * stride, row, stride)


def fill_bonus_tokens_cpu(accept_tokens, accept_lens, bonus_tokens, accept_stride) -> None:
    """bonus[i] = the last accepted token of request i (accept_lens includes the bonus token)."""
    flat = accept_tokens.reshape(-1)
    for i, n in enumerate(accept_lens.tolist()):
        bonus_tokens[i] = flat[accept_stride * i + n - 1]


def fill_accept_out_cache_loc_cpu(accept_index, out_cache_loc, accept_out_cache_loc) -> None:
    """Compact the KV slots of accepted draft tokens (accept_index == -1 marks a rejected one)."""
    dst = 0
    for src in accept_index.reshape(-1).tolist():
        if src > -1:
            accept_out_cache_loc[dst] = out_cache_loc[src]
            dst += 1


def assign_draft_cache_locs_contiguous_cpu(req_pool_indices, req_to_token, seq_lens, out_cache_loc, pool_len,
                                           topk, num_cols) -> None:
    """out[i*topk*num_cols : ...] = req_to_token[req_i, seq_len_i : seq_len_i + topk*num_cols]."""
    n = topk * num_cols
    for i, (req, start) in enumerate(zip(req_pool_indices.tolist(), seq_lens.tolist())):
        out_cache_loc[i * n : (i + 1) * n] = req_to_token[req, start : start + n].to(out_cache_loc.dtype)


def assign_extend_cache_locs_cpu(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc,
                                 pool_len) -> None:
    """Concatenate req_to_token[req_i, start_i:end_i] over requests into out_cache_loc."""
    pos = 0
    for req, s, e in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()):
        out_cache_loc[pos : pos + (e - s)] = req_to_token[req, s:e].to(out_cache_loc.dtype)
        pos += e - s


def assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc,
                                 pool_len) -> None:
    """The inverse of assign_extend_cache_locs: req_to_token[req_i, start_i:end_i] = next slots of out_cache_loc."""
    pos = 0
    for req, s, e in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()):
        req_to_token[req, s:e] = out_cache_loc[pos : pos + (e - s)].to(req_to_token.dtype)
        pos += e - s


def build_tree_kernel_efficient_cpu(parent_list, selected_index, verified_seq_len, tree_mask, positions,
                                    retrieve_index, retrieve_next_token, retrieve_next_sibling, topk, depth,
                                    draft_token_num, tree_mask_mode) -> None:
    """EAGLE draft tree -> attention mask, positions and retrieval links (per request)."""
    if int(tree_mask_mode) == 2:
        raise NotImplementedError("QLEN_ONLY_BITPACKING tree masks are not implemented in the CPU stand-in")
    n = draft_token_num
    seq_lens = verified_seq_len.tolist()
    sel = selected_index.reshape(selected_index.shape[0], -1).tolist()
    par = parent_list.reshape(parent_list.shape[0], -1).tolist() if parent_list.numel() else [[]] * len(seq_lens)
    mask = tree_mask.view(-1)
    pos_flat, ridx = positions.view(-1), retrieve_index.view(-1)
    rnext, rsib = retrieve_next_token.view(-1), retrieve_next_sibling.view(-1)
    prefix = 0
    for b, seq_len in enumerate(seq_lens):
        seq_tree_idx = n * n * b + prefix * n
        prefix += seq_len
        pos_flat[b * n] = seq_len

        def parent_position(i: int) -> int | None:
            """Index (0 = the root/verified token) of draft token i's parent, None if not found."""
            parent_tb = sel[b][i - 1] // topk
            if parent_tb == 0:
                return 0
            parent_token = par[b][parent_tb]
            for pp in range(n - 1):
                if sel[b][pp] == parent_token:
                    return pp + 1
            return None

        for i in range(n - 1, 0, -1):
            ridx[b * n + i] = b * n + i
            p = parent_position(i)
            if p is not None:
                nxt = int(rnext[b * n + p])
                rnext[b * n + p] = i
                if nxt != -1:
                    rsib[b * n + i] = nxt
        ridx[b * n] = b * n

        for x in range(n):
            if int(tree_mask_mode) == 0:  # FULL_MASK: rows span the verified prefix + the draft tokens
                row = seq_tree_idx + (seq_len + n) * x + seq_len + 1
            else:  # QLEN_ONLY
                row = n * n * b + n * x + 1
            mask[row - 1] = True
            mask[row : row + n - 1] = False
            if x == 0:
                continue
            cur, position = x - 1, 0
            for _ in range(depth):
                position += 1
                mask[row + cur] = True
                parent_tb = sel[b][cur] // topk
                if parent_tb == 0:
                    break
                parent_token = par[b][parent_tb]
                found = next((cp for cp in range(n - 1) if sel[b][cp] == parent_token), None)
                if found is None:
                    break
                cur = found
            pos_flat[b * n + x] = position + seq_len


def verify_tree_greedy_cpu(predicts, accept_index, accept_token_num, candidates, retrive_index,
                           retrive_next_token, retrive_next_sibling, target_predict) -> None:
    """Greedy verification: walk the draft tree, accepting children that equal the target's argmax."""
    bs, n = candidates.shape[0], candidates.shape[1]
    num_spec = accept_index.shape[1]
    cand, ridx = candidates.reshape(-1).tolist(), retrive_index.reshape(-1).tolist()
    rnext, rsib = retrive_next_token.reshape(-1).tolist(), retrive_next_sibling.reshape(-1).tolist()
    target = target_predict.reshape(-1).tolist()
    pred, acc = predicts.view(-1), accept_index.view(-1)
    for b in range(bs):
        last = ridx[b * n]
        acc[b * num_spec] = last
        accepted, cur = 0, 0
        for _ in range(1, num_spec):
            cur = rnext[b * n + cur]
            want = target[last]
            matched = False
            while cur != -1:
                if cand[b * n + cur] == want:
                    pred[last] = want
                    accepted += 1
                    acc[b * num_spec + accepted] = ridx[b * n + cur]
                    last = ridx[b * n + cur]
                    matched = True
                    break
                cur = rsib[b * n + cur]
            if not matched:
                break
        accept_token_num[b] = accepted
        pred[last] = target[last]


# ----------------------------------------------------------------------------- attention
# SGLang refuses EAGLE with attention_backend=torch_native; its CPU backend for EAGLE is
# `intel_amx`, which calls these two ops through torch.ops.sgl_kernel. Reference versions:
# gather each request's K/V rows through req_to_token, causal softmax attention, GQA.


def _attend(q_tHd, k_SHd, v_SHd, scaling, causal_offset):
    rep = q_tHd.shape[1] // k_SHd.shape[1]
    k = k_SHd.repeat_interleave(rep, dim=1).float()
    v = v_SHd.repeat_interleave(rep, dim=1).float()
    s_HtS = torch.einsum("thd,shd->hts", q_tHd.float(), k) * scaling
    if causal_offset is not None:  # query t sits at absolute position causal_offset + t
        t, S = q_tHd.shape[0], k_SHd.shape[0]
        allowed = torch.arange(S)[None, :] <= (causal_offset + torch.arange(t))[:, None]
        s_HtS = s_HtS.masked_fill(~allowed[None], float("-inf"))
    return torch.einsum("hts,shd->thd", torch.softmax(s_HtS, dim=-1), v)


def extend_attention_cpu(q_extend, k_extend, v_extend, o_extend, k_buffer, v_buffer, k_scale, v_scale, req_to_token,
                         req_pool_indices, seq_lens, extend_seq_lens, extend_start_loc, max_len_extend, scaling,
                         logit_cap, is_cross, sliding_window_plus_one, encoder_lens, sinks, tree_mask, is_causal):
    if tree_mask is not None or (logit_cap or 0) > 0 or sinks is not None or is_cross:
        raise NotImplementedError("extend_attention_cpu stand-in: tree masks, logit caps, sinks, cross-attention")
    for req, S, n, start in zip(req_pool_indices.tolist(), seq_lens.tolist(), extend_seq_lens.tolist(),
                                extend_start_loc.tolist()):
        locs = req_to_token[req, :S].long()  # the extend K/V were written to the pool before this call
        o = _attend(q_extend[start : start + n], k_buffer[locs], v_buffer[locs], scaling,
                    (S - n) if is_causal else None)
        o_extend[start : start + n] = o.to(o_extend.dtype)


def decode_attention_cpu(query, k_buffer, v_buffer, k_scale, v_scale, output, key, value, loc, attn_logits,
                         req_to_token, req_pool_indices, seq_lens, scaling, logit_cap, is_cross,
                         sliding_window_plus_one, encoder_lens, sinks):
    if (logit_cap or 0) > 0 or sinks is not None or is_cross:
        raise NotImplementedError("decode_attention_cpu stand-in: logit caps, sinks, cross-attention")
    if key is not None and value is not None:  # the kernel writes the new token's K/V itself
        k_buffer[loc.long()] = key.view(k_buffer[loc.long()].shape).to(k_buffer.dtype)
        v_buffer[loc.long()] = value.view(v_buffer[loc.long()].shape).to(v_buffer.dtype)
    for b, (req, S) in enumerate(zip(req_pool_indices.tolist(), seq_lens.tolist())):
        locs = req_to_token[req, :S].long()
        output[b] = _attend(query[b : b + 1], k_buffer[locs], v_buffer[locs], scaling, None)[0].to(output.dtype)


def build_draft_decode_metadata_cpu(req_to_token, req_pool_indices, seq_lens, topk, num_steps, pool_len):
    """Per draft candidate, a req->token row: the request's prefix, then its draft-step slots.

    The draft slots of request i are req_to_token[req_i, seq_len_i : seq_len_i + topk*num_steps]
    (assign_draft_cache_locs_contiguous). Only the chain (topk == 1) layout is implemented.
    """
    if topk != 1:
        raise NotImplementedError("build_draft_decode_metadata_cpu stand-in: only --speculative-eagle-topk 1")
    out = torch.zeros((req_pool_indices.numel(), pool_len), dtype=req_to_token.dtype)
    for b, (req, S) in enumerate(zip(req_pool_indices.tolist(), seq_lens.tolist())):
        n = min(S + num_steps, pool_len)
        out[b, :n] = req_to_token[req, :n]
    return out


def _install_torch_ops() -> None:
    """Expose the attention ops as torch.ops.sgl_kernel.* (where SGLang looks them up)."""
    ns = torch.ops.sgl_kernel
    setattr(ns, "extend_attention_cpu", extend_attention_cpu)
    setattr(ns, "decode_attention_cpu", decode_attention_cpu)


_install_torch_ops()


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def missing(*_args, **_kwargs):
        raise NotImplementedError(f"sgl_kernel.{name} is not available in the CPU test lane (stand-in module)")

    missing.__name__ = name
    return missing
