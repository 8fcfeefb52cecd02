"""``ptkernels.prefix_attention``: argument checks, normalization, the custom ops and autograd.

Two ``torch.library`` custom ops carry the work, so ``torch.compile`` traces them without graph
breaks (their fake implementations give the output shapes):

* ``ptkernels::prefix_attention_fwd`` -> (out (B, Hq, Nq, D), lse (B, Hq, Nq) float32)
* ``ptkernels::prefix_attention_bwd`` -> (dq, dk, dv, dprefix_k, dprefix_v); a gradient nobody
  needs comes back as an empty tensor and is never computed.

Both take a ``backend`` string resolved by ``ptkernels.backends.resolve`` before the call. The
CUDA library implements ``ptkernels::prefix_attention_fwd_cuda`` / ``_bwd_cuda``, the same
schemas without ``backend`` (derived in ``_kernel_entries``). The normalized arguments every
backend receives:

* ``prefix_k``/``prefix_v``: None (no prefix) or (T, Hkv, P, D) with P >= 1; ``prefix_index``
  None (T == 1: shared by the batch; T == B: one per row) or int64 (B,) (bank).
* ``key_padding_mask``: None or bool (B, Nk), True = a real key.
* ``attn_bias``: None or a float tensor of shape (B, Hq, Nq, P + Nk), usually an expanded view
  (stride 0 on broadcast dimensions: load it by strides).
* ``dropout_seed``: None or an int64 CPU tensor (1,) (``dropout_p`` > 0 only).
* ``window`` -1 = none; ``softcap`` 0.0 = none; ``scale`` a float.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ptkernels import backends
from ptkernels.backends import eager
from ptkernels.ops._bias_grad import bias_grad
from ptkernels.ops._kernel_entries import define_kernel_entry
from ptkernels.ops._validate import (require_float, require_same, require_shape, require_tensor,
                                     shape_str)

_LSE_FLOAT64 = (torch.float64,)


def _lse_dtype(dtype):
    return torch.float64 if dtype in _LSE_FLOAT64 else torch.float32


@torch.library.custom_op("ptkernels::prefix_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: Optional[torch.Tensor],
            prefix_v: Optional[torch.Tensor], prefix_index: Optional[torch.Tensor],
            key_padding_mask: Optional[torch.Tensor], attn_bias: Optional[torch.Tensor],
            dropout_seed: Optional[torch.Tensor], causal: bool, window: int, softcap: float,
            scale: float, dropout_p: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return backends.get(backend).prefix_attention_fwd(
        q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_bias, dropout_seed,
        causal, window, softcap, scale, dropout_p)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_bias,
              dropout_seed, causal, window, softcap, scale, dropout_p, backend):
    return (_like_out(q, backend),
            q.new_empty(q.shape[:-1], dtype=_lse_dtype(q.dtype)))


def _like_out(x, backend):
    """A (B, H, N, D) result of ``backend`` shaped like ``x``: the eager backend returns its
    outputs and q/k/v gradients token-major ((B, N, H, D) in memory), the others contiguous."""
    if backend == eager.NAME:
        return eager.token_major_empty(x.shape, x.dtype, x.device)
    return x.new_empty(x.shape)


@torch.library.custom_op("ptkernels::prefix_attention_bwd", mutates_args=())
def _bwd_op(grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor], q: torch.Tensor,
            k: torch.Tensor, v: torch.Tensor, prefix_k: Optional[torch.Tensor],
            prefix_v: Optional[torch.Tensor], prefix_index: Optional[torch.Tensor],
            key_padding_mask: Optional[torch.Tensor], attn_bias: Optional[torch.Tensor],
            dropout_seed: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor,
            causal: bool, window: int, softcap: float, scale: float, dropout_p: float,
            output_mask: list[bool], backend: str
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(backends.get(backend).prefix_attention_bwd(
        grad_out, grad_lse, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask,
        attn_bias, dropout_seed, out, lse, causal, window, softcap, scale, dropout_p,
        list(output_mask)))


@_bwd_op.register_fake
def _bwd_fake(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask,
              attn_bias, dropout_seed, out, lse, causal, window, softcap, scale, dropout_p,
              output_mask, backend):
    def like(x, need):
        return x.new_empty(x.shape) if (need and x is not None) else q.new_empty(0)

    def like_qkv(x, need):
        return _like_out(x, backend) if need else q.new_empty(0)
    return (like_qkv(q, output_mask[0]), like_qkv(k, output_mask[1]), like_qkv(v, output_mask[2]),
            like(prefix_k, output_mask[3]), like(prefix_v, output_mask[4]))


def _setup_context(ctx, inputs, output):
    (q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_bias, dropout_seed,
     causal, window, softcap, scale, dropout_p, backend) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_bias,
                          dropout_seed, out, lse)
    ctx.options = (causal, window, softcap, scale, dropout_p, backend)
    # An unused lse must not cost a zero-filled gradient (and a dlse pass in every backend).
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_lse):
    (q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_bias, dropout_seed,
     out, lse) = ctx.saved_tensors
    causal, window, softcap, scale, dropout_p, backend = ctx.options
    needs = ctx.needs_input_grad
    output_mask = [bool(needs[0]), bool(needs[1]), bool(needs[2]),
                   bool(needs[3]) and prefix_k is not None, bool(needs[4]) and prefix_v is not None]
    need_bias = bool(needs[7]) and attn_bias is not None
    if grad_out is None and grad_lse is None or not (any(output_mask) or need_bias):
        return (None,) * 15
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grads = (None,) * 5
    if any(output_mask):
        grads = _bwd_op(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, prefix_index,
                        key_padding_mask, attn_bias, dropout_seed, out, lse, causal, window,
                        softcap, scale, dropout_p, output_mask, backend)
    dbias = None
    if need_bias:
        dbias = bias_grad(grad_out, grad_lse, q, k, v, prefix_k, prefix_v, prefix_index,
                          key_padding_mask, attn_bias, dropout_seed, out, lse, causal, window,
                          softcap, scale, dropout_p, backend)
    return (tuple(g if need else None for g, need in zip(grads, output_mask))
            + (None, None, dbias) + (None,) * 7)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)

# The CUDA library's kernel entries: the same schemas without ``backend`` (see _kernel_entries).
FWD_KERNEL = define_kernel_entry(_fwd_op, _fwd_fake)
BWD_KERNEL = define_kernel_entry(_bwd_op, _bwd_fake)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------

def draw_dropout_seed() -> torch.Tensor:
    """The dropout seed ``prefix_attention`` draws: one int64 from torch's default CPU generator.

    After ``torch.manual_seed(s)`` a test can call this to learn the seed a call will use.
    """
    return torch.randint(0, 2 ** 62, (1,), dtype=torch.int64)


def _check_prefix(prefix_k, prefix_v, prefix_index, b, hkv, d, q):
    """Normalize the prefix to (T, Hkv, P, D) (or None) and validate ``prefix_index``."""
    if prefix_k is None and prefix_v is None:
        if prefix_index is not None:
            raise ValueError("prefix_index was given without prefix_k/prefix_v")
        return None, None, None
    if prefix_k is None or prefix_v is None:
        raise ValueError("prefix_k and prefix_v must be given together (or both None)")
    forms = "(Hkv, P, D) shared, (B, Hkv, P, D) per row, or a bank (T, Hkv, P, D) with prefix_index"
    require_tensor("prefix_k", prefix_k, (3, 4), forms)
    require_tensor("prefix_v", prefix_v, (3, 4), forms)
    require_same("prefix_k", prefix_k, "q", q)
    require_same("prefix_v", prefix_v, "q", q)
    if prefix_k.shape != prefix_v.shape:
        raise ValueError(f"prefix_k and prefix_v must have the same shape, got "
                         f"{shape_str(prefix_k)} and {shape_str(prefix_v)}")
    if prefix_k.shape[-3] != hkv or prefix_k.shape[-1] != d:
        raise ValueError(f"prefix_k must be {forms} with Hkv = {hkv} and D = {d} (from k and q), "
                         f"got {shape_str(prefix_k)}")
    if prefix_k.dim() == 3:
        if prefix_index is not None:
            raise ValueError("prefix_index needs a bank prefix of shape (T, Hkv, P, D); "
                             f"prefix_k has shape {shape_str(prefix_k)}")
        prefix_k, prefix_v = prefix_k.unsqueeze(0), prefix_v.unsqueeze(0)
    elif prefix_index is None:
        if prefix_k.shape[0] != b:
            raise ValueError(f"a 4-d prefix_k without prefix_index is one prefix per row and must "
                             f"have shape (B={b}, Hkv, P, D), got {shape_str(prefix_k)}; pass "
                             f"prefix_index (B,) to choose rows from a bank")
    else:
        require_tensor("prefix_index", prefix_index, 1, f"(B={b},)")
        if prefix_index.shape[0] != b:
            raise ValueError(f"prefix_index must have shape (B={b},), got {shape_str(prefix_index)}")
        if prefix_index.dtype.is_floating_point or prefix_index.dtype in (torch.bool, torch.complex64,
                                                                           torch.complex128):
            raise TypeError(f"prefix_index must be an integer tensor, got {prefix_index.dtype}")
        if prefix_index.device != q.device:
            raise ValueError(f"prefix_index is on {prefix_index.device} but q is on {q.device}")
        prefix_index = prefix_index.to(torch.int64)
        if not torch.compiler.is_compiling() and prefix_index.numel() > 0:
            t = prefix_k.shape[0]
            if prefix_index.device.type == "cpu":
                lo, hi = torch.aminmax(prefix_index)
                if int(lo) < 0 or int(hi) >= t:
                    raise IndexError(f"prefix_index values must lie in [0, {t}) (the bank has "
                                     f"T={t} prefixes), got min {int(lo)}, max {int(hi)}")
            else:
                # On a GPU the range check runs on the device (no host synchronization in the
                # op path): an index out of range stops the stream with this message.
                torch._assert_async(((prefix_index >= 0) & (prefix_index < t)).all(),
                                    f"prefix_index values must lie in [0, {t}) (the bank has "
                                    f"T={t} prefixes)")
    if prefix_k.shape[2] == 0:
        return None, None, None
    return prefix_k, prefix_v, prefix_index


def _check_mask(attention_mask, b, nk, q):
    if attention_mask is None:
        return None
    require_tensor("attention_mask", attention_mask, 2, f"(B={b}, Nk={nk})")
    if tuple(attention_mask.shape) != (b, nk):
        raise ValueError(f"attention_mask must have shape (B, Nk) = ({b}, {nk}), one entry per "
                         f"sequence key (not per prefix key), got {shape_str(attention_mask)}")
    if attention_mask.device != q.device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but q is on {q.device}")
    if attention_mask.dtype == torch.bool:
        return attention_mask
    if attention_mask.dtype.is_complex:
        raise TypeError(f"attention_mask must be bool or 0/1, got {attention_mask.dtype}")
    # a float additive mask (0 / -inf, transformers' 4-D style) would read inverted as a keep-mask
    if not torch.compiler.is_compiling() and attention_mask.numel() and \
            not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must be a keep-mask: bool, or 0/1 with 1 = a real key; "
                         "it holds other values (an additive 0/-inf mask? pass (mask == 0))")
    return attention_mask != 0


def _check_bias(attn_bias, b, hq, nq, ntot, q):
    if attn_bias is None:
        return None
    require_tensor("attn_bias", attn_bias)
    if not attn_bias.dtype.is_floating_point:
        raise TypeError(f"attn_bias must be a float tensor, got {attn_bias.dtype}")
    if attn_bias.device != q.device:
        raise ValueError(f"attn_bias is on {attn_bias.device} but q is on {q.device}")
    target = (b, hq, nq, ntot)
    if attn_bias.dim() <= 4:
        try:
            return attn_bias.expand(target)
        except RuntimeError:
            pass
    raise ValueError(f"attn_bias must broadcast to (B, Hq, Nq, P + Nk) = {target} (prefix columns "
                     f"first), got {shape_str(attn_bias)}")


def prefix_attention(q, k, v, prefix_k=None, prefix_v=None, *, prefix_index=None, causal=False,
                     attention_mask=None, window=None, softcap=None, attn_bias=None, scale=None,
                     dropout_p=0.0, return_lse=False, backend="auto"):
    """Attention over a trainable prefix of keys/values followed by the sequence's own keys.

    Args:
        q: (B, Hq, Nq, D) queries. k, v: (B, Hkv, Nk, D), Hq % Hkv == 0 (MHA, GQA, MQA).
        prefix_k, prefix_v: None; (Hkv, P, D) shared by the batch; (B, Hkv, P, D) one per row;
            or a bank (T, Hkv, P, D) with ``prefix_index`` (B,) choosing each row's prefix.
            Prefix keys come first in the scores, are visible to every query, never masked.
        causal: bottom-right aligned: query i sees sequence key j iff j <= i + (Nk - Nq).
        attention_mask: (B, Nk) bool or 0/1; False/0 marks a padded sequence key. Any other
            value (e.g. an additive 0 / -inf float mask) is refused.
        window: sliding window: query i also needs (i + Nk - Nq) - j < window.
        softcap: scores become softcap * tanh(scores / softcap) (before the bias is added).
        attn_bias: additive float bias broadcastable to (B, Hq, Nq, P + Nk), prefix columns
            first. A bias that requires grad gets its gradient (the score gradient, rebuilt in
            backward from the saved inputs: one (B, Hq, Nq, P + Nk) float32 tensor).
        scale: score scale, default D ** -0.5.
        dropout_p: dropout on the attention probabilities (prefix and sequence alike).
        return_lse: also return the natural-log logsumexp (B, Hq, Nq) in float32 (float64 for
            float64 inputs); -inf on rows that see no key (their output is 0).
        backend: "auto", "eager", "triton" or "cuda"; ``PTKERNELS_BACKEND`` overrides "auto".

    Returns:
        out (B, Hq, Nq, D) in q's dtype, and lse if ``return_lse``. B == 0 or Nq == 0 gives
        empty results. A NaN (or inf) in query row i stays in row i: row i's output comes
        back NaN on every backend (its lse NaN on eager, NaN or -inf on the kernels), every
        other row is unaffected. A NaN in a key or value reaches every row that sees that key.
    """
    require_tensor("q", q, 4, "(B, Hq, Nq, D)")
    require_tensor("k", k, 4, "(B, Hkv, Nk, D)")
    require_tensor("v", v, 4, "(B, Hkv, Nk, D)")
    require_float("q", q)
    require_same("k", k, "q", q)
    require_same("v", v, "q", q)
    b, hq, nq, d = q.shape
    if k.shape[0] != b or k.shape[-1] != d:
        raise ValueError(f"k must have shape (B, Hkv, Nk, D) with B = {b} and D = {d} (from q), "
                         f"got {shape_str(k)}")
    hkv, nk = k.shape[1], k.shape[2]
    require_shape("v", v, tuple(k.shape), "(B, Hkv, Nk, D) like k")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"the number of query heads Hq={hq} must be a multiple of the number of "
                         f"key/value heads Hkv={hkv} (MHA, GQA or MQA)")
    if not 1 <= d <= 256:
        raise ValueError(f"head dimension D must be between 1 and 256, got {d}")
    prefix_k, prefix_v, prefix_index = _check_prefix(prefix_k, prefix_v, prefix_index, b, hkv, d, q)
    p_len = 0 if prefix_k is None else prefix_k.shape[2]
    key_padding_mask = _check_mask(attention_mask, b, nk, q)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None or a positive int, got {window!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and not isinstance(softcap, bool)
                                    and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be None or a positive finite number, got {softcap!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be None or a number, got {type(scale).__name__}")
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    attn_bias = _check_bias(attn_bias, b, hq, nq, p_len + nk, q)
    decode = backends.is_decode_shape(nq, p_len + nk)
    name = backends.resolve("prefix_attention", q.device, backend, "decode" if decode else None)
    if q.dtype == torch.float64 and name != "eager":
        raise TypeError(f"float64 inputs run only on the eager backend, not {name!r}")

    if b == 0 or nq == 0:   # no query row: empty results, no kernel (CPU flash would SIGFPE)
        out = q * 0
        lse = q.new_zeros(q.shape[:-1], dtype=_lse_dtype(q.dtype))
        return (out, lse) if return_lse else out
    seed = draw_dropout_seed() if dropout_p > 0 else None
    out, lse = _fwd_op(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_bias,
                       seed, bool(causal), -1 if window is None else int(window),
                       0.0 if softcap is None else float(softcap),
                       float(d ** -0.5 if scale is None else scale), float(dropout_p), name)
    return (out, lse) if return_lse else out
