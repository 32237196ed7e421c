# CPU kernels as thin bindings over tensors (nothing from the rest of the package is imported here):
#   qlinear.c: quantized and half-stored linear products (AVX2/FMA/F16C with a portable fallback, OpenMP);
#   ops.c: the small fp32 ops of a decode step (RMSNorm, RoPE, single-query attention, GELU, SwiGLU), each one
#          call in place of several PyTorch ops;
#   layer.c: a whole decoder layer of a decode step in one call, composed from the two above.
# Compiled on first use (or by `python -m chatglm.kernels`) and loaded with ctypes. Every tensor reaches C through
# _c() (CPU, dtype, contiguous -- or a copy the caller holds through the call) or, for in-place views, through
# a check of the strides C is told. Which products run here, and their PyTorch twins, is quantize.py's choice;
# which decode steps run here is fastpath.py's.
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path

import torch

SOURCES = [Path(__file__).with_name(n) for n in ("qlinear.c", "ops.c", "layer.c")]
MAX_GEMV_ROWS = 8  # the C products' batch limit

_lib = None
_tried = False


def cache_dir() -> Path:
    return Path(os.environ.get("CHATGLM_KERNEL_DIR") or Path.home() / ".cache" / "chatglm" / "kernels")


def library_path() -> Path:
    tag = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:12]
    plat = sysconfig.get_platform().replace("-", "_")
    return cache_dir() / f"qlinear-{tag}-{plat}.so"


def build(verbose: bool = False) -> Path:
    """Compile the C sources into one library in the cache (atomically). RuntimeError when no compiler works."""
    out = library_path()
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler found (install gcc)")
    base = [cc, "-O3", "-fPIC", "-shared", "-std=c99", *map(str, SOURCES), "-lm"]
    errors = []
    for flags in (["-fopenmp"], []):  # OpenMP if the compiler has it, else a single-threaded build
        with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".so", delete=False) as tmp:
            pass
        cmd = base + flags + ["-o", tmp.name]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode == 0:
            os.replace(tmp.name, out)
            if verbose:
                print(" ".join(cmd))
            return out
        os.unlink(tmp.name)
        errors.append(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}")
    raise RuntimeError(f"{cc} failed: {errors[0]}")


def library():
    """The compiled kernel library, or None (with a one-line warning) when it cannot be built or its structs do
    not match the ctypes mirrors below."""
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("CHATGLM_NO_KERNEL"):
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError) as e:
        warnings.warn(f"chatglm: CPU kernel unavailable ({e}); using the slower PyTorch path", stacklevel=2)
        return None
    P, I64, I, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    signatures = {  # name: (restype, argtypes)
        "cg_qlinear": (I, [P, I64, I64, P, P, I, I64, I, I64, P, P, I]),
        "cg_f16linear": (I, [P, I64, I64, P, I64, P, P, I]),
        "cg_read_memory": (I64, [P, I64, I]),
        "cg_set_num_threads": (None, [I]),
        "cg_num_threads": (I, []),
        "cg_has_avx2": (I, []),
        "cg_rms_norm": (None, [P, P, F32, P, I64, I64]),
        "cg_rope_pairs": (None, [P, I64, I64, I64, I64, P, I64, I64]),
        "cg_rope_halves": (I, [P, I64, I64, I64, I64, I64, P, P, I64, P, P]),
        "cg_attend": (I, [P, I64, I64, P, P, I64, I64, I64, P, P, I64, I64, I64, I64, I64, F32, F32, F32, P, I]),
        "cg_gelu": (None, [P, P, I64, I]),
        "cg_swiglu": (None, [P, P, I64, I64, I]),
        "cg_layer_scratch": (I64, [P, I64, I64]),
        "cg_decode_layer": (I, [P, P, I64, P]),
        "cg_linear_seconds": (ctypes.c_double, [I]),
        "cg_sizeof_qweight": (I64, []), "cg_sizeof_layer": (I64, []), "cg_sizeof_step": (I64, []),
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    sizes = {"cg_qweight": (_QWeight, lib.cg_sizeof_qweight()), "cg_layer": (_Layer, lib.cg_sizeof_layer()),
             "cg_step": (_Step, lib.cg_sizeof_step())}
    wrong = [f"{n} is {c} bytes, its ctypes mirror {ctypes.sizeof(py)}" for n, (py, c) in sizes.items()
             if ctypes.sizeof(py) != c]
    if wrong:
        warnings.warn(f"chatglm: CPU kernel unusable ({'; '.join(wrong)}); using the slower PyTorch path",
                      stacklevel=2)
        return None
    lib.cg_set_num_threads(torch.get_num_threads())
    _lib = lib
    return lib


def use_threads(n: int | None = None):
    """OpenMP's thread count is per calling thread: a thread that runs the kernels (the server's engine) sets
    its own, torch's count unless given."""
    lib = library()
    if lib is not None:
        lib.cg_set_num_threads(n or torch.get_num_threads())


def _impl(impl: str) -> int:
    if impl not in ("auto", "portable"):
        raise ValueError(f"impl must be 'auto' or 'portable', got {impl!r}")
    return int(impl == "portable")


def _c(t, dtype, what: str, convert: bool = False):
    """t as a contiguous CPU tensor of `dtype` for a C call: a copy where t is a strided view (or, with convert,
    of another dtype), which the caller binds to a name until the call returns so that the copy outlives it.
    A tensor elsewhere than in CPU memory (a GPU, meta), or of another dtype without convert, is a ValueError."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what}: expected a tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{what}: a tensor on {t.device}; the C kernels read CPU memory")
    if t.dtype != dtype:
        if not (convert and t.is_floating_point()):
            raise ValueError(f"{what}: {t.dtype}, expected {dtype}")
        t = t.to(dtype)
    return t.contiguous()


def _opt(t, dtype, what: str, convert: bool = False):
    return None if t is None else _c(t, dtype, what, convert)


def _ptr(t):
    return None if t is None else t.data_ptr()


def _check(rc, what: str):
    if rc:
        raise ValueError(f"{what}: the C kernel refused its arguments")


# ---------------------------------------------------------------- linear products (qlinear.c)

def qlinear(x, q, scale, bias, bits: int, group_size: int | None = None, impl: str = "auto"):
    """y = x @ dequantize(q, scale).T + bias in C. x [..., K] (any float dtype; computed in fp32, returned in x's
    dtype); q int8 [R, K] or packed int4 [R, K/2]; scale fp16/fp32 [R] or [R, K/group_size]."""
    lib = library()
    K = x.shape[-1]
    x2 = _c(x.reshape(-1, K), torch.float32, "qlinear x", convert=True)
    q = _c(q, torch.int8, "qlinear weight")
    s = _c(scale, scale.dtype if scale.dtype in (torch.float16, torch.float32) else torch.float32, "qlinear scale",
           convert=True)
    b = _opt(bias, torch.float32, "qlinear bias", convert=True)
    R = q.shape[0]
    cols = K // 2 if bits == 4 else K
    scales = (R,) if group_size is None else (R, K // group_size)
    if q.dim() != 2 or q.shape[1] != cols or tuple(s.shape) != scales or (b is not None and b.shape != (R,)):
        raise ValueError(f"qlinear: x {tuple(x.shape)}, weight {tuple(q.shape)}, scale {tuple(s.shape)} and "
                         f"bits={bits} group_size={group_size} do not fit together")
    N = x2.shape[0]
    y = torch.empty(N, R)
    # Prefill too goes through the small-batch kernel, MAX_GEMV_ROWS rows a call: each pass reuses the unpacked
    # weights across its rows in registers, which beats dequantizing for BLAS at any prompt length on a CPU.
    for n0 in range(0, N, MAX_GEMV_ROWS):
        xs, ys = x2[n0:n0 + MAX_GEMV_ROWS], y[n0:n0 + MAX_GEMV_ROWS]
        _check(lib.cg_qlinear(xs.data_ptr(), xs.shape[0], K, q.data_ptr(), s.data_ptr(),
                              int(s.dtype == torch.float16), R, bits, group_size or 0, _ptr(b), ys.data_ptr(),
                              _impl(impl)), f"qlinear (x {tuple(x.shape)}, bits={bits}, group_size={group_size})")
    return _out(y, x)


def f16linear(x, w, bias=None, impl: str = "auto"):
    """y = x @ w.T + bias in C for an fp16 w [R, K] and at most MAX_GEMV_ROWS rows of x [..., K]."""
    lib = library()
    K = x.shape[-1]
    x2 = _c(x.reshape(-1, K), torch.float32, "f16linear x", convert=True)
    w = _c(w, torch.float16, "f16linear weight")
    b = _opt(bias, torch.float32, "f16linear bias", convert=True)
    N, R = x2.shape[0], w.shape[0]
    if w.dim() != 2 or w.shape[1] != K or N > MAX_GEMV_ROWS or (b is not None and b.shape != (R,)):
        raise ValueError(f"f16linear: x {tuple(x.shape)} and weight {tuple(w.shape)} do not fit (at most "
                         f"{MAX_GEMV_ROWS} rows)")
    y = torch.empty(N, R)
    _check(lib.cg_f16linear(x2.data_ptr(), N, K, w.data_ptr(), R, _ptr(b), y.data_ptr(), _impl(impl)),
           f"f16linear (x {tuple(x.shape)}, weight {tuple(w.shape)})")
    return _out(y, x)


def _out(y, x):
    y = y.view(*x.shape[:-1], y.shape[-1])
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def linear_seconds(reset: bool = False) -> float:
    """Seconds the C products have spent since the last reset (they time themselves: bench's linear/rest split)."""
    lib = library()
    return lib.cg_linear_seconds(int(reset)) if lib is not None else 0.0


def read_memory(t, reps: int = 1):
    """Reads t's memory `reps` times with all threads (whole 8 KB blocks: the AVX2 loop's unit); returns the
    bytes read."""
    t = _c(t, t.dtype, "read_memory")
    n = t.numel() * t.element_size() // 8192 * 8192
    library().cg_read_memory(t.data_ptr(), n, reps)
    return n * reps


# ---------------------------------------------------------------- fused decode ops (ops.c)

def rms_norm(x, weight, eps: float):
    """weight * (x * rsqrt(mean(x^2) + eps)) over the last dim of an fp32 x."""
    x = _c(x, torch.float32, "rms_norm x")
    w = _c(weight, torch.float32, "rms_norm weight", convert=True)
    C = x.shape[-1]
    if w.numel() != C:
        raise ValueError(f"rms_norm: weight of {w.numel()} values for rows of {C}")
    y = torch.empty_like(x)
    library().cg_rms_norm(x.data_ptr(), w.data_ptr(), eps, y.data_ptr(), x.numel() // C, C)
    return y


def _heads(x, what: str):
    """x is updated in place through its strides: an fp32 CPU [B, heads, D] view with a contiguous last dim."""
    if not isinstance(x, torch.Tensor) or x.device.type != "cpu" or x.dim() != 3 or x.stride(-1) != 1 or \
            x.dtype != torch.float32:
        raise ValueError(f"{what}: expected an fp32 CPU [B, heads, D] view with a contiguous last dim")
    return x.shape[0], x.shape[1], x.stride(0), x.stride(1)


def rope_pairs_(x, rope):
    """In place: rotate pairs (2i, 2i+1), i < R, of x [B, heads, D] by rope [B, R, 2] = (cos, sin)."""
    B, NH, xb, xh = _heads(x, "rope_pairs_")
    rope = _c(rope, torch.float32, "rope_pairs_ table", convert=True)
    if rope.dim() != 3 or rope.shape[0] != B or rope.shape[-1] != 2 or 2 * rope.shape[1] > x.shape[2]:
        raise ValueError(f"rope_pairs_: table {tuple(rope.shape)} does not fit x {tuple(x.shape)}")
    library().cg_rope_pairs(x.data_ptr(), B, NH, xb, xh, rope.data_ptr(), rope.stride(0), rope.shape[1])
    return x


def rope_halves_(x, cos, sin, pos, block):
    """In place: ChatGLM-6B's 2D RoPE on x [B, heads, D]; cos, sin [n, D/2] tables; pos, block [B] rows."""
    B, NH, xb, xh = _heads(x, "rope_halves_")
    cos = _c(cos, torch.float32, "rope_halves_ cos", convert=True)
    sin = _c(sin, torch.float32, "rope_halves_ sin", convert=True)
    pos, block = _c(pos, torch.int64, "rope_halves_ pos"), _c(block, torch.int64, "rope_halves_ block")
    D, n = x.shape[2], cos.shape[0]
    if D % 4 or cos.shape != (n, D // 2) or sin.shape != cos.shape or pos.shape != (B,) or block.shape != (B,) or \
            library().cg_rope_halves(x.data_ptr(), B, NH, xb, xh, D, cos.data_ptr(), sin.data_ptr(), n,
                                     pos.data_ptr(), block.data_ptr()):
        raise ValueError(f"rope_halves_: tables {tuple(cos.shape)} and positions do not fit x {tuple(x.shape)}")
    return x


def attend(q, k, v, mask, q_div: float, score_scale: float = 1.0, masked: float = float("-inf"),
           impl: str = "auto"):
    """One query per row: q [B, H, D]; k, v [B, G, S, D] (views into a cache: same strides, contiguous last dim);
    mask bool [B, S], True = masked, or None. Head h reads KV group h // (H / G). Scores are
    score_scale * (q / q_div) . k, with `masked` in place of a masked product. Returns [B, H, D]."""
    B, H, qb, qh = _heads(q, "attend q")
    if not all(isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 4
               for t in (k, v)) or k.shape[0] != B:
        raise ValueError(f"attend: k, v are not fp32 CPU [B={B}, G, S, D]")
    G, S, D = k.shape[1], k.shape[2], k.shape[3]
    if k.stride() != v.stride() or k.stride(-1) != 1 or k.shape != v.shape or q.shape[2] != D:
        raise ValueError("attend: k and v must be [B, G, S, D] views with the same strides")
    m = None if mask is None else _c(mask.reshape(B, S), torch.bool, "attend mask")
    y = torch.empty(B, H, D)
    scratch = torch.empty(B * H * (S + D))
    _check(library().cg_attend(q.data_ptr(), qb, qh, k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1),
                               k.stride(2), _ptr(m), y.data_ptr(), B, H, G, S, D, q_div, score_scale, masked,
                               scratch.data_ptr(), _impl(impl)),
           f"attend (unsupported shapes q {tuple(q.shape)} k {tuple(k.shape)})")
    return y


def gelu(x, impl: str = "auto"):
    """ChatGLM-6B's tanh GELU (models/glm.py's gelu) of an fp32 x."""
    x = _c(x, torch.float32, "gelu x")
    y = torch.empty_like(x)
    library().cg_gelu(x.data_ptr(), y.data_ptr(), x.numel(), _impl(impl))
    return y


def swiglu(x, impl: str = "auto"):
    """silu(gate) * up for an fp32 x = [..., gate | up] (ChatGLM2/3's MLP)."""
    x = _c(x, torch.float32, "swiglu x")
    F2 = x.shape[-1]
    if F2 % 2:
        raise ValueError(f"swiglu: an odd last dim ({F2}) has no gate and up halves")
    y = x.new_empty(*x.shape[:-1], F2 // 2)
    library().cg_swiglu(x.data_ptr(), y.data_ptr(), x.numel() // F2, F2 // 2, _impl(impl))
    return y


# ---------------------------------------------------------------- one decoder layer per call (layer.c)

_P, _I32, _I64, _F32 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_float


class _QWeight(ctypes.Structure):
    _fields_ = [("w", _P), ("scale", _P), ("bias", _P), ("rows", _I64), ("cols", _I64), ("group", _I64),
                ("bits", _I32), ("scale_f16", _I32)]


class _Layer(ctypes.Structure):
    _fields_ = [("glm1", _I32), ("interleaved", _I32), ("hidden", _I64), ("heads", _I64), ("kv_heads", _I64),
                ("head_dim", _I64), ("ffn", _I64), ("eps", _F32), ("alpha", _F32), ("norm1_w", _P), ("norm1_b", _P),
                ("norm2_w", _P), ("norm2_b", _P), ("qkv", _QWeight), ("dense", _QWeight), ("up", _QWeight),
                ("down", _QWeight), ("q_div", _F32), ("score_scale", _F32), ("masked", _F32)]


class _Step(ctypes.Structure):
    _fields_ = [("batch", _I64), ("rope", _P), ("rope_stride", _I64), ("rope_pairs", _I64), ("cos_t", _P),
                ("sin_t", _P), ("rope_rows", _I64), ("pos", _P), ("block", _P), ("k", _P), ("v", _P), ("kl", _I64),
                ("kb", _I64), ("kg", _I64), ("ks", _I64), ("cols", _P), ("S", _I64), ("mask", _P),
                ("scratch", _P), ("impl", _I32)]


def _cpu_f32(t):
    return t is not None and t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()


class FusedLayer:
    """A decoder layer whose four linears are CPU-quantized, described for cg_decode_layer: the norms, products,
    RoPE, cache write, attention and residuals of a decode step in one C call (built by chatglm.fastpath)."""

    def __init__(self, struct, keep):
        self.struct, self._keep = struct, keep  # _keep: the tensors the struct points into
        self.dims = (struct.glm1, struct.hidden, struct.heads, struct.kv_heads, struct.head_dim, struct.ffn,
                     struct.qkv.rows, struct.up.rows)  # what sizes a step's scratch and cache

    @staticmethod
    def build(*, glm1: bool, interleaved: bool, heads: int, kv_heads: int, head_dim: int, eps: float,
              alpha: float, norm1, norm2, linears, q_div: float, score_scale: float, masked: float):
        """None where the layer cannot run as one call: tensors that are not fp32 CPU ones. norm1, norm2: (weight,
        bias or None); linears: quantized qkv, dense, up, down (weight, weight_scale, bias, bits, group_size,
        in_features, out_features)."""
        if library() is None:
            return None
        keep = [*norm1, *norm2]
        qws = []
        for m in linears:
            s = m.weight_scale
            if m.weight.device.type != "cpu" or m.weight.dtype != torch.int8 or s.device.type != "cpu" or \
                    s.dtype not in (torch.float16, torch.float32) or m.bits not in (4, 8) or \
                    not (m.weight.is_contiguous() and s.is_contiguous()) or \
                    (m.bias is not None and not _cpu_f32(m.bias)):
                return None
            keep += [m.weight, s, m.bias]
            qws.append(_QWeight(m.weight.data_ptr(), s.data_ptr(), _ptr(m.bias), m.out_features, m.in_features,
                                m.group_size or 0, m.bits, int(s.dtype == torch.float16)))
        if not all(t is None or _cpu_f32(t) for t in [*norm1, *norm2]) or (glm1 and None in (norm1[1], norm2[1])):
            return None
        qkv, dense, up, down = linears
        hidden = qkv.in_features
        ffn = up.out_features if glm1 else up.out_features // 2
        if qkv.out_features != (heads + 2 * kv_heads) * head_dim or dense.in_features != heads * head_dim or \
                dense.out_features != hidden or up.in_features != hidden or down.in_features != ffn or \
                down.out_features != hidden or (not glm1 and up.out_features % 2):
            return None
        struct = _Layer(int(glm1), int(interleaved), hidden, heads, kv_heads, head_dim, ffn, eps, alpha,
                        _ptr(norm1[0]), _ptr(norm1[1]), _ptr(norm2[0]), _ptr(norm2[1]), *qws, q_div, score_scale,
                        masked)
        return FusedLayer(struct, keep)


class DecodeStep:
    """What the fused layers of one decode step share: the rows, their RoPE, the cache and its mask. The cache
    (KVCache or the engine's SlotCache) gives the column each row writes at and the key length
    (decode_slots); ChatGLM2/3 pass rope [B, pairs, 2], ChatGLM-6B cos, sin tables and pos, block [B]."""

    def __init__(self, x, layer: FusedLayer, cache, mask, *, rope=None, cos=None, sin=None, pos=None, block=None,
                 impl: str = "auto"):
        B = x.shape[0]
        cols, S = cache.decode_slots()
        k, v = cache.k, cache.v
        if k.dtype != torch.float32 or k.device.type != "cpu" or k.shape != v.shape or k.stride() != v.stride() or \
                k.stride(-1) != 1 or k.shape[-1] != layer.struct.head_dim or k.shape[1] < B or \
                k.shape[2] != layer.struct.kv_heads or S > k.shape[3] or cols.shape != (B,) or \
                not bool(((cols >= 0) & (cols < S)).all()):
            raise ValueError(f"DecodeStep: cache {tuple(k.shape)} {k.dtype} does not fit the layer")
        self.cols = _c(cols, torch.int64, "DecodeStep columns")
        self.mask = None if mask is None else _c(mask.reshape(B, S), torch.bool, "DecodeStep mask")
        keep = [self.cols, self.mask]
        st = _Step(batch=B, k=k.data_ptr(), v=v.data_ptr(), kl=k.stride(0), kb=k.stride(1), kg=k.stride(2),
                   ks=k.stride(3), cols=self.cols.data_ptr(), S=S, mask=_ptr(self.mask),
                   impl=_impl(impl))
        D = layer.struct.head_dim
        if rope is not None:
            rope = _c(rope, torch.float32, "DecodeStep rope", convert=True)
            if rope.shape[0] != B or rope.shape[-1] != 2 or 2 * rope.shape[1] > D:
                raise ValueError(f"DecodeStep: rope {tuple(rope.shape)} does not fit heads of {D}")
            st.rope, st.rope_stride, st.rope_pairs = rope.data_ptr(), rope.stride(0), rope.shape[1]
            keep.append(rope)
        else:
            cos = _c(cos, torch.float32, "DecodeStep cos", convert=True)
            sin = _c(sin, torch.float32, "DecodeStep sin", convert=True)
            pos, block = _c(pos, torch.int64, "DecodeStep pos"), _c(block, torch.int64, "DecodeStep block")
            if D % 4 or cos.shape[1:] != (D // 2,) or sin.shape != cos.shape or pos.shape != (B,) or \
                    block.shape != (B,) or int(torch.maximum(pos, block).max()) >= cos.shape[0]:
                raise ValueError(f"DecodeStep: rotary tables {tuple(cos.shape)} do not fit the positions")
            st.cos_t, st.sin_t, st.rope_rows, st.pos, st.block = (cos.data_ptr(), sin.data_ptr(), cos.shape[0],
                                                                  pos.data_ptr(), block.data_ptr())
            keep += [cos, sin, pos, block]
        self.scratch = torch.empty(library().cg_layer_scratch(ctypes.byref(layer.struct), B, S))
        st.scratch = self.scratch.data_ptr()
        self.struct, self._keep, self.dims, self.layers = st, keep, layer.dims, k.shape[0]

    def __call__(self, layer: FusedLayer, index: int, x):
        """x [B, 1, hidden] fp32, contiguous, updated in place by layer `index`."""
        if not _cpu_f32(x) or x.shape[0] != self.struct.batch or x.numel() != x.shape[0] * layer.struct.hidden or \
                layer.dims != self.dims or not 0 <= index < self.layers:
            raise ValueError(f"DecodeStep: x {tuple(x.shape)}, layer {index} do not fit the step")
        _check(library().cg_decode_layer(ctypes.byref(layer.struct), ctypes.byref(self.struct), index, x.data_ptr()),
               "DecodeStep")
        return x

    def run(self, layers, x):
        """All the layers of the step over x (in place); the caller advances the cache."""
        for i, layer in enumerate(layers):
            self(layer, i, x)
        return x


def main():
    try:
        path = build(verbose=True)
    except RuntimeError as e:
        print(f"chatglm: CPU kernel not built: {e}; the PyTorch path will be used", file=sys.stderr)
        return 1
    lib = library()
    print(f"chatglm: CPU kernel at {path} ({'AVX2/FMA/F16C' if lib.cg_has_avx2() else 'portable'} path, "
          f"{lib.cg_num_threads()} threads)")
    return 0
