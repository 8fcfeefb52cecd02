"""The gradient of ``prefix_attention``'s ``attn_bias`` (the score gradient dS), for callers whose
bias depends on trainable tensors (DeBERTa's disentangled terms of the hidden states, T5's
relative-position bias while the base model trains).

Backends return (dq, dk, dv, dprefix_k, dprefix_v) only; dS needs the probabilities, which the
kernels never keep. They are rebuilt here once per backward from the saved inputs and the
forward's logsumexp: P = exp(S - lse), dS = P * (dP - delta + dlse) with dP = dO V^T (times the
backend's own dropout keep-mask / (1 - p)) and delta = rowsum(dO * O). This materializes
(B, Hq, Nq, P + Nk) once in float32, the size of the bias itself.
"""
from __future__ import annotations

import torch

from ptkernels import backends
from ptkernels.backends.eager import visible_sequence_keys


def keep_mask(backend: str, seed, shape, p: float, device, prefix_len: int):
    """The dropout keep-mask the backend ``backend`` applied (bool ``shape`` = (B, Hq, Nq, P + Nk),
    ``prefix_len`` = P: the Triton draws are per segment, the eager ones per row)."""
    if backend == "cuda":   # the CUDA backend runs dropout through triton (else eager)
        ok, _ = backends.availability("triton", "prefix_attention", device)
        backend = "triton" if ok else "eager"
    if backend == "triton":
        from ptkernels.backends.triton.dropout import dropout_keep_mask
        return dropout_keep_mask(seed, shape, p, device, prefix_len=prefix_len)
    return backends.get(backend).dropout_keep_mask(seed, shape, p, device)


def bias_grad(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask,
              attn_bias, dropout_seed, out, lse, causal, window, softcap, scale, dropout_p,
              backend):
    """dS (B, Hq, Nq, P + Nk) in ``attn_bias``'s dtype; arguments as the op's normalized ones."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, hq, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv

    def per_query_head(x):          # (B, Hkv, N, D) -> (B, Hq, N, D)
        return x.to(acc).repeat_interleave(group, dim=1)

    keys, vals = per_query_head(k), per_query_head(v)
    p_len = 0
    if prefix_k is not None:
        p_len = prefix_k.shape[2]
        if prefix_index is not None:
            pk, pv = prefix_k[prefix_index], prefix_v[prefix_index]
        else:
            pk, pv = prefix_k.expand(b, -1, -1, -1), prefix_v.expand(b, -1, -1, -1)
        keys = torch.cat([per_query_head(pk), keys], 2)
        vals = torch.cat([per_query_head(pv), vals], 2)
    s = torch.matmul(q.to(acc), keys.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    s = s + attn_bias.to(acc)
    vis = visible_sequence_keys(b, nq, nk, causal, window, key_padding_mask, q.device)
    if vis is not None:
        vis = torch.cat([torch.ones(vis.shape[:-1] + (p_len,), dtype=torch.bool,
                                    device=q.device), vis], -1)
        s = s.masked_fill(~vis, float("-inf"))
    lse_acc = lse.to(acc).unsqueeze(-1)
    probs = torch.exp(s - torch.where(torch.isfinite(lse_acc), lse_acc, torch.zeros_like(lse_acc)))
    d_out = grad_out.to(acc)
    dp = torch.matmul(d_out, vals.transpose(-1, -2))
    if dropout_p > 0:
        keep = keep_mask(backend, dropout_seed, probs.shape, dropout_p, q.device, p_len)
        dp = dp * keep.to(acc) / (1.0 - dropout_p)
    delta = (d_out * out.to(acc)).sum(-1, keepdim=True)
    ds = probs * (dp - delta)
    if grad_lse is not None:
        ds = ds + probs * grad_lse.to(acc).unsqueeze(-1)
    return ds.to(attn_bias.dtype)
