# CPU kernels, each beside its plain-PyTorch reference:
#   qlinear.c: quantized and half-stored linear layers (AVX2/FMA/F16C with a portable fallback, OpenMP);
#   ops.c: the small fp32 ops of a decode step (RMSNorm, RoPE, single-query attention, GELU, SwiGLU), each one
#          call in place of several PyTorch ops;
#   layer.c: a whole decoder layer of a decode step in one call, composed from the two above.
# Compiled on first use (or by `python -m chatglm.kernels`) and loaded with ctypes; without a compiler, the
# PyTorch reference. GPU: quantized layers dequantize to the activation dtype, then call the vendor matmul.
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from ..quantize import dequantize, reference_linear

SOURCES = [Path(__file__).with_name(n) for n in ("qlinear.c", "ops.c", "layer.c")]
MAX_GEMV_ROWS = 8  # the C kernel's batch limit

_lib = None
_tried = False
_blas_seconds = 0.0  # half_linear's PyTorch branch, counted into linear_seconds() with the C products


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
    """The compiled kernel library, or None (with a one-line warning) when it cannot be built."""
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
    P, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.cg_qlinear.argtypes = [P, I64, I64, P, P, I, I64, I, I64, P, P, I]
    lib.cg_f16linear.argtypes = [P, I64, I64, P, I64, P, P, I]
    lib.cg_read_memory.argtypes = [P, I64, I]
    lib.cg_read_memory.restype = I64
    lib.cg_set_num_threads.argtypes = [I]
    F32 = ctypes.c_float
    lib.cg_rms_norm.argtypes = [P, P, F32, P, I64, I64]
    lib.cg_rope_pairs.argtypes = [P, I64, I64, I64, I64, P, I64, I64]
    lib.cg_rope_halves.argtypes = [P, I64, I64, I64, I64, I64, P, P, I64, P, P]
    lib.cg_rope_halves.restype = I
    lib.cg_attend.argtypes = [P, I64, I64, P, P, I64, I64, I64, P, P, I64, I64, I64, I64, I64, F32, F32, F32, P, I]
    lib.cg_gelu.argtypes = [P, P, I64, I]
    lib.cg_swiglu.argtypes = [P, P, I64, I64, I]
    lib.cg_layer_scratch.argtypes = [P, I64, I64]
    lib.cg_layer_scratch.restype = I64
    lib.cg_decode_layer.argtypes = [P, P, I64, P]
    lib.cg_linear_seconds.argtypes = [I]
    lib.cg_linear_seconds.restype = ctypes.c_double
    lib.cg_set_num_threads(torch.get_num_threads())
    _lib = lib
    return lib


def has_avx2() -> bool:
    lib = library()
    return bool(lib and lib.cg_has_avx2())


def _ptr(t):
    return None if t is None else t.data_ptr()


def _cpu_inputs(x, bias):
    """x as fp32 rows [N, K] and bias as fp32, converting only what needs it (this runs ~100 times a token)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.float().contiguous()
    return x2, bias


def _out(y, x):
    y = y.view(*x.shape[:-1], y.shape[-1])
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def quantized_linear(x, q, scale, bias, bits: int, group_size: int | None = None, impl: str = "auto"):
    """y = x @ dequantize(q, scale).T + bias. impl: auto, avx2-or-best ("kernel"), "portable", "torch"."""
    if x.device.type != "cpu":
        w = dequantize(q, scale, bits, group_size, dtype=x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    lib = library() if impl != "torch" else None
    if lib is None:
        return reference_linear(x, q, scale, bias, bits, group_size)
    x2, b = _cpu_inputs(x, bias)
    N, K = x2.shape
    R = q.shape[0]
    s = scale
    if s.dtype not in (torch.float16, torch.float32) or not s.is_contiguous():
        s = s.float().contiguous()
    f16 = int(s.dtype == torch.float16)
    G = group_size or 0
    y = torch.empty(N, R)
    # Prefill too goes through the small-batch kernel, 8 rows per call (taken in passes of four): each pass
    # reuses the unpacked weights across its rows in registers, which beats dequantizing for BLAS at any
    # prompt length on a CPU.
    for n0 in range(0, N, MAX_GEMV_ROWS):
        n = min(MAX_GEMV_ROWS, N - n0)
        rc = lib.cg_qlinear(x2.data_ptr() + 4 * n0 * K, n, K, q.data_ptr(), s.data_ptr(), f16, R, bits, G,
                            _ptr(b), y.data_ptr() + 4 * n0 * R, 1 if impl == "portable" else 0)
        if rc:
            raise ValueError(f"quantized linear: unsupported shape x {tuple(x2.shape)} weight {tuple(q.shape)} "
                             f"bits={bits} group_size={group_size}")
    return _out(y, x)


def half_linear(x, w, bias=None, impl: str = "auto"):
    """y = x @ w.T for an fp16-stored weight with fp32 (or the input's) compute."""
    if x.device.type != "cpu" or w.dtype != torch.float16:
        return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
    lib = library() if impl != "torch" else None
    x2, b = _cpu_inputs(x, bias)
    N, K = x2.shape
    R = w.shape[0]
    if lib is None or N > MAX_GEMV_ROWS:
        global _blas_seconds
        t0 = time.perf_counter()
        y = torch.empty(N, R, dtype=torch.float32)
        for r0 in range(0, R, 4096):  # fp32 copies of 4096 rows at a time
            r1 = min(R, r0 + 4096)
            y[:, r0:r1] = x2 @ w[r0:r1].float().T
        if b is not None:
            y += b
        _blas_seconds += time.perf_counter() - t0
    else:
        y = torch.empty(N, R, dtype=torch.float32)
        lib.cg_f16linear(_ptr(x2), N, K, _ptr(w.contiguous()), R, _ptr(b), _ptr(y), 1 if impl == "portable" else 0)
    return _out(y, x)


# ---------------------------------------------------------------- fused decode ops (ops.c)

def rms_norm(x, weight, eps: float):
    """weight * (x * rsqrt(mean(x^2) + eps)) over the last dim."""
    x = x.contiguous()
    w = weight.float().contiguous()
    C = x.shape[-1]
    if w.numel() != C:
        raise ValueError(f"rms_norm: weight of {w.numel()} values for rows of {C}")
    y = torch.empty_like(x)
    library().cg_rms_norm(_ptr(x), _ptr(w), eps, _ptr(y), x.numel() // C, C)
    return y


def _heads(x):
    if x.dim() != 3 or x.stride(-1) != 1 or x.dtype != torch.float32:
        raise ValueError("expected an fp32 [B, heads, D] view with a contiguous last dim")
    return x.shape[0], x.shape[1], x.stride(0), x.stride(1)


def rope_pairs_(x, rope):
    """In place: rotate pairs (2i, 2i+1), i < R, of x [B, heads, D] by rope [B, R, 2] = (cos, sin)."""
    B, NH, xb, xh = _heads(x)
    rope = rope.float().contiguous()
    if rope.shape[0] != B or rope.shape[-1] != 2 or 2 * rope.shape[1] > x.shape[2]:
        raise ValueError(f"rope_pairs_: table {tuple(rope.shape)} does not fit x {tuple(x.shape)}")
    library().cg_rope_pairs(_ptr(x), B, NH, xb, xh, _ptr(rope), rope.stride(0), rope.shape[1])
    return x


def rope_halves_(x, cos, sin, pos, block):
    """In place: ChatGLM-6B's 2D RoPE on x [B, heads, D]; cos, sin [n, D/2] tables; pos, block [B] rows."""
    B, NH, xb, xh = _heads(x)
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    pos, block = pos.to(torch.int64).contiguous(), block.to(torch.int64).contiguous()
    D, n = x.shape[2], cos.shape[0]
    if D % 4 or cos.shape != (n, D // 2) or sin.shape != cos.shape or pos.shape != (B,) or block.shape != (B,) or \
            library().cg_rope_halves(_ptr(x), B, NH, xb, xh, D, _ptr(cos), _ptr(sin), n, _ptr(pos), _ptr(block)):
        raise ValueError(f"rope_halves_: tables {tuple(cos.shape)} and positions do not fit x {tuple(x.shape)}")
    return x


def attend(q, k, v, mask, q_div: float, score_scale: float = 1.0, masked: float = float("-inf"),
           impl: str = "auto"):
    """One query per row: q [B, H, D]; k, v [B, G, S, D] (views into a cache: same strides, contiguous last dim);
    mask bool [B, S], True = masked, or None. Head h reads KV group h // (H / G). Scores are
    score_scale * (q / q_div) . k, with `masked` in place of a masked product. Returns [B, H, D]."""
    B, H, qb, qh = _heads(q)
    if k.dim() != 4 or k.shape[0] != B:
        raise ValueError(f"attend: k {tuple(k.shape)} is not [B={B}, G, S, D]")
    G, S, D = k.shape[1], k.shape[2], k.shape[3]
    if k.stride() != v.stride() or k.stride(-1) != 1 or k.shape != v.shape or q.shape[2] != D:
        raise ValueError("attend: k and v must be [B, G, S, D] views with the same strides")
    m = None if mask is None else mask.reshape(B, S).to(torch.uint8).contiguous()
    y = torch.empty(B, H, D)
    scratch = torch.empty(B * H * (S + D))
    rc = library().cg_attend(_ptr(q), qb, qh, _ptr(k), _ptr(v), k.stride(0), k.stride(1), k.stride(2), _ptr(m),
                             _ptr(y), B, H, G, S, D, q_div, score_scale, masked, _ptr(scratch),
                             1 if impl == "portable" else 0)
    if rc:
        raise ValueError(f"attend: unsupported shapes q {tuple(q.shape)} k {tuple(k.shape)}")
    return y


def gelu(x, impl: str = "auto"):
    """ChatGLM-6B's tanh GELU (models/glm.py's gelu)."""
    x = x.contiguous()
    y = torch.empty_like(x)
    library().cg_gelu(_ptr(x), _ptr(y), x.numel(), 1 if impl == "portable" else 0)
    return y


def swiglu(x, impl: str = "auto"):
    """silu(gate) * up for x = [..., gate | up] (ChatGLM2/3's MLP)."""
    x = x.contiguous()
    F2 = x.shape[-1]
    if F2 % 2:
        raise ValueError(f"swiglu: an odd last dim ({F2}) has no gate and up halves")
    y = x.new_empty(*x.shape[:-1], F2 // 2)
    library().cg_swiglu(_ptr(x), _ptr(y), x.numel() // F2, F2 // 2, 1 if impl == "portable" else 0)
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
            if m.weight.device.type != "cpu" or s.dtype not in (torch.float16, torch.float32) or \
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
        self.cols = cols.to(torch.int64).contiguous()
        self.mask = None if mask is None else mask.reshape(B, S).to(torch.uint8).contiguous()
        keep = [self.cols, self.mask]
        st = _Step(batch=B, k=k.data_ptr(), v=v.data_ptr(), kl=k.stride(0), kb=k.stride(1), kg=k.stride(2),
                   ks=k.stride(3), cols=self.cols.data_ptr(), S=S, mask=_ptr(self.mask),
                   impl=1 if impl == "portable" else 0)
        D = layer.struct.head_dim
        if rope is not None:
            rope = rope.float().contiguous()
            if rope.shape[0] != B or rope.shape[-1] != 2 or 2 * rope.shape[1] > D:
                raise ValueError(f"DecodeStep: rope {tuple(rope.shape)} does not fit heads of {D}")
            st.rope, st.rope_stride, st.rope_pairs = rope.data_ptr(), rope.stride(0), rope.shape[1]
            keep.append(rope)
        else:
            cos, sin = cos.float().contiguous(), sin.float().contiguous()
            pos, block = pos.to(torch.int64).contiguous(), block.to(torch.int64).contiguous()
            if D % 4 or cos.shape[1:] != (D // 2,) or sin.shape != cos.shape or pos.shape != (B,) or \
                    block.shape != (B,) or int(torch.maximum(pos, block).max()) >= cos.shape[0]:
                raise ValueError(f"DecodeStep: rotary tables {tuple(cos.shape)} do not fit the positions")
            st.cos_t, st.sin_t, st.rope_rows, st.pos, st.block = (cos.data_ptr(), sin.data_ptr(), cos.shape[0],
                                                                  pos.data_ptr(), block.data_ptr())
            keep += [cos, sin, pos, block]
        self.scratch = torch.empty(library().cg_layer_scratch(ctypes.byref(layer.struct), B, S))
        st.scratch = self.scratch.data_ptr()
        self.struct, self._keep, self.cache, self.dims, self.layers = st, keep, cache, layer.dims, k.shape[0]

    def __call__(self, layer: FusedLayer, index: int, x):
        """x [B, 1, hidden] fp32, contiguous, updated in place by layer `index`."""
        if not _cpu_f32(x) or x.shape[0] != self.struct.batch or x.numel() != x.shape[0] * layer.struct.hidden or \
                layer.dims != self.dims or not 0 <= index < self.layers:
            raise ValueError(f"DecodeStep: x {tuple(x.shape)}, layer {index} do not fit the step")
        if library().cg_decode_layer(ctypes.byref(layer.struct), ctypes.byref(self.struct), index, x.data_ptr()):
            raise ValueError("cg_decode_layer refused its arguments")
        return x

    def run(self, layers, x):
        """All the layers of the step over x (in place), then the cache's advance()."""
        for i, layer in enumerate(layers):
            self(layer, i, x)
        self.cache.advance()
        return x


def linear_seconds(reset: bool = False) -> float:
    """Seconds quantized_linear and half_linear have spent in their products (C kernels, and half_linear's
    PyTorch branch) since the last reset; chatglm bench's linear/rest split."""
    global _blas_seconds
    lib = library()
    t = _blas_seconds + (lib.cg_linear_seconds(int(reset)) if lib is not None else 0.0)
    if reset:
        _blas_seconds = 0.0
    return t


def read_bandwidth_gbs(size_mb: int = 1024, reps: int = 6, tensors=None) -> float:
    """Memory read bandwidth with all threads, best of `reps` passes over `tensors` (CPU tensors far larger than
    the caches together, such as a model's weights) or else over a new buffer of size_mb."""
    from ..checkpoint import hugepage_empty
    lib = library()
    if tensors is None:
        tensors = [hugepage_empty((size_mb * (1 << 20) // 8,), torch.int64).fill_(1)]  # huge pages, as the weights
    # whole 8 KB blocks of each tensor (the AVX2 read loop's unit)
    spans = [(t, t.numel() * t.element_size() // 8192 * 8192) for t in tensors]
    nbytes = sum(n for _, n in spans)
    best = float("inf")
    for _ in range(reps + 1):  # the first pass warms up (page faults)
        t0 = time.perf_counter()
        for t, n in spans:
            if lib is not None:
                lib.cg_read_memory(t.data_ptr(), n, 1)
            else:
                t.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


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
