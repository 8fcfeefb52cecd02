"""Eager PyTorch backend of ``prefix_attention``: the exact reference and the fast CPU path.

``reference_prefix_attention`` is plain math (concatenate the prefix, materialize the scores and
the mask, softmax); the tests run it in float64 as the ground truth and in the kernels' dtype to
size their error budget.

The fast path (``prefix_attention_fwd`` / ``prefix_attention_bwd``, what the custom op calls) never
concatenates the prefix, never copies it per batch row and never builds a (Nq, P + Nk) mask:

* prefix segment: one batched matrix product per KV head in which the whole batch (and the GQA
  group) is folded into the rows, ``(B*G*Nq, D) @ (D, P)``, for a prefix shared by the batch; a
  batched product per row for per-row and bank prefixes;
* sequence segment: ``scaled_dot_product_attention``'s CPU flash kernel (which also returns the
  logsumexp), or a plain math segment when soft-capping or dropout is on;
* the two merged by their logsumexp.

The backward keeps only the logsumexp (no probabilities are stored), recomputes each segment's
probabilities with the final logsumexp and ``delta = rowsum(dO * O)`` (so the segments need no
"merge backward"), and skips every gradient nobody asked for: with q, k and v frozen only the
prefix gradients are computed (prompt-only backward).

Conventions shared with the other backends (see ``ptkernels/ops/prefix_attention.py``):
``window`` -1 = none, ``softcap`` 0.0 = none, ``key_padding_mask`` bool (B, Nk) True = keep,
``prefix_k`` (T, Hkv, P, D) with ``prefix_index`` (B,) or None (T == 1: shared; T == B: per row),
``attn_bias`` a (possibly expanded) (B, Hq, Nq, P + Nk) tensor, ``lse`` float32 (float64 for
float64 inputs) with -inf on rows that see no key, whose output is zero.
"""
from __future__ import annotations

import math

import torch

from ptkernels.backends.eager_gpc import gpc_cell_bwd, gpc_cell_fwd  # noqa: F401  (re-export)

NAME = "eager"

# Off: every segment takes the plain-math path (what non-CPU devices always do); tests flip it.
USE_CPU_FLASH = True
_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_CPU_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def is_available(op: str, device: torch.device) -> tuple[bool, str]:
    return True, "plain PyTorch; runs on any device"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------

def dropout_keep_mask(seed: torch.Tensor, shape, p: float, device) -> torch.Tensor:
    """The eager backend's dropout keep-mask (bool, ``shape`` = (B, Hq, Nq, P + Nk)).

    Drawn from a CPU generator seeded with ``seed[0]``, so forward and backward (and a test)
    regenerate exactly the same mask.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed.reshape(-1)[0].item()))
    return (torch.rand(tuple(shape), generator=gen) >= p).to(device)


def visible_sequence_keys(batch, nq, nk, causal, window, key_padding_mask, device):
    """Bool mask of the sequence keys each query sees, broadcastable to (B, 1, Nq, Nk), or None.

    Bottom-right causal: query i sees key j iff j <= i + (Nk - Nq); window: (i + Nk - Nq) - j <
    window. Prefix keys are not part of this mask: they are always visible.
    """
    vis = None
    if causal or window > 0:
        i = torch.arange(nq, device=device).unsqueeze(1) + (nk - nq)
        j = torch.arange(nk, device=device).unsqueeze(0)
        vis = torch.ones(nq, nk, dtype=torch.bool, device=device)
        if causal:
            vis = vis & (j <= i)
        if window > 0:
            vis = vis & (i - j < window)
        vis = vis.view(1, 1, nq, nk)
    if key_padding_mask is not None:
        pad = key_padding_mask.view(batch, 1, 1, nk)
        vis = pad if vis is None else vis & pad
    return vis


def _empty_sequence_rows(batch, nq, nk, causal, window, key_padding_mask, device):
    """(B, 1, Nq) bool: rows that see no sequence key, computed without an (Nq, Nk) mask."""
    i = torch.arange(nq, device=device) + (nk - nq)
    hi = torch.clamp(i if causal else torch.full_like(i, nk - 1), max=nk - 1)
    lo = torch.clamp(i - window + 1, min=0) if window > 0 else torch.zeros_like(i)
    if key_padding_mask is None:
        count = (hi - lo + 1).clamp(min=0).view(1, 1, nq).expand(batch, 1, nq)
    else:
        csum = torch.nn.functional.pad(key_padding_mask.to(torch.int64).cumsum(1), (1, 0))
        hi_c = csum[:, (hi + 1).clamp(min=0, max=nk)]
        lo_c = csum[:, lo.clamp(max=nk)]
        count = torch.where(hi >= lo, hi_c - lo_c, torch.zeros_like(hi_c)).view(batch, 1, nq)
    return count <= 0


def _safe_lse(lse: torch.Tensor) -> torch.Tensor:
    """Replace -inf (rows that see no key) by +inf so that exp(s - lse) is 0, not NaN."""
    return torch.where(torch.isneginf(lse), torch.full_like(lse, math.inf), lse)


# Folding: (B, Hq, Nq, X) <-> (Nb, Hkv, R, X). Row r of KV head h holds query (g, i) of the GQA
# group as r = g * Nq + i; a shared prefix also folds the batch into the rows (Nb = 1), so the
# prefix product and its gradient are single GEMMs whose contraction runs over B * G * Nq rows.

def fold(x: torch.Tensor, hkv: int, shared: bool) -> torch.Tensor:
    b, hq, nq, xd = x.shape
    x = x.reshape(b, hkv, (hq // hkv) * nq, xd)
    if shared:
        x = x.transpose(0, 1).reshape(1, hkv, b * (hq // hkv) * nq, xd)
    return x


def unfold(x: torch.Tensor, batch: int, hq: int, nq: int, shared: bool) -> torch.Tensor:
    hkv, xd = x.shape[1], x.shape[-1]
    if shared:
        x = x.reshape(hkv, batch, -1, xd).transpose(0, 1)
    return x.reshape(batch, hq, nq, xd)


def _fold_lse(lse, hkv, shared):
    return fold(lse.unsqueeze(-1), hkv, shared).squeeze(-1)


def _unfold_lse(lse, batch, hq, nq, shared):
    return unfold(lse.unsqueeze(-1), batch, hq, nq, shared).squeeze(-1)


def merge_segments_(o1, l1, o2, l2):
    """Merge two attention partials over disjoint key sets by their logsumexp, in place in o1
    (and o2): on a CPU a fresh (B, H, N, D) output costs more in page faults than the math."""
    lse = torch.logaddexp(l1, l2)
    base = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    w1 = torch.exp(l1 - base).unsqueeze(-1)
    w2 = torch.exp(l2 - base).unsqueeze(-1)
    return o1.mul_(w1).add_(o2.mul_(w2)), lse


def merge_prefix_into(out, o_prefix, l_prefix, o_seq, l_seq):
    """``merge_segments_`` for a prefix partial, whose lse is finite on every row (prefix keys
    are always visible): one interpolation pass ``o_seq + w (o_prefix - o_seq)`` with the prefix
    weight ``w = exp(l_p - lse) = sigmoid(l_p - l_s)`` (1 on rows that see no sequence key),
    written into ``out`` (contiguous), so that merging also does the layout copy the CPU flash
    kernel's (B, N, H, D)-strided outputs would need anyway. Returns (out, lse)."""
    lse = torch.logaddexp(l_prefix, l_seq)
    w = torch.sigmoid(l_prefix - l_seq).nan_to_num_(0.0).unsqueeze(-1)  # NaN: both -inf
    return torch.lerp(o_seq, o_prefix, w.to(o_seq.dtype), out=out), lse


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------

def reference_prefix_attention(q, k, v, prefix_k=None, prefix_v=None, *, prefix_index=None,
                               causal=False, attention_mask=None, window=None, softcap=None,
                               attn_bias=None, scale=None, dropout_mask=None, dropout_p=0.0):
    """Plain-math prefix attention; returns ``(out, lse)`` computed in q's dtype.

    Shapes as ``ptkernels.prefix_attention``; ``prefix_k`` may be (Hkv, P, D), (B, Hkv, P, D) or
    a bank (T, Hkv, P, D) with ``prefix_index``. ``dropout_mask`` (B, Hq, Nq, P + Nk) bool keeps
    the probabilities where True (scaled by 1 / (1 - dropout_p)). Order of operations: scores *
    scale, soft-capping, + attn_bias, masking, softmax, dropout, @ V. Rows that see no key give
    output 0 and lse -inf. Cast the inputs to float64 for the exact reference.
    """
    # Deliberately independent of the fast path's helpers (no shared masking code), so that a
    # bug there cannot hide by appearing on both sides of a comparison.
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    keys, values = k, v
    p_len = 0
    if prefix_k is not None and prefix_k.shape[-2] > 0:
        pk, pv = prefix_k, prefix_v
        if pk.dim() == 3:                      # shared: one copy per row
            pk, pv = pk.expand(b, *pk.shape), pv.expand(b, *pv.shape)
        elif prefix_index is not None:         # bank: row b takes prefix_index[b]
            pk, pv = pk[prefix_index], pv[prefix_index]
        p_len = pk.shape[2]
        keys, values = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    keys = keys.repeat_interleave(g, 1)
    values = values.repeat_interleave(g, 1)
    s = torch.matmul(q, keys.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if attn_bias is not None:
        s = s + attn_bias.to(s.dtype)
    rows = torch.arange(nq, device=q.device).view(nq, 1) + (nk - nq)   # bottom-right alignment
    cols = torch.arange(nk, device=q.device).view(1, nk)
    seq_visible = torch.ones(nq, nk, dtype=torch.bool, device=q.device)
    if causal:
        seq_visible &= cols <= rows
    if window:
        seq_visible &= rows - cols < window
    visible = torch.ones(b, 1, nq, p_len + nk, dtype=torch.bool, device=q.device)
    visible[..., p_len:] &= seq_visible
    if attention_mask is not None:
        pad = (attention_mask.to(device=q.device) != 0).view(b, 1, 1, nk)
        visible[..., p_len:] &= pad
    s = s.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(s, -1)
    lse_for_p = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    p = torch.exp(s - lse_for_p.unsqueeze(-1))
    if dropout_mask is not None:
        p = p * dropout_mask.to(p.dtype) / (1.0 - dropout_p)
    return torch.matmul(p, values), lse


# ----------------------------------------------------------------------------------------------
# Fast path: segments
# ----------------------------------------------------------------------------------------------

class _Geometry:
    """Sizes and normalized options of one call (so forward and backward agree)."""

    def __init__(self, q, k, prefix_k, prefix_index, key_padding_mask, attn_bias, dropout_seed,
                 causal, window, softcap, dropout_p):
        self.b, self.hq, self.nq, self.d = q.shape
        self.hkv, self.nk = k.shape[1], k.shape[2]
        self.p = 0 if prefix_k is None else prefix_k.shape[2]
        self.shared = self.p > 0 and prefix_k.shape[0] == 1
        self.acc = acc_dtype(q.dtype)
        self.causal, self.window, self.softcap = causal, window, softcap
        self.keep = None
        if dropout_p > 0:
            self.keep = dropout_keep_mask(dropout_seed, (self.b, self.hq, self.nq, self.p + self.nk),
                                          dropout_p, q.device)
        # The CPU flash kernel covers both segments unless the scores need soft-capping or
        # dropout (it cannot return the mask it drew); other devices take the math segments.
        self.flash = (USE_CPU_FLASH and q.device.type == "cpu" and softcap <= 0
                      and dropout_p <= 0)
        if key_padding_mask is not None and key_padding_mask.device.type == "cpu" \
                and bool(key_padding_mask.all()):
            # Nothing padded (fixed-length training batches): no mask lets the CPU flash kernel
            # take its unmasked (and, square, is_causal) path instead of reading a mask.
            key_padding_mask = None
        self.key_padding_mask = key_padding_mask
        self.bias_p = self.bias_s = None
        if attn_bias is not None:
            self.bias_p, self.bias_s = attn_bias[..., :self.p], attn_bias[..., self.p:]

    def prefix_rows(self, prefix_k, prefix_v, prefix_index):
        """Each row's prefix as (B, Hkv, P, D) in the input dtype: a stride-0 view of a shared
        prefix (no copy), the tensor itself per row, a gather for a bank."""
        if prefix_index is not None:
            return prefix_k.index_select(0, prefix_index), prefix_v.index_select(0, prefix_index)
        shape = (self.b, *prefix_k.shape[1:])
        return prefix_k.expand(shape), prefix_v.expand(shape)

    def reduce_rows(self, grad_rows, prefix, prefix_index):
        """Per-row prefix gradients (B, Hkv, P, D) -> the prefix's own shape (T, Hkv, P, D)."""
        if prefix_index is not None:
            return torch.zeros(prefix.shape, dtype=grad_rows.dtype,
                               device=grad_rows.device).index_add_(0, prefix_index, grad_rows)
        if prefix.shape[0] == 1:
            return grad_rows.sum(0, keepdim=True)
        return grad_rows

    def prefix_parts(self, prefix_k, prefix_v, prefix_index):
        """Prefix K/V rows as (Nb, Hkv, P, D) in the accumulation dtype."""
        if self.shared:
            return prefix_k.to(self.acc), prefix_v.to(self.acc)
        if prefix_index is not None:
            prefix_k, prefix_v = prefix_k.index_select(0, prefix_index), prefix_v.index_select(0, prefix_index)
        return prefix_k.to(self.acc), prefix_v.to(self.acc)

    def folded(self, x, shared):
        return None if x is None else fold(x.to(self.acc), self.hkv, shared)


def _scores(qg, kg, scale, softcap, bias_g, vis_g):
    """Scores of one segment in folded shapes (Nb, Hkv, R, Nkeys): scale, soft-cap, bias, mask.

    Returns (s, t) where t = tanh(raw / softcap) (for the backward's chain rule) or None.
    """
    nb, h, r, d = qg.shape
    s = torch.bmm(qg.reshape(nb * h, r, d), kg.reshape(nb * h, -1, d).transpose(1, 2))
    s = s.view(nb, h, r, -1).mul_(scale)
    t = None
    if softcap > 0:
        t = s.div_(softcap).tanh_()
        s = t * softcap
    if bias_g is not None:
        s.add_(bias_g)
    if vis_g is not None:
        s.masked_fill_(~vis_g, -math.inf)
    return s, t


def _segment_forward(qg, kg, vg, scale, softcap, bias_g, vis_g, keep_g, dropout_p):
    """(out, lse) of one segment; rows that see no key give out 0 and lse -inf."""
    s, _ = _scores(qg, kg, scale, softcap, bias_g, vis_g)
    m = s.amax(-1, keepdim=True)
    m = m.masked_fill_(torch.isneginf(m), 0.0)
    e = s.sub_(m).exp_()                       # in place: the scores are not needed again
    denom = e.sum(-1, keepdim=True)
    lse = (m + denom.log()).squeeze(-1)        # log(0) = -inf for rows without keys
    if keep_g is not None:
        e.mul_(keep_g).div_(1.0 - dropout_p)
    out = torch.matmul(e, vg).div_(denom.masked_fill_(denom == 0, 1.0))
    return out, lse


def _segment_backward(qg, kg, vg, dog, lse_g, delta_g, scale, softcap, bias_g, vis_g, keep_g,
                      dropout_p, need_dq, need_dk, need_dv):
    """Gradients of one segment given the FINAL lse (+inf on empty rows) and delta."""
    s, t = _scores(qg, kg, scale, softcap, bias_g, vis_g)
    p = s.sub_(lse_g.unsqueeze(-1)).exp_()
    pd = p if keep_g is None else p * keep_g / (1.0 - dropout_p)
    dq = dk = dv = None
    if need_dv:
        dv = torch.matmul(pd.transpose(-1, -2), dog)
    if need_dq or need_dk:
        dp = torch.matmul(dog, vg.transpose(-1, -2))
        if keep_g is not None:
            dp.mul_(keep_g).div_(1.0 - dropout_p)
        ds = dp.sub_(delta_g.unsqueeze(-1)).mul_(p)
        if t is not None:
            ds.mul_(1.0 - t * t)
        ds.mul_(scale)
        if need_dq:
            dq = torch.matmul(ds, kg)
        if need_dk:
            dk = torch.matmul(ds.transpose(-1, -2), qg)
    return dq, dk, dv


def _flash_lse(lse, q):
    """The logsumexp in the dtype the CPU flash backward expects."""
    return lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)


def _keep_parts(geo):
    if geo.keep is None:
        return None, None
    return geo.keep[..., :geo.p], geo.keep[..., geo.p:]


def _flash_mask(geo, dtype, device):
    """Additive float mask (broadcastable) and is_causal flag for the CPU flash kernel."""
    square_causal = geo.causal and geo.nq == geo.nk and geo.window <= 0
    vis = visible_sequence_keys(geo.b, geo.nq, geo.nk, geo.causal and not square_causal,
                                geo.window, geo.key_padding_mask, device)
    mask = None
    if geo.bias_s is not None:
        mask = geo.bias_s.to(dtype)
    if vis is not None:
        base = mask if mask is not None else torch.zeros((), dtype=dtype, device=device)
        mask = torch.where(vis, base, torch.full((), -math.inf, dtype=dtype, device=device))
    return mask, square_causal


def _sequence_forward(q, k, v, geo, scale, keep_s, dropout_p):
    """Sequence segment: (out (B,Hq,Nq,D), lse (B,Hq,Nq)) in the accumulation dtype."""
    if geo.flash:
        mask, is_causal = _flash_mask(geo, q.dtype, q.device)
        out, lse = _FLASH_CPU(q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale)
        lse = lse.to(geo.acc)
        if geo.causal or geo.window > 0 or geo.key_padding_mask is not None:
            empty = _empty_sequence_rows(geo.b, geo.nq, geo.nk, geo.causal, geo.window,
                                         geo.key_padding_mask, q.device)
            lse = lse.masked_fill(empty, -math.inf)
        return out.to(geo.acc), lse
    qg, kg, vg = geo.folded(q, False), k.to(geo.acc), v.to(geo.acc)
    vis = visible_sequence_keys(geo.b, geo.nq, geo.nk, geo.causal, geo.window,
                                geo.key_padding_mask, q.device)
    vis_g = None if vis is None else fold(vis.expand(geo.b, geo.hq, geo.nq, geo.nk), geo.hkv, False)
    og, lse_g = _segment_forward(qg, kg, vg, scale, geo.softcap, geo.folded(geo.bias_s, False),
                                 vis_g, geo.folded(keep_s, False), dropout_p)
    return unfold(og, geo.b, geo.hq, geo.nq, False), _unfold_lse(lse_g, geo.b, geo.hq, geo.nq, False)


def prefix_attention_fwd(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_bias,
                         dropout_seed, causal, window, softcap, scale, dropout_p):
    geo = _Geometry(q, k, prefix_k, prefix_index, key_padding_mask, attn_bias, dropout_seed,
                    causal, window, softcap, dropout_p)
    keep_p, keep_s = _keep_parts(geo)
    out = lse = None
    if geo.p > 0 and geo.flash:
        pk, pv = geo.prefix_rows(prefix_k, prefix_v, prefix_index)
        bias = None if geo.bias_p is None else geo.bias_p.to(q.dtype)
        out, lse = _FLASH_CPU(q, pk, pv, 0.0, False, attn_mask=bias, scale=scale)
        out, lse = out.to(geo.acc), lse.to(geo.acc)
    elif geo.p > 0:
        pk, pv = geo.prefix_parts(prefix_k, prefix_v, prefix_index)
        og, lse_g = _segment_forward(geo.folded(q, geo.shared), pk, pv, scale, softcap,
                                     geo.folded(geo.bias_p, geo.shared), None,
                                     geo.folded(keep_p, geo.shared), dropout_p)
        out = unfold(og, geo.b, geo.hq, geo.nq, geo.shared)
        lse = _unfold_lse(lse_g, geo.b, geo.hq, geo.nq, geo.shared)
    if geo.nk > 0:
        out_s, lse_s = _sequence_forward(q, k, v, geo, scale, keep_s, dropout_p)
        if out is None:
            out, lse = out_s, lse_s
        elif out.dtype == q.dtype:  # float32 / float64: merge straight into the contiguous output
            out, lse = merge_prefix_into(torch.empty(q.shape, dtype=q.dtype, device=q.device),
                                         out, lse, out_s, lse_s)
        else:
            out, lse = merge_segments_(out, lse, out_s, lse_s)
    if out is None:  # no prefix and no keys at all
        out = torch.zeros(q.shape, dtype=geo.acc, device=q.device)
        lse = torch.full(q.shape[:-1], -math.inf, dtype=geo.acc, device=q.device)
    if geo.p == 0:  # only then can a row see no key at all; its output must be 0, never NaN
        out = out.masked_fill(torch.isneginf(lse).unsqueeze(-1), 0.0)
    out, lse = out.to(q.dtype).contiguous(), lse.contiguous()
    if geo.flash:
        _keep_nonfinite_query_rows_(q, out, lse)
    return out, lse


def _keep_nonfinite_query_rows_(q, out, lse):
    """torch's CPU flash kernel returns 0 (lse 0) for a query row holding a NaN or inf, where the
    math (and the reference, and the GPU kernels) give NaN. Put the NaN back in that row only,
    so a corrupted activation is seen instead of silently read as "attends to nothing".
    One float32 row sum over q (a sum is non-finite iff an element is; float32 so that large
    finite fp16/bf16 values do not overflow into a false alarm)."""
    bad = ~torch.isfinite(q.sum(-1, dtype=torch.float64 if q.dtype == torch.float64
                                else torch.float32))
    if bool(bad.any()):
        out.masked_fill_(bad.unsqueeze(-1), math.nan)
        lse.masked_fill_(bad, math.nan)


def prefix_attention_bwd(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, prefix_index,
                         key_padding_mask, attn_bias, dropout_seed, out, lse, causal, window,
                         softcap, scale, dropout_p, output_mask):
    need_dq, need_dk, need_dv, need_dpk, need_dpv = (bool(x) for x in output_mask)
    geo = _Geometry(q, k, prefix_k, prefix_index, key_padding_mask, attn_bias, dropout_seed,
                    causal, window, softcap, dropout_p)
    keep_p, keep_s = _keep_parts(geo)
    do = grad_out.to(geo.acc)
    delta = None

    def get_delta():  # rowsum(dO * O): only the plain-math segments need it
        nonlocal delta
        if delta is None:
            delta = (do * out.to(geo.acc)).sum(-1)
            if grad_lse is not None:
                delta = delta - grad_lse.to(geo.acc)
        return delta
    lse_safe = _safe_lse(lse.to(geo.acc))
    dq = dk = dv = dpk = dpv = None

    if geo.p > 0 and geo.flash and grad_lse is None and need_dq:
        pk, pv = geo.prefix_rows(prefix_k, prefix_v, prefix_index)
        bias = None if geo.bias_p is None else geo.bias_p.to(q.dtype)
        dq, dpk_rows, dpv_rows = _FLASH_CPU_BWD(grad_out, q, pk, pv, out, _flash_lse(lse_safe, q),
                                                0.0, False, attn_mask=bias, scale=scale)
        dq = dq.to(geo.acc)
        dpk = geo.reduce_rows(dpk_rows, prefix_k, prefix_index) if need_dpk else None
        dpv = geo.reduce_rows(dpv_rows, prefix_v, prefix_index) if need_dpv else None
    elif geo.p > 0 and (need_dq or need_dpk or need_dpv):
        # Prompt-only backward (and soft-capping / dropout / a logsumexp gradient): only the
        # products the requested gradients need, with the batch folded into the rows so that
        # the shared prefix's gradient is one GEMM contracting over all B * G * Nq rows.
        pk, pv = geo.prefix_parts(prefix_k, prefix_v, prefix_index)
        dq_g, dpk, dpv = _segment_backward(
            geo.folded(q, geo.shared), pk, pv, geo.folded(do, geo.shared),
            _fold_lse(lse_safe, geo.hkv, geo.shared), _fold_lse(get_delta(), geo.hkv, geo.shared),
            scale, softcap, geo.folded(geo.bias_p, geo.shared), None,
            geo.folded(keep_p, geo.shared), dropout_p, need_dq, need_dpk, need_dpv)
        if dq_g is not None:
            dq = unfold(dq_g, geo.b, geo.hq, geo.nq, geo.shared)
        if prefix_index is not None and not geo.shared:  # bank: grads land on the chosen rows only
            dpk = None if dpk is None else torch.zeros(prefix_k.shape, dtype=geo.acc, device=q.device).index_add_(0, prefix_index, dpk)
            dpv = None if dpv is None else torch.zeros(prefix_v.shape, dtype=geo.acc, device=q.device).index_add_(0, prefix_index, dpv)

    if geo.nk > 0 and (need_dq or need_dk or need_dv):
        if geo.flash and grad_lse is None:
            mask, is_causal = _flash_mask(geo, q.dtype, q.device)
            dq_s, dk, dv = _FLASH_CPU_BWD(grad_out, q, k, v, out, _flash_lse(lse_safe, q), 0.0, is_causal,
                                          attn_mask=mask, scale=scale)
            dq_s = dq_s.to(geo.acc)
        else:
            vis = visible_sequence_keys(geo.b, geo.nq, geo.nk, causal, window, key_padding_mask, q.device)
            vis_g = None if vis is None else fold(vis.expand(geo.b, geo.hq, geo.nq, geo.nk), geo.hkv, False)
            dq_g, dk, dv = _segment_backward(
                geo.folded(q, False), k.to(geo.acc), v.to(geo.acc), geo.folded(do, False),
                _fold_lse(lse_safe, geo.hkv, False), _fold_lse(get_delta(), geo.hkv, False), scale,
                softcap, geo.folded(geo.bias_s, False), vis_g, geo.folded(keep_s, False),
                dropout_p, need_dq, need_dk, need_dv)
            dq_s = None if dq_g is None else unfold(dq_g, geo.b, geo.hq, geo.nq, False)
        if need_dq and dq is None:
            dq = dq_s
        elif need_dq and dq.dtype == q.dtype:  # sum straight into the contiguous gradient
            dq = torch.add(dq, dq_s, out=torch.empty(q.shape, dtype=q.dtype, device=q.device))
        elif need_dq:
            dq = dq.add_(dq_s)

    def finish(grad, like, need):
        if not need:
            return like.new_empty(0)
        if grad is None:  # needed but no segment contributes (e.g. Nk == 0)
            return torch.zeros_like(like, memory_format=torch.contiguous_format)
        return grad.to(like.dtype).contiguous()

    return (finish(dq, q, need_dq), finish(dk, k, need_dk), finish(dv, v, need_dv),
            finish(dpk, prefix_k, need_dpk) if prefix_k is not None else q.new_empty(0),
            finish(dpv, prefix_v, need_dpv) if prefix_v is not None else q.new_empty(0))
