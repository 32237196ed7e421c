# Weight-only quantization as THUDM ships it: symmetric absmax scales per output row (or, optionally, per group
# of input columns), int8 [out, in] or int4 packed two per byte [out, in/2] with the even column in the high
# nibble. Pure quantize/dequantize functions, the QuantizedLinear and fp16-stored modules with their dispatch
# (C kernels on a CPU, dequantize + the vendor matmul on a GPU, the PyTorch twin where autograd needs a backward
# or no compiler is there), and the module swap.
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .kernels import triton_qlinear

# The Linear layers of every transformer block; embeddings, output layer, norms and biases stay as they are.
QUANTIZED_LAYERS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


def check_bits(bits: int, group_size: int | None = None):
    if bits not in (4, 8):
        raise ValueError(f"quantization_bit must be 4 or 8, got {bits!r}")
    if group_size is not None and (not isinstance(group_size, int) or group_size < 2 or group_size % 2):
        raise ValueError(f"group_size must be an even integer, got {group_size!r}")


def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None = None):
    """w [out, in] -> (q int8 [out, in] or packed [out, in/2], scale [out] or [out, in/group_size]).
    scale = absmax / (2^(bits-1) - 1); q = round(w / scale), rounding half to even."""
    check_bits(bits, group_size)
    out_f, in_f = w.shape
    if bits == 4 and in_f % 2:
        raise ValueError(f"int4 needs an even number of input columns, got {in_f}")
    if group_size is not None and in_f % group_size:
        raise ValueError(f"{in_f} input columns are not a multiple of group_size={group_size}")
    rows = max(1, (1 << 22) // in_f)  # row blocks of ~4M values: fp32 temporaries stay ~16 MB, not weight-sized
    parts = [_quantize_rows(w[r:r + rows], bits, group_size) for r in range(0, out_f, rows)]
    return torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts])


def _quantize_rows(w, bits, group_size):
    # In fp32 whatever the weight's dtype, so that quantizing while loading (fp16 shards) and quantizing a loaded
    # model give the same ints. (THUDM's GPU code divides in fp16; a value within fp16 rounding of a .5 tie can
    # round the other way there. Their pre-quantized checkpoints load as they are.)
    out_f, in_f = w.shape
    w = w.float()
    qmax = 2 ** (bits - 1) - 1
    g = w.view(out_f, 1, in_f) if group_size is None else w.view(out_f, in_f // group_size, group_size)
    scale = g.abs().amax(dim=-1) / qmax
    q = torch.round(g / torch.where(scale == 0, torch.ones_like(scale), scale)[..., None]).view(out_f, in_f)
    if group_size is None:
        scale = scale[:, 0]
    q = q.clamp(-qmax, qmax).to(torch.int8)
    return (pack_int4(q) if bits == 4 else q), scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], [out, in] -> [out, in/2]: byte j = (q[2j] << 4) | (q[2j+1] & 0xF)."""
    hi, lo = q[:, 0::2].to(torch.int16), q[:, 1::2].to(torch.int16)
    return ((hi << 4) | (lo & 0xF)).to(torch.uint8).view(torch.int8)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """[out, in/2] -> int8 [out, in]: signed nibbles, high nibble first."""
    hi = p >> 4               # arithmetic shift keeps the sign
    lo = (p << 4) >> 4
    return torch.stack([hi, lo], dim=-1).view(p.shape[0], p.shape[1] * 2)


def dequantize(q: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int | None = None,
               dtype=torch.float32) -> torch.Tensor:
    w = (unpack_int4(q) if bits == 4 else q).to(torch.float32)
    s = scale.float()
    if group_size is None:
        w = w * s[:, None]
    else:
        w = (w.view(w.shape[0], -1, group_size) * s[..., None]).view(w.shape)
    return w.to(dtype)


def reference_linear(x, q, scale, bias, bits, group_size=None):
    """The plain twin of every kernel: dequantize, then an fp32 matmul."""
    y = F.linear(x.float(), dequantize(q, scale, bits, group_size), None if bias is None else bias.float())
    return y.to(x.dtype)


def _needs_grad(*tensors) -> bool:
    """The C products have no backward: anything that needs a gradient takes the PyTorch code."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def quantized_linear(x, q, scale, bias, bits: int, group_size: int | None = None, impl: str = "auto"):
    """y = x @ dequantize(q, scale).T + bias. impl: "auto" (C on a CPU, the Triton kernel on CUDA, where they
    apply), "portable" (C without AVX2), "torch" (reference_linear), "dequantize" (a GPU's fallback: dequantize to
    the activation dtype, then the vendor matmul)."""
    if x.device.type != "cpu":
        if impl == "torch":
            return reference_linear(x, q, scale, bias, bits, group_size)
        if impl == "auto" and x.is_cuda and triton_qlinear.available() and not _needs_grad(x, bias) and \
                x.numel() // x.shape[-1] <= triton_qlinear.MAX_ROWS:
            return torch.ops.chatglm.qlinear(x, q, scale, bias, bits, group_size or 0)
        w = dequantize(q, scale, bits, group_size, dtype=x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    if impl == "torch" or kernels.library() is None or _needs_grad(x, bias):
        return reference_linear(x, q, scale, bias, bits, group_size)
    return kernels.qlinear(x, q, scale, bias, bits, group_size, impl=impl)


_torch_seconds = 0.0  # half_linear's PyTorch products on a CPU, counted into linear_seconds()


def half_linear(x, w, bias=None, impl: str = "auto"):
    """y = x @ w.T for an fp16-stored weight with fp32 (or the input's) compute."""
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or w.dtype != torch.float16 or _needs_grad(x, w, bias):
        return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
    if impl != "torch" and kernels.library() is not None and rows <= kernels.MAX_GEMV_ROWS:
        return kernels.f16linear(x, w, bias, impl=impl)
    global _torch_seconds
    t0 = time.perf_counter()
    x2 = x.reshape(rows, x.shape[-1]).float()
    y = torch.empty(rows, w.shape[0])
    for r0 in range(0, w.shape[0], 4096):  # fp32 copies of 4096 rows at a time, not of the whole weight
        y[:, r0:r0 + 4096] = x2 @ w[r0:r0 + 4096].float().T
    if bias is not None:
        y += bias.float()
    _torch_seconds += time.perf_counter() - t0
    y = y.view(*x.shape[:-1], w.shape[0])
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def linear_seconds(reset: bool = False) -> float:
    """Seconds the quantized and fp16-stored products have spent on a CPU (in C, and half_linear's PyTorch
    branch) since the last reset: chatglm bench's linear/rest split."""
    global _torch_seconds
    t = _torch_seconds + kernels.linear_seconds(reset)
    if reset:
        _torch_seconds = 0.0
    return t


class QuantizedLinear(nn.Module):
    """A Linear whose weight is int8 or packed int4 with scales. State dict names match THUDM's quantized
    checkpoints: weight (int8), weight_scale, bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int | None = None,
                 scale_dtype=torch.float16, device=None):
        super().__init__()
        check_bits(bits, group_size)
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        cols = in_features // 2 if bits == 4 else in_features
        scale_shape = (out_features,) if group_size is None else (out_features, in_features // group_size)
        self.weight = nn.Parameter(torch.empty(out_features, cols, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(scale_shape, dtype=scale_dtype, device=device),
                                         requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None = None, scale_dtype=torch.float16):
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, group_size, scale_dtype,
                device="meta")
        q, s = quantize_weight(linear.weight.detach(), bits, group_size)
        m.weight = nn.Parameter(q.to(linear.weight.device), requires_grad=False)
        m.weight_scale = nn.Parameter(s.to(scale_dtype).to(linear.weight.device), requires_grad=False)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return m

    def extra_repr(self):
        g = f", group_size={self.group_size}" if self.group_size else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{g}"

    def forward(self, x):
        return quantized_linear(x, self.weight, self.weight_scale, self.bias, self.bits, self.group_size)


def quantizable(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in QUANTIZED_LAYERS and ".layers." in name


def quantize_model(model: nn.Module, bits: int, group_size: int | None = None, scale_dtype=torch.float16):
    """Swap every block Linear for a QuantizedLinear, in place. Returns the number of layers swapped."""
    check_bits(bits, group_size)
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise ValueError("the model is already quantized")
    swapped = 0
    for name, module in list(model.named_modules()):
        if quantizable(name, module):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, QuantizedLinear.from_linear(module, bits, group_size,
                                                                                    scale_dtype))
            swapped += 1
    return swapped


def empty_quantized(model: nn.Module, bits: int, group_size: int | None = None, scale_dtype=torch.float16):
    """Swap every block Linear of a meta-device model for an empty QuantizedLinear (to load quantized weights)."""
    check_bits(bits, group_size)
    for name, module in list(model.named_modules()):
        if quantizable(name, module):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child,
                    QuantizedLinear(module.in_features, module.out_features, module.bias is not None, bits,
                                    group_size, scale_dtype, device="meta"))
    return model


class HalfLinear(nn.Module):
    """A Linear whose weight is stored in fp16 and computed in the input's dtype: half the memory traffic of fp32
    with the same result for fp16 checkpoints (their weights are fp16 already). Used on CPUs for the output layer
    of quantized models."""

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.float16, device=device),
                                   requires_grad=False)

    def forward(self, x):
        return half_linear(x, self.weight)


class HalfEmbedding(nn.Module):
    """An Embedding stored in fp16 (the models cast the rows to their compute dtype)."""

    def __init__(self, num: int, dim: int, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, dim, dtype=torch.float16, device=device), requires_grad=False)

    def forward(self, ids):
        return F.embedding(ids, self.weight)


def half_stored(model: nn.Module, device="meta"):
    """Swap the word embeddings and the output layer (ChatGLM-6B: its tied lm_head) for fp16-stored versions.
    With meta (default) they are empty, to be loaded; otherwise the current weights are converted."""
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "word_embeddings" and isinstance(module, nn.Embedding):
            new = HalfEmbedding(module.num_embeddings, module.embedding_dim, device="meta")
        elif leaf in ("output_layer", "lm_head") and isinstance(module, nn.Linear):
            new = HalfLinear(module.in_features, module.out_features, device="meta")
        else:
            continue
        if device != "meta":
            new.weight = nn.Parameter(module.weight.detach().half(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    tie = getattr(model, "lm_head", None)
    if tie is not None and getattr(model.config, "tie_word_embeddings", False):
        model.lm_head.weight = model.transformer.word_embeddings.weight
    return model


def storage_dtype(module: nn.Module, name: str, compute_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype a parameter is kept in: None (as loaded) for quantized weights and their scales, fp16 for
    fp16-stored matrices, the compute dtype for everything else."""
    if isinstance(module, (HalfLinear, HalfEmbedding)):
        return torch.float16
    if isinstance(module, QuantizedLinear) and name in ("weight", "weight_scale"):
        return None
    return compute_dtype
