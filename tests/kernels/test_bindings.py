# Every ctypes binding fed tensors C must not read as they are: transposed (non-contiguous), strided views into a
# larger buffer, another dtype, and tensors without CPU memory (meta). Each call gives the result of the plain
# input or a ValueError naming the argument; never a crash, never a wrong number.
import math

import pytest
import torch

from chatglm import kernels
from chatglm.cache import KVCache
from chatglm.quantize import quantize_weight
from helpers import needs_kernels, random_model

pytestmark = needs_kernels


def _g():
    return torch.Generator().manual_seed(0)


def _qlinear(bits):
    def make():
        g = _g()
        q, s = quantize_weight(torch.randn(24, 64, generator=g), bits)
        args = {"x": torch.randn(3, 64, generator=g), "q": q, "scale": s.half(), "bias": torch.randn(24, generator=g)}
        return args, lambda a: kernels.qlinear(a["x"], a["q"], a["scale"], a["bias"], bits)
    return make


def _f16linear():
    g = _g()
    args = {"x": torch.randn(2, 40, generator=g), "w": torch.randn(16, 40, generator=g).half(),
            "bias": torch.randn(16, generator=g)}
    return args, lambda a: kernels.f16linear(a["x"], a["w"], a["bias"])


def _rms_norm():
    g = _g()
    return {"x": torch.randn(3, 32, generator=g), "w": torch.randn(32, generator=g)}, \
        lambda a: kernels.rms_norm(a["x"], a["w"], 1e-5)


def _rope_pairs():
    g = _g()
    args = {"x": torch.randn(2, 3, 16, generator=g), "rope": torch.randn(2, 4, 2, generator=g)}
    return args, lambda a: kernels.rope_pairs_(a["x"], a["rope"])


def _rope_halves():
    g = _g()
    args = {"x": torch.randn(2, 3, 16, generator=g), "cos": torch.randn(10, 8, generator=g),
            "sin": torch.randn(10, 8, generator=g), "pos": torch.tensor([3, 7]), "block": torch.tensor([0, 2])}
    return args, lambda a: kernels.rope_halves_(a["x"], a["cos"], a["sin"], a["pos"], a["block"])


def _attend():
    g = _g()
    kv = torch.randn(2, 2, 2, 9, 16, generator=g)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, :3] = True
    args = {"q": torch.randn(2, 4, 16, generator=g), "k": kv[0], "v": kv[1], "mask": mask}
    return args, lambda a: kernels.attend(a["q"], a["k"], a["v"], a["mask"], 4.0)


def _gelu():
    return {"x": torch.randn(3, 20, generator=_g())}, lambda a: kernels.gelu(a["x"])


def _swiglu():
    return {"x": torch.randn(3, 20, generator=_g())}, lambda a: kernels.swiglu(a["x"])


_model = {}


def _decode_step():
    if "m" not in _model:
        _model["m"] = random_model("chatglm3").quantize(4).model
    m = _model["m"]
    from chatglm import fastpath
    layer = fastpath.fused_layer(fastpath.blocks(m)[0])
    cache = KVCache.for_model(m, 2, 4)
    g = _g()
    args = {"x": torch.randn(2, 1, m.config.hidden_size, generator=g), "rope": torch.randn(2, 4, 2, generator=g),
            "mask": torch.tensor([[True, False], [False, False]])}

    def run(a):
        cache.length = 1
        step = kernels.DecodeStep(a["x"], layer, cache, a["mask"], rope=a["rope"])
        return step(layer, 0, a["x"])
    return args, run


BINDINGS = {"qlinear4": _qlinear(4), "qlinear8": _qlinear(8), "f16linear": _f16linear, "rms_norm": _rms_norm,
            "rope_pairs_": _rope_pairs, "rope_halves_": _rope_halves, "attend": _attend, "gelu": _gelu,
            "swiglu": _swiglu, "DecodeStep": _decode_step}
ARGS = {"qlinear4": ["x", "q", "scale", "bias"], "qlinear8": ["x", "q", "scale", "bias"],
        "f16linear": ["x", "w", "bias"], "rms_norm": ["x", "w"], "rope_pairs_": ["x", "rope"],
        "rope_halves_": ["x", "cos", "sin", "pos", "block"], "attend": ["q", "k", "v", "mask"], "gelu": ["x"],
        "swiglu": ["x"], "DecodeStep": ["x", "rope", "mask"]}


def transposed(t):
    """The same values, laid out column-major (not contiguous)."""
    if t.dim() < 2:
        return t
    return t.transpose(0, -1).contiguous().transpose(0, -1)


def strided(t):
    """The same values as a view of every other element of a larger buffer."""
    buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    buf[..., ::2] = t
    return buf[..., ::2]


def other_dtype(t):
    if t.dtype == torch.bool:
        return t.to(torch.uint8)
    return t.to(torch.float64) if t.is_floating_point() else t.to(torch.int32)


def meta(t):
    return t.to("meta")


MUTATIONS = {"transposed": transposed, "strided": strided, "other_dtype": other_dtype, "meta": meta}


def _run(fn, args):
    out = fn({k: v.clone() for k, v in args.items()})
    return out.clone()


@pytest.mark.parametrize("mutation", MUTATIONS)
@pytest.mark.parametrize("binding,arg", [(b, a) for b in BINDINGS for a in ARGS[b]])
def test_binding_takes_any_layout_or_refuses(binding, arg, mutation):
    args, fn = BINDINGS[binding]()
    want = _run(fn, args)
    bad = dict(args)
    bad[arg] = MUTATIONS[mutation](args[arg].clone())
    try:
        got = fn(bad)
    except ValueError as e:
        assert binding.rstrip("48") in str(e) or "DecodeStep" in str(e) or arg in str(e)
        return
    assert got.shape == want.shape  # (an output follows its input's dtype: x in fp64 gives fp64)
    assert torch.allclose(got.to(want.dtype), want, rtol=1e-6, atol=1e-6), (got - want).abs().max()


@pytest.mark.parametrize("what", ["x rows", "weight width", "scale groups", "bias length"])
def test_qlinear_rejects_shapes_that_do_not_fit(what):
    g = _g()
    q, s = quantize_weight(torch.randn(24, 64, generator=g), 8)
    x, b = torch.randn(3, 64, generator=g), torch.randn(24, generator=g)
    if what == "x rows":
        x = torch.randn(3, 32)
    elif what == "weight width":
        q = q[:, :32]
    elif what == "scale groups":
        s = torch.ones(24, 3)
    else:
        b = torch.randn(23)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.qlinear(x, q, s, b, 8)


def test_noncontiguous_weight_copy_outlives_the_call():
    """A 64 MB fp16 weight seen transposed: its contiguous copy must live until C has read it (it was freed
    before the call, and the call then read freed memory)."""
    w = torch.randn(4096, 8192, dtype=torch.float16).T  # [8192, 4096] view, not contiguous
    x = torch.randn(1, 4096)
    got = kernels.f16linear(x, w)
    assert torch.allclose(got, x @ w.float().T, rtol=1e-3, atol=1e-2)


def test_struct_sizes_match_the_library():
    lib = kernels.library()
    assert lib.cg_sizeof_layer() == kernels.ctypes.sizeof(kernels._Layer)
    assert lib.cg_sizeof_step() == kernels.ctypes.sizeof(kernels._Step)
    assert lib.cg_sizeof_qweight() == kernels.ctypes.sizeof(kernels._QWeight)


def test_a_refused_call_raises(monkeypatch):
    """Every return code is read: cg_attend refuses 6 heads over 4 KV groups."""
    with pytest.raises(ValueError, match="attend"):
        kernels.attend(torch.randn(1, 6, 16), torch.randn(1, 4, 3, 16), torch.randn(1, 4, 3, 16), None,
                       math.sqrt(16))
