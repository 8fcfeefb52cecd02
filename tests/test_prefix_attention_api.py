"""prefix_attention's argument checks (each names the argument, raises before any work) and
backend dispatch."""
import pytest
import torch

import ptkernels
from ptkernels import backends
from ptkernels.backends import eager


def _ok(**over):
    kw = dict(q=torch.randn(2, 4, 5, 8), k=torch.randn(2, 2, 7, 8), v=torch.randn(2, 2, 7, 8),
              prefix_k=torch.randn(2, 3, 8), prefix_v=torch.randn(2, 3, 8))
    kw.update(over)
    return kw


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if any backend kernel runs: errors must come before any work."""
    def boom(*a, **k):
        raise AssertionError("a kernel ran before the argument check")
    monkeypatch.setattr(eager, "prefix_attention_fwd", boom)


BAD = [
    ("q", dict(q=torch.randn(4, 5, 8)), ValueError, r"q must have 4 dimensions"),
    ("k", dict(k=torch.randn(2, 2, 7)), ValueError, r"k must have 4 dimensions"),
    ("q", dict(q=[1.0]), TypeError, r"q must be a torch.Tensor"),
    ("q", dict(q=torch.randint(0, 3, (2, 4, 5, 8))), TypeError, r"q must be float32"),
    ("k", dict(k=torch.randn(3, 2, 7, 8)), ValueError, r"k must have shape .* B = 2"),
    ("k", dict(k=torch.randn(2, 2, 7, 4), v=torch.randn(2, 2, 7, 4)), ValueError, r"D = 8"),
    ("v", dict(v=torch.randn(2, 2, 6, 8)), ValueError, r"v must have shape"),
    ("heads", dict(k=torch.randn(2, 3, 7, 8), v=torch.randn(2, 3, 7, 8),
                   prefix_k=torch.randn(3, 3, 8), prefix_v=torch.randn(3, 3, 8)),
     ValueError, r"Hq=4 must be a multiple of .* Hkv=3"),
    ("dtype", dict(k=torch.randn(2, 2, 7, 8, dtype=torch.float16)), TypeError, r"k has dtype torch.float16 but q"),
    ("prefix dtype", dict(prefix_k=torch.randn(2, 3, 8).half()), TypeError, r"prefix_k has dtype"),
    ("prefix pair", dict(prefix_v=None), ValueError, r"prefix_k and prefix_v must be given together"),
    ("prefix shape", dict(prefix_k=torch.randn(2, 3, 8), prefix_v=torch.randn(2, 4, 8)),
     ValueError, r"same shape"),
    ("prefix heads", dict(prefix_k=torch.randn(4, 3, 8), prefix_v=torch.randn(4, 3, 8)),
     ValueError, r"prefix_k must be .* Hkv = 2"),
    ("prefix rank", dict(prefix_k=torch.randn(3, 8), prefix_v=torch.randn(3, 8)),
     ValueError, r"prefix_k must have 3 or 4 dimensions"),
    ("per-row B", dict(prefix_k=torch.randn(3, 2, 3, 8), prefix_v=torch.randn(3, 2, 3, 8)),
     ValueError, r"one prefix per row .*\(B=2"),
    ("index without bank", dict(prefix_index=torch.tensor([0, 0])), ValueError, r"prefix_index needs a bank"),
    ("index without prefix", dict(prefix_k=None, prefix_v=None, prefix_index=torch.tensor([0, 1])),
     ValueError, r"prefix_index was given without"),
    ("index range", dict(prefix_k=torch.randn(3, 2, 3, 8), prefix_v=torch.randn(3, 2, 3, 8),
                         prefix_index=torch.tensor([0, 3])), IndexError, r"\[0, 3\).*max 3"),
    ("index negative", dict(prefix_k=torch.randn(3, 2, 3, 8), prefix_v=torch.randn(3, 2, 3, 8),
                            prefix_index=torch.tensor([-1, 0])), IndexError, r"min -1"),
    ("index dtype", dict(prefix_k=torch.randn(3, 2, 3, 8), prefix_v=torch.randn(3, 2, 3, 8),
                         prefix_index=torch.tensor([0.0, 1.0])), TypeError, r"prefix_index must be an integer"),
    ("index shape", dict(prefix_k=torch.randn(3, 2, 3, 8), prefix_v=torch.randn(3, 2, 3, 8),
                         prefix_index=torch.tensor([0, 1, 2])), ValueError, r"prefix_index must have shape \(B=2,\)"),
    ("mask length", dict(attention_mask=torch.ones(2, 10)), ValueError,
     r"attention_mask must have shape \(B, Nk\) = \(2, 7\)"),
    ("mask rank", dict(attention_mask=torch.ones(2, 1, 7)), ValueError, r"attention_mask must have 2"),
    ("window", dict(window=0), ValueError, r"window must be None or a positive int"),
    ("softcap", dict(softcap=-1.0), ValueError, r"softcap must be None or a positive"),
    ("dropout", dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    ("bias shape", dict(attn_bias=torch.randn(4, 5, 9)), ValueError,
     r"attn_bias must broadcast to \(B, Hq, Nq, P \+ Nk\) = \(2, 4, 5, 10\)"),
    ("bias dtype", dict(attn_bias=torch.zeros(1, dtype=torch.int64)), TypeError, r"attn_bias must be a float"),
    ("head dim", dict(q=torch.randn(2, 4, 5, 264), k=torch.randn(2, 2, 7, 264), v=torch.randn(2, 2, 7, 264),
                      prefix_k=None, prefix_v=None), ValueError, r"between 1 and 256"),
    ("backend", dict(backend="fast"), ValueError, r"backend must be one of"),
]


@pytest.mark.parametrize("what,over,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument(what, over, exc, match, no_work):
    with pytest.raises(exc, match=match):
        ptkernels.prefix_attention(**_ok(**over))


def test_good_input_runs():
    out = ptkernels.prefix_attention(**_ok(attention_mask=torch.tensor([[1] * 7, [0] * 2 + [1] * 5])))
    assert out.shape == (2, 4, 5, 8)


def test_integer_mask_equals_bool_mask():
    m = torch.tensor([[1] * 7, [0] * 2 + [1] * 5])
    kw = _ok()
    a = ptkernels.prefix_attention(**kw, attention_mask=m, causal=True)
    b = ptkernels.prefix_attention(**kw, attention_mask=m.bool(), causal=True)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_auto_picks_eager_on_cpu():
    assert backends.resolve("prefix_attention", torch.device("cpu"), "auto") in ("eager",)


def test_env_override(monkeypatch):
    monkeypatch.setenv("PTKERNELS_BACKEND", "eager")
    assert backends.resolve("prefix_attention", torch.device("cpu"), "auto") == "eager"
    monkeypatch.setenv("PTKERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="PTKERNELS_BACKEND must be one of"):
        ptkernels.prefix_attention(**_ok())


def test_unavailable_backend_is_a_clear_error():
    with pytest.raises(backends.BackendUnavailableError, match=r"backend 'cuda' is not available"):
        ptkernels.prefix_attention(**_ok(), backend="cuda")


def test_describe_lists_every_op_and_backend():
    rows = backends.describe()
    assert {r["op"] for r in rows} == set(backends.OPS)
    for r in rows:
        assert set(r["backends"]) == set(backends.BACKENDS)
        if r["device"] == "cpu":
            assert r["backend"] == "eager"


def test_float64_only_on_eager():
    kw = {n: x.double() for n, x in _ok().items()}
    ptkernels.prefix_attention(**kw, backend="eager")


def test_auto_order_on_cuda_prefers_cuda_for_decode_shapes(monkeypatch):
    """With every backend available on a GPU: training-size attention -> triton, decode-size
    attention and the GPC cell -> cuda (the documented defaults until benchmarks say otherwise)."""
    monkeypatch.setattr(backends, "availability", lambda name, op, device: (True, "test"))
    gpu = torch.device("cuda", 0)
    assert backends.resolve("prefix_attention", gpu) == "triton"
    assert backends.resolve("prefix_attention", gpu, "auto", "decode") == "cuda"
    assert backends.resolve("gpc_cell", gpu) == "cuda"
    assert backends.is_decode_shape(1, 4096) and not backends.is_decode_shape(64, 4096)
    seen = []
    monkeypatch.setattr(backends, "resolve", lambda op, dev, req, variant=None: seen.append(variant) or "eager")
    q = torch.randn(1, 2, 1, 8)
    k = v = torch.randn(1, 2, 600, 8)
    ptkernels.prefix_attention(q, k, v)
    ptkernels.prefix_attention(q.expand(1, 2, 20, 8), k, v)
    assert seen == ["decode", None]
