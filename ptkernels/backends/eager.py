"""Eager PyTorch backend of ``prefix_attention``: the exact reference and the fast CPU path.

``reference_prefix_attention`` is plain math (concatenate the prefix, materialize the scores and
the mask, softmax); the tests run it in float64 as the ground truth and in the kernels' dtype to
size their error budget.

The fast path (``prefix_attention_fwd`` / ``prefix_attention_bwd``, what the custom op calls) never
concatenates the prefix, never copies it per batch row and never builds a (Nq, P + Nk) mask:

* prefix segment: on a CPU without soft-capping or dropout, the CPU flash kernel of
  ``scaled_dot_product_attention`` (a stride-0 view of a shared prefix); otherwise plain math
  whose products, for a shared prefix and token-major q, run per head over all B * Nq rows at
  once, ``(B*Nq, D) @ (D, P)``, so the prefix gradient is one GEMM with no batch reduction;
* sequence segment: the CPU flash kernel (which also returns the logsumexp), or plain math
  (soft-capping, dropout, other devices) over causal query chunks, each against only the keys
  it can see;
* the two merged by their logsumexp, straight into the output.

Dropout drops with one ``masked_fill`` of the probabilities and applies 1 / (1 - p) to the small
(.., D) results; the forward's drop mask is kept for its backward (bounded cache, a miss redraws
the same mask). ``out``, ``dq``, ``dk`` and ``dv`` come back token-major (``token_major_empty``).

The backward keeps only the logsumexp (no probabilities are stored), recomputes each segment's
probabilities with the final logsumexp and ``delta = rowsum(dO * O)`` (so the segments need no
"merge backward"; the flash backward takes the merged out and lse), and skips every gradient
nobody asked for: with q, k and v frozen only the prefix gradients are computed (prompt-only
backward).

Conventions shared with the other backends (see ``ptkernels/ops/prefix_attention.py``):
``window`` -1 = none, ``softcap`` 0.0 = none, ``key_padding_mask`` bool (B, Nk) True = keep,
``prefix_k`` (T, Hkv, P, D) with ``prefix_index`` (B,) or None (T == 1: shared; T == B: per row),
``attn_bias`` a (possibly expanded) (B, Hq, Nq, P + Nk) tensor, ``lse`` float32 (float64 for
float64 inputs) with -inf on rows that see no key, whose output is zero.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict

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

def _dropout_uniforms(seed: torch.Tensor, shape) -> torch.Tensor:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed.reshape(-1)[0].item()))
    return torch.rand(tuple(shape), generator=gen)


def dropout_keep_mask(seed: torch.Tensor, shape, p: float, device) -> torch.Tensor:
    """The eager backend's dropout keep-mask (bool, ``shape`` = (B, Hq, Nq, P + Nk)).

    Drawn from a CPU generator seeded with ``seed[0]``, so forward and backward (and a test)
    regenerate exactly the same mask.
    """
    return (_dropout_uniforms(seed, shape) >= p).to(device)


def dropout_drop_mask(seed: torch.Tensor, shape, p: float, device) -> torch.Tensor:
    """The complement of ``dropout_keep_mask`` from the same draws: True = dropped."""
    return (_dropout_uniforms(seed, shape) < p).to(device)


# Drop masks a forward drew, kept for its backward: drawing 10^7 uniforms from the (serial) CPU
# generator costs as much as the attention math at training shapes. Only a speed-up: the mask is
# a function of (seed, shape, p, device), so a miss (evicted, or a recomputing forward) redraws
# the very same mask. Bounded in bytes, oldest evicted first; the backward removes its entry.
# Process-wide and shared by threads (a serving process, DataParallel workers): every access
# holds the lock, since an OrderedDict mutated by one thread while another iterates raises.
_DROP_CACHE: OrderedDict = OrderedDict()
_DROP_CACHE_LOCK = threading.Lock()
DROP_CACHE_BYTES = 256 * 2 ** 20


def _drop_mask(seed: torch.Tensor, shape, p: float, device, *, forward: bool) -> torch.Tensor:
    key = (int(seed.reshape(-1)[0].item()), tuple(shape), float(p), str(device))
    if not forward:
        with _DROP_CACHE_LOCK:
            cached = _DROP_CACHE.pop(key, None)
        if cached is not None:
            return cached
    drop = dropout_drop_mask(seed, shape, p, device)
    if forward and drop.numel() <= DROP_CACHE_BYTES:
        with _DROP_CACHE_LOCK:
            _DROP_CACHE.pop(key, None)
            _DROP_CACHE[key] = drop
            total = sum(m.numel() for m in _DROP_CACHE.values())
            while total > DROP_CACHE_BYTES:
                total -= _DROP_CACHE.popitem(last=False)[1].numel()
    return drop


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


def token_major_empty(shape, dtype, device) -> torch.Tensor:
    """An uninitialized (B, H, N, D) tensor stored token-major, as (B, N, H, D) in memory.

    The eager backend returns ``out``, ``dq``, ``dk`` and ``dv`` in this layout (and the op's fake
    implementation declares it): it is what the CPU flash kernel produces and what a transformers
    attention layer needs (``out.transpose(1, 2).reshape(B, N, H * D)`` is then a view, as the
    projections' gradients are), so neither side pays a layout copy. A batch of one stays
    contiguous: Inductor (torch 2.14) expects a contiguous output of the op there, whatever the
    fake implementation says.
    """
    b, h, n, d = shape
    if b == 1:
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    return torch.empty((b, n, h, d), dtype=dtype, device=device).transpose(1, 2)


def as_token_major(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype`` and the layout of ``token_major_empty`` (no copy when it already is)."""
    b, h, n, d = x.shape
    want = (h * n * d, n * d, d, 1) if b == 1 else (n * h * d, d, h * d, 1)
    if x.dtype == dtype and x.stride() == want:
        return x
    return token_major_empty(x.shape, dtype, x.device).copy_(x)


def _safe_lse(lse: torch.Tensor) -> torch.Tensor:
    """Replace -inf (rows that see no key) by +inf so that exp(s - lse) is 0, not NaN."""
    return torch.where(torch.isneginf(lse), torch.full_like(lse, math.inf), lse)


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
                 causal, window, softcap, dropout_p, forward):
        self.b, self.hq, self.nq, self.d = q.shape
        self.hkv, self.nk = k.shape[1], k.shape[2]
        self.p = 0 if prefix_k is None else prefix_k.shape[2]
        self.acc = acc_dtype(q.dtype)
        self.causal, self.window, self.softcap = causal, window, softcap
        self.dropout_p = dropout_p
        self.drop_p = self.drop_s = None
        if dropout_p > 0:
            # The complement of ``dropout_keep_mask`` (same draws): True = dropped, so that
            # dropping is one masked_fill on the probabilities and 1 / (1 - p) is applied to the
            # small (.., D) results instead of the (.., keys) probabilities.
            drop = _drop_mask(dropout_seed, (self.b, self.hq, self.nq, self.p + self.nk),
                              dropout_p, q.device, forward=forward)
            self.drop_p, self.drop_s = drop[..., :self.p], drop[..., self.p:]
        # The CPU flash kernel covers the sequence segment unless the scores need soft-capping
        # or dropout (it cannot take an external dropout mask); other devices take the math.
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

    def prefix_sel(self, prefix_k, prefix_v, prefix_index):
        """The prefix rows the batch uses: (1, Hkv, P, D) shared, (B, Hkv, P, D) per row or
        gathered from a bank (no per-row copy of a shared prefix)."""
        if prefix_index is not None:
            return prefix_k.index_select(0, prefix_index), prefix_v.index_select(0, prefix_index)
        return prefix_k, prefix_v

    def reduce_rows(self, grad_rows, prefix, prefix_index):
        """Prefix gradients of the rows used, (Bp, Hkv, P, D) -> the prefix's own shape."""
        if prefix_index is not None:
            return torch.zeros(prefix.shape, dtype=grad_rows.dtype,
                               device=grad_rows.device).index_add_(0, prefix_index, grad_rows)
        if prefix.shape[0] == 1:
            return grad_rows.sum(0, keepdim=True)
        return grad_rows


# ----------------------------------------------------------------------------------------------
# Fast path: one segment in plain math (GEMMs + elementwise), given its laid-out tensors
# ----------------------------------------------------------------------------------------------

def _scores(q, k, scale, softcap, bias, hide):
    """Scores q k^T * scale, soft-capped, + bias, hidden keys at -inf; (s, tanh or None)."""
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    t = None
    if softcap > 0:
        t = s.div_(softcap).tanh_()
        s = t * softcap
    if bias is not None:
        s.add_(bias)
    if hide is not None:
        s.masked_fill_(hide, -math.inf)
    return s, t


def _segment_forward(q, k, v, scale, softcap, bias, hide, drop, dropout_p):
    """(out, lse) of one segment (undropped lse); rows that see no key: out 0, lse -inf."""
    s, _ = _scores(q, k, scale, softcap, bias, hide)
    m = s.amax(-1, keepdim=True)
    m = m.masked_fill_(torch.isneginf(m), 0.0)
    e = s.sub_(m).exp_()                       # in place: the scores are not needed again
    denom = e.sum(-1, keepdim=True)
    lse = (m + denom.log()).squeeze(-1)        # log(0) = -inf for rows without keys
    denom.masked_fill_(denom == 0, 1.0)
    if drop is not None:
        e.masked_fill_(drop, 0.0)
        denom.mul_(1.0 - dropout_p)
    return torch.matmul(e, v).div_(denom), lse


def _segment_backward(q, k, v, do, lse_safe, delta, scale, softcap, bias, hide, drop, dropout_p,
                      need_dq, need_dk, need_dv):
    """Gradients of one segment given the FINAL lse (+inf on empty rows) and delta."""
    s, t = _scores(q, k, scale, softcap, bias, hide)
    p = s.sub_(lse_safe.unsqueeze(-1)).exp_()
    dq = dk = dv = None
    if need_dv:
        pd = p if drop is None else p.masked_fill(drop, 0.0)
        dv = torch.matmul(pd.transpose(-1, -2), do)
        if drop is not None:
            dv.div_(1.0 - dropout_p)
    if need_dq or need_dk:
        dp = torch.matmul(do if drop is None else do / (1.0 - dropout_p), v.transpose(-1, -2))
        if drop is not None:
            dp.masked_fill_(drop, 0.0)
        ds = dp.sub_(delta.unsqueeze(-1)).mul_(p)
        if t is not None:
            ds.mul_(1.0 - t * t)
        ds.mul_(scale)
        if need_dq:
            dq = torch.matmul(ds, k)
        if need_dk:
            dk = torch.matmul(ds.transpose(-1, -2), q)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Fast path: the prefix segment (P is small: a handful of batched products)
# ----------------------------------------------------------------------------------------------

def _by_head(x: torch.Tensor) -> torch.Tensor | None:
    """(B, H, N, X) -> (H, B * N, X) as a view when the batch and row dimensions merge without a
    copy (token-major tensors do), else None. A shared prefix's products then contract over the
    whole batch in one GEMM per head (its gradient needs no batch reduction)."""
    b, h, n, xd = x.shape
    if b > 1 and x.stride(0) != n * x.stride(2):
        return None
    return x.transpose(0, 1).reshape(h, b * n, xd)


def _heads_of(x: torch.Tensor, hq: int) -> torch.Tensor:
    """(B', Hkv, N, D) -> (B', Hq, N, D): each KV head repeated over its GQA group."""
    g = hq // x.shape[1]
    return x if g == 1 else x.repeat_interleave(g, 1)


def _group_sum(grad: torch.Tensor, hkv: int) -> torch.Tensor:
    """(B', Hq, N, D) -> (B', Hkv, N, D): the GQA group's gradients summed onto their KV head."""
    bp, hq, n, d = grad.shape
    return grad if hq == hkv else grad.view(bp, hkv, hq // hkv, n, d).sum(2)


class _PrefixLayout:
    """The layout the prefix products of one call run in: ``folded`` (a shared prefix and a
    token-major q: per head (B*Nq, D) @ (D, P)) or broadcast (per (batch, head) products against
    prefix rows (Bp, Hq, P, D), Bp in {1, B}). Tensors are in the accumulation dtype."""

    def __init__(self, geo, q, pk, pv):
        self.geo = geo
        self.pk, self.pv = _heads_of(pk, geo.hq).to(geo.acc), _heads_of(pv, geo.hq).to(geo.acc)
        self.q = q.to(geo.acc)
        self.qf = _by_head(self.q) if pk.shape[0] == 1 else None
        self.folded = self.qf is not None
        self.bias = self.rows(geo.bias_p)
        self.drop = self.rows(geo.drop_p)

    def rows(self, x):
        """(B, Hq, Nq, X) -> this layout's rows ((Hq, B*Nq, X) folded); None stays None."""
        if x is None or not self.folded:
            return x if x is None or x.dtype == torch.bool else x.to(self.geo.acc)
        x = x if x.dtype == torch.bool else x.to(self.geo.acc)
        f = _by_head(x)
        return f if f is not None else x.transpose(0, 1).reshape(x.shape[1], -1, x.shape[-1])

    def unrows(self, x):
        """This layout's rows -> (B, Hq, Nq, X) (a view)."""
        if not self.folded:
            return x
        g = self.geo
        return x.view(g.hq, g.b, g.nq, x.shape[-1]).transpose(0, 1)

    def keys(self, x):
        return x[0] if self.folded else x

    def forward(self, scale):
        """(out (B, Hq, Nq, D), lse (B, Hq, Nq)): every row sees all P keys (finite lse)."""
        g = self.geo
        o, lse = _segment_forward(self.qf if self.folded else self.q, self.keys(self.pk),
                                  self.keys(self.pv), scale, g.softcap, self.bias, None,
                                  self.drop, g.dropout_p)
        return self.unrows(o), self.unrows(lse.unsqueeze(-1)).squeeze(-1)

    def backward(self, do, lse_safe, delta, scale, need_dq, need_dpk, need_dpv):
        """From the FINAL (merged) lse and delta = rowsum(dO * O): the sequence segment's
        backward takes the same merged out and lse, so the two dq parts simply add up. Returns
        (dq part (B, Hq, Nq, D) view or None, dpk, dpv as (Bp, Hkv, P, D) or None)."""
        g = self.geo
        dq, dpk, dpv = _segment_backward(
            self.qf if self.folded else self.q, self.keys(self.pk), self.keys(self.pv),
            self.rows(do), self.rows(lse_safe.unsqueeze(-1)).squeeze(-1),
            self.rows(delta.unsqueeze(-1)).squeeze(-1), scale, g.softcap, self.bias, None,
            self.drop, g.dropout_p, need_dq, need_dpk, need_dpv)

        def grad(x):
            if x is None:
                return None
            return _group_sum(x.unsqueeze(0) if self.folded else x, g.hkv)
        return (None if dq is None else self.unrows(dq)), grad(dpk), grad(dpv)


# ----------------------------------------------------------------------------------------------
# Fast path: the sequence segment (CPU flash kernel, or math over causal query chunks)
# ----------------------------------------------------------------------------------------------

def _flash_lse(lse, q):
    """The logsumexp in the dtype the CPU flash backward expects."""
    return lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)


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


# Causal / windowed segments run over at most _MAX_CHUNKS query chunks of at least _CHUNK_ROWS
# rows, each against only the keys some row of the chunk sees: 2 chunks skip 1/4 of a square
# causal product. More chunks skip more but cost more calls, each a parallel region of its own,
# which is what hurts when other processes compete for the cores.
_CHUNK_ROWS = 128
_MAX_CHUNKS = 2


def _sequence_chunks(geo):
    """[(q0, q1, lo, hi)]: query rows [q0, q1) and the sequence keys [lo, hi) they can see."""
    nq, nk = geo.nq, geo.nk
    if not (geo.causal or geo.window > 0) or nq < 2 * _CHUNK_ROWS:
        return [(0, nq, 0, nk)]
    size = max(_CHUNK_ROWS, -(-nq // _MAX_CHUNKS))
    chunks = []
    for q0 in range(0, nq, size):
        q1 = min(nq, q0 + size)
        hi = min(nk, q1 + nk - nq) if geo.causal else nk
        lo = max(0, q0 + nk - nq - geo.window + 1) if geo.window > 0 else 0
        chunks.append((q0, q1, lo, max(lo, hi)))
    return chunks


class _SequenceMath:
    """The sequence segment in plain math (soft-capping, dropout, non-CPU devices), q chunk by
    chunk; k and v repeated over the GQA group (their gradients summed back)."""

    def __init__(self, geo, q, k, v):
        self.geo = geo
        self.q, self.k, self.v = q.to(geo.acc), _heads_of(k, geo.hq).to(geo.acc), _heads_of(v, geo.hq).to(geo.acc)
        vis = visible_sequence_keys(geo.b, geo.nq, geo.nk, geo.causal, geo.window,
                                    geo.key_padding_mask, q.device)
        self.hide = None if vis is None else ~vis   # small: (1 or B, 1, Nq or 1, Nk)
        self.bias = None if geo.bias_s is None else geo.bias_s.to(geo.acc)
        self.chunks = _sequence_chunks(geo)

    def parts(self, q0, q1, lo, hi):
        """q, k, v, bias, hidden keys and dropped probabilities of rows [q0, q1), keys [lo, hi)."""
        g = self.geo

        def cut(x, rows=True):
            if x is None:
                return None
            r = slice(q0, q1) if rows and x.shape[-2] > 1 else slice(None)
            return x[..., r, lo:hi]
        return (self.q[:, :, q0:q1], self.k[:, :, lo:hi], self.v[:, :, lo:hi],
                cut(self.bias), cut(self.hide), cut(g.drop_s))

    def forward(self, scale):
        g = self.geo
        if len(self.chunks) == 1:
            q, k, v, bias, hide, drop = self.parts(*self.chunks[0])
            return _segment_forward(q, k, v, scale, g.softcap, bias, hide, drop, g.dropout_p)
        out = torch.zeros((g.b, g.hq, g.nq, g.d), dtype=g.acc, device=self.q.device)
        lse = torch.full((g.b, g.hq, g.nq), -math.inf, dtype=g.acc, device=self.q.device)
        for q0, q1, lo, hi in self.chunks:
            if hi > lo:
                q, k, v, bias, hide, drop = self.parts(q0, q1, lo, hi)
                out[:, :, q0:q1], lse[:, :, q0:q1] = _segment_forward(
                    q, k, v, scale, g.softcap, bias, hide, drop, g.dropout_p)
        return out, lse

    def backward(self, do, lse_safe, delta, scale, need_dq, need_dk, need_dv):
        g = self.geo
        dq = dk = dv = None
        if len(self.chunks) > 1:
            shape = (g.b, g.hq, g.nq, g.d)
            dq = torch.zeros(shape, dtype=g.acc, device=do.device) if need_dq else None
            dk = torch.zeros((g.b, g.hq, g.nk, g.d), dtype=g.acc, device=do.device) if need_dk else None
            dv = torch.zeros((g.b, g.hq, g.nk, g.d), dtype=g.acc, device=do.device) if need_dv else None
        for q0, q1, lo, hi in self.chunks:
            if hi <= lo:
                continue
            q, k, v, bias, hide, drop = self.parts(q0, q1, lo, hi)
            cq, ck, cv = _segment_backward(
                q, k, v, do[:, :, q0:q1], lse_safe[:, :, q0:q1], delta[:, :, q0:q1], scale,
                g.softcap, bias, hide, drop, g.dropout_p, need_dq, need_dk, need_dv)
            if len(self.chunks) == 1:
                dq, dk, dv = cq, ck, cv
                break
            if need_dq:
                dq[:, :, q0:q1] = cq
            if need_dk:
                dk[:, :, lo:hi] += ck
            if need_dv:
                dv[:, :, lo:hi] += cv
        return (dq, None if dk is None else _group_sum(dk, g.hkv),
                None if dv is None else _group_sum(dv, g.hkv))


def _flash_blocks(geo, is_causal):
    """The CPU flash calls of a causal / windowed sequence segment, or None (one call): per query
    chunk (see ``_sequence_chunks``), (q0, q1, lo, hi, is_causal) over the keys it can see. A
    square causal chunk without a mask splits into its unmasked keys [0, q0) and the diagonal
    block [q0, q1) with ``is_causal``. The CPU flash backward skips no masked block by itself,
    and its forward skips none when the causality comes as a mask."""
    chunks = _sequence_chunks(geo)
    if len(chunks) == 1:
        return None
    blocks = []
    for q0, q1, lo, hi in chunks:
        if hi <= lo:
            continue
        if is_causal:
            if q0 > lo:
                blocks.append((q0, q1, lo, q0, False))
            blocks.append((q0, q1, q0, q1, True))
        else:
            blocks.append((q0, q1, lo, hi, False))
    return blocks


def _mask_block(mask, q0, q1, lo, hi):
    if mask is None:
        return None
    rows = slice(q0, q1) if mask.shape[-2] > 1 else slice(None)
    return mask[..., rows, lo:hi]


def _flash_sequence_backward(grad_out, q, k, v, out, lse_f, geo, scale):
    """dq, dk, dv of the sequence segment through the CPU flash backward, block by block where
    causality leaves blocks invisible (the gradients of disjoint key blocks add up: each call
    takes the final out and lse)."""
    mask, is_causal = _flash_mask(geo, q.dtype, q.device)
    blocks = _flash_blocks(geo, is_causal)
    if blocks is None:
        return _FLASH_CPU_BWD(grad_out, q, k, v, out, lse_f, 0.0, is_causal, attn_mask=mask,
                              scale=scale)
    # Where the blocks' row ranges (and key ranges) are equal or disjoint and cover everything,
    # the first block of a range writes it and later ones add: no zero-filled buffers.
    tiles = (_tiles([(b[0], b[1]) for b in blocks], geo.nq)
             and _tiles([(b[2], b[3]) for b in blocks], geo.nk))
    grads = [token_major_empty(x.shape, x.dtype, x.device) for x in (q, k, v)]
    if not tiles:
        for g in grads:
            g.zero_()
    written = set()
    for q0, q1, lo, hi, causal in blocks:
        r, c = slice(q0, q1), slice(lo, hi)
        parts = _FLASH_CPU_BWD(grad_out[:, :, r], q[:, :, r], k[:, :, c], v[:, :, c],
                               out[:, :, r], lse_f[:, :, r], 0.0, causal,
                               attn_mask=_mask_block(mask, q0, q1, lo, hi), scale=scale)
        for i, (g, part) in enumerate(zip(grads, parts)):
            rng = (i, q0, q1) if i == 0 else (i, lo, hi)
            view = g[:, :, rng[1]:rng[2]]
            if tiles and rng not in written:
                view.copy_(part)
                written.add(rng)
            else:
                view.add_(part)
    return tuple(grads)


def _tiles(ranges, n):
    """Whether the ranges [a, b) are pairwise equal or disjoint and together cover [0, n)."""
    rs = sorted(set(ranges))
    return (rs[0][0] == 0 and rs[-1][1] == n
            and all(a[1] == b[0] for a, b in zip(rs, rs[1:])))


def _sequence_forward(q, k, v, geo, scale):
    """Sequence segment: (out (B,Hq,Nq,D), lse (B,Hq,Nq)) in the accumulation dtype."""
    if geo.flash:
        mask, is_causal = _flash_mask(geo, q.dtype, q.device)
        blocks = None if is_causal else _flash_blocks(geo, False)
        if blocks is None:
            out, lse = _FLASH_CPU(q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale)
        else:   # causality as a mask: one call per query chunk, against the keys it sees
            out = token_major_empty(q.shape, q.dtype, q.device).zero_()
            lse = torch.full(q.shape[:-1], -math.inf, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32, device=q.device)
            for q0, q1, lo, hi, _ in blocks:
                r, c = slice(q0, q1), slice(lo, hi)
                out[:, :, r], lse[:, :, r] = _FLASH_CPU(
                    q[:, :, r], k[:, :, c], v[:, :, c], 0.0, False,
                    attn_mask=_mask_block(mask, q0, q1, lo, hi), scale=scale)
        lse = lse.to(geo.acc)
        if geo.causal or geo.window > 0 or geo.key_padding_mask is not None:
            empty = _empty_sequence_rows(geo.b, geo.nq, geo.nk, geo.causal, geo.window,
                                         geo.key_padding_mask, q.device)
            lse = lse.masked_fill(empty, -math.inf)
        return out.to(geo.acc), lse
    return _SequenceMath(geo, q, k, v).forward(scale)


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------

def prefix_attention_fwd(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_bias,
                         dropout_seed, causal, window, softcap, scale, dropout_p):
    geo = _Geometry(q, k, prefix_k, prefix_index, key_padding_mask, attn_bias, dropout_seed,
                    causal, window, softcap, dropout_p, forward=True)
    out = lse = None
    if geo.p > 0 and geo.flash:
        # The prefix through the flash kernel too: the same products as GEMMs + softmax passes
        # (``_PrefixLayout``) measured 2-8% slower at P = 32-64 on 2 cores, more so when other
        # processes compete for them (each small op is a parallel region of its own).
        pk, pv = geo.prefix_sel(prefix_k, prefix_v, prefix_index)
        pk, pv = pk.expand(geo.b, *pk.shape[1:]), pv.expand(geo.b, *pv.shape[1:])
        bias = None if geo.bias_p is None else geo.bias_p.to(q.dtype)
        out, lse = _FLASH_CPU(q, pk, pv, 0.0, False, attn_mask=bias, scale=scale)
        out, lse = out.to(geo.acc), lse.to(geo.acc)
    elif geo.p > 0:
        out, lse = _PrefixLayout(geo, q, *geo.prefix_sel(prefix_k, prefix_v, prefix_index)).forward(scale)
    if geo.nk > 0:
        out_s, lse_s = _sequence_forward(q, k, v, geo, scale)
        if out is None:
            out, lse = out_s, lse_s
        elif out.dtype == q.dtype:  # float32 / float64: merge straight into the output
            out, lse = merge_prefix_into(token_major_empty(q.shape, q.dtype, q.device),
                                         out, lse, out_s, lse_s)
        else:
            out, lse = merge_segments_(out, lse, out_s, lse_s)
    if out is None:  # no prefix and no keys at all
        out = torch.zeros(q.shape, dtype=geo.acc, device=q.device)
        lse = torch.full(q.shape[:-1], -math.inf, dtype=geo.acc, device=q.device)
    if geo.p == 0:  # only then can a row see no key at all; its output must be 0, never NaN
        out = out.masked_fill(torch.isneginf(lse).unsqueeze(-1), 0.0)
    out, lse = as_token_major(out, q.dtype), lse.contiguous()
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
                    causal, window, softcap, dropout_p, forward=False)
    do = grad_out.to(geo.acc)
    delta = None

    def get_delta():  # rowsum(dO * O), minus the lse gradient: every math segment needs it
        nonlocal delta
        if delta is None:
            delta = (do * out.to(geo.acc)).sum(-1)
            if grad_lse is not None:
                delta = delta - grad_lse.to(geo.acc)
        return delta
    lse_safe = _safe_lse(lse.to(geo.acc))
    dq = dk = dv = dpk = dpv = None

    if geo.p > 0 and geo.flash and grad_lse is None and need_dq:
        pk, pv = geo.prefix_sel(prefix_k, prefix_v, prefix_index)
        pk, pv = pk.expand(geo.b, *pk.shape[1:]), pv.expand(geo.b, *pv.shape[1:])
        bias = None if geo.bias_p is None else geo.bias_p.to(q.dtype)
        dq, dpk_rows, dpv_rows = _FLASH_CPU_BWD(grad_out, q, pk, pv, out, _flash_lse(lse_safe, q),
                                                0.0, False, attn_mask=bias, scale=scale)
        dq = dq.to(geo.acc)
        dpk = geo.reduce_rows(dpk_rows, prefix_k, prefix_index) if need_dpk else None
        dpv = geo.reduce_rows(dpv_rows, prefix_v, prefix_index) if need_dpv else None
    elif geo.p > 0 and (need_dq or need_dpk or need_dpv):
        # Only the products the requested gradients need (prompt-only: q, k, v frozen -> no
        # sequence backward at all, only the prefix gradients).
        lay = _PrefixLayout(geo, q, *geo.prefix_sel(prefix_k, prefix_v, prefix_index))
        dq, dpk_rows, dpv_rows = lay.backward(do, lse_safe, get_delta(), scale,
                                              need_dq, need_dpk, need_dpv)
        dpk = None if dpk_rows is None else geo.reduce_rows(dpk_rows, prefix_k, prefix_index)
        dpv = None if dpv_rows is None else geo.reduce_rows(dpv_rows, prefix_v, prefix_index)

    if geo.nk > 0 and (need_dq or need_dk or need_dv):
        if geo.flash and grad_lse is None:
            dq_s, dk, dv = _flash_sequence_backward(grad_out, q, k, v, out, _flash_lse(lse_safe, q),
                                                    geo, scale)
            dq_s = dq_s.to(geo.acc)
        else:
            dq_s, dk, dv = _SequenceMath(geo, q, k, v).backward(do, lse_safe, get_delta(), scale,
                                                                need_dq, need_dk, need_dv)
        if need_dq and dq is None:
            dq = dq_s
        elif need_dq:
            dq = dq_s.add_(dq)      # in place: no fresh (B, H, N, D) buffer to fault in

    def finish(grad, like, need, token_major):
        if not need:
            return like.new_empty(0)
        if grad is None:  # needed but no segment contributes (e.g. Nk == 0)
            grad = torch.zeros((), dtype=like.dtype, device=like.device).expand(like.shape)
        if token_major:  # q, k, v: the layout the op's fake implementation declares
            return as_token_major(grad, like.dtype)
        return grad.to(like.dtype).contiguous()

    return (finish(dq, q, need_dq, True), finish(dk, k, need_dk, True),
            finish(dv, v, need_dv, True),
            finish(dpk, prefix_k, need_dpk, False) if prefix_k is not None else q.new_empty(0),
            finish(dpv, prefix_v, need_dpv, False) if prefix_v is not None else q.new_empty(0))
