# Triton kernel for the quantized linear layers on a GPU: y = x @ (q * scale).T + bias straight from THUDM's
# storage -- int8 [N, K], or int4 packed two per byte [N, K/2] with the even column in the high nibble -- with
# one scale per output row or per group of input columns. It reads the packed weights once per tile of rows
# (a quarter of fp16's bytes for int4), where dequantize-then-matmul writes and reads an fp16 copy of every
# weight on every call. The plain twin is quantize.reference_linear; tests/gpu/test_triton_qlinear.py compares
# them under TRITON_INTERPRET=1 (Triton's CPU interpreter), odd shapes included.
# Registered as the op torch.ops.chatglm.qlinear so that torch.compile (chatglm/static.py) calls it as one opaque
# op and CUDA graphs record its launches.
from __future__ import annotations

import functools
import importlib.util
import os

import torch

tl = None  # triton.language, imported with the kernel's first use (see _kernel)

MAX_ROWS = 256  # beyond this many activation rows (prefill) the vendor matmul on a dequantized copy wins


@functools.cache
def available() -> bool:
    """Whether Triton is installed (the `gpu` extra); without it quantized layers on a GPU dequantize and call the
    vendor matmul."""
    return importlib.util.find_spec("triton") is not None


def _dot_src(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # Triton's CPU interpreter multiplies bf16 wrongly (it reads the bits as integers): fp32 there
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


def _qlinear_src(x_ptr, q_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_qn, stride_sn, stride_ym,
                 BITS: tl.constexpr, GROUP: tl.constexpr, TILE_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    # One program: a [BLOCK_M, BLOCK_N] tile of y, looping over K. Weights are loaded as [k, n] tiles (K runs
    # along memory), products accumulate in fp32 on the tensor cores; per-row scales apply once at the end, a
    # group's scale once per tile when the tile sits inside one group (TILE_SCALE), else per element. Integers go
    # to the activation dtype through fp32 (exact either way; Triton's interpreter gets int -> bf16 wrong).
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if BITS == 4:
            kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # byte columns of this tile
            kb_ok = kb < K // 2
            p = tl.load(q_ptr + rn[None, :] * stride_qn + kb[:, None], mask=n_ok[None, :] & kb_ok[:, None],
                        other=0).to(tl.int32)  # [BLOCK_K/2, BLOCK_N], sign-extended bytes
            hi = p >> 4  # arithmetic shift: the signed high nibble (even column)
            lo = p & 15
            lo = lo - ((lo & 8) << 1)  # the signed low nibble (odd column)
            x_ok = m_ok[:, None] & kb_ok[None, :]
            xe = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * kb[None, :], mask=x_ok, other=0.0)
            xo = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * kb[None, :] + 1, mask=x_ok, other=0.0)
            if GROUP == 0 or TILE_SCALE:
                part = _dot(xe, hi.to(tl.float32).to(xe.dtype), PRECISION, UPCAST)
                part += _dot(xo, lo.to(tl.float32).to(xo.dtype), PRECISION, UPCAST)
                if GROUP == 0:
                    acc += part
                else:
                    s = tl.load(s_ptr + rn * stride_sn + k0 // GROUP, mask=n_ok, other=0.0).to(tl.float32)
                    acc += part * s[None, :]
            else:
                s_ok = n_ok[None, :] & kb_ok[:, None]
                se = tl.load(s_ptr + rn[None, :] * stride_sn + (2 * kb[:, None]) // GROUP, mask=s_ok,
                             other=0.0).to(tl.float32)
                so = tl.load(s_ptr + rn[None, :] * stride_sn + (2 * kb[:, None] + 1) // GROUP, mask=s_ok,
                             other=0.0).to(tl.float32)
                acc += _dot(xe, (hi.to(tl.float32) * se).to(xe.dtype), PRECISION, UPCAST)
                acc += _dot(xo, (lo.to(tl.float32) * so).to(xo.dtype), PRECISION, UPCAST)
        else:
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < K
            w = tl.load(q_ptr + rn[None, :] * stride_qn + kk[:, None], mask=n_ok[None, :] & k_ok[:, None],
                        other=0)  # int8 [BLOCK_K, BLOCK_N]
            xk = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :],
                         other=0.0)
            if GROUP == 0 or TILE_SCALE:
                part = _dot(xk, w.to(tl.float32).to(xk.dtype), PRECISION, UPCAST)
                if GROUP == 0:
                    acc += part
                else:
                    s = tl.load(s_ptr + rn * stride_sn + k0 // GROUP, mask=n_ok, other=0.0).to(tl.float32)
                    acc += part * s[None, :]
            else:
                s = tl.load(s_ptr + rn[None, :] * stride_sn + kk[:, None] // GROUP,
                            mask=n_ok[None, :] & k_ok[:, None], other=0.0).to(tl.float32)
                acc += _dot(xk, (w.to(tl.float32) * s).to(xk.dtype), PRECISION, UPCAST)
    if GROUP == 0:
        acc = acc * tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def config(M: int, K: int, bits: int, group_size: int) -> dict:
    """Tile sizes (a first guess, to be tuned on a GPU): BLOCK_K of 128 columns (64 bytes of a packed int4 row per
    load), or the largest of 128/64/32 that holds whole groups (one scale per tile); small M (decode) gets narrow
    column tiles, so that a 4096-row weight still spreads over ~128 programs."""
    block_k = 128
    if group_size:
        block_k = next((b for b in (128, 64, 32) if group_size % b == 0), 128)
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    block_n = 32 if M <= 16 else 64
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                TILE_SCALE=bool(group_size) and group_size % block_k == 0)


def qlinear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, bits: int,
            group_size: int | None = None) -> torch.Tensor:
    """x [..., K] (fp16, bf16 or fp32) -> [..., N] in x's dtype; q int8 [N, K] (bits 8) or [N, K/2] (bits 4);
    scale [N] or [N, K/group_size]."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    K = x.shape[-1]
    N = q.shape[0]
    if q.dtype != torch.int8 or q.shape[1] * (2 if bits == 4 else 1) != K:
        raise ValueError(f"weight {tuple(q.shape)} {q.dtype} does not match {K} input columns at {bits} bits")
    G = group_size or 0
    if scale.shape != ((N, K // G) if G else (N,)):
        raise ValueError(f"scale {tuple(scale.shape)} does not match weight {tuple(q.shape)} "
                         f"(group_size={group_size})")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    q, scale = q.contiguous(), scale.contiguous()
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    cfg = config(M, K, bits, G)
    grid = (-(-N // cfg["BLOCK_N"]), -(-M // cfg["BLOCK_M"]))
    upcast = x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    _kernel()[grid](x2, q, scale, bias if bias is not None else scale, y, M, N, K, x2.stride(0), q.stride(0),
                    scale.stride(0), y.stride(0), BITS=bits, GROUP=G, HAS_BIAS=bias is not None,
                    PRECISION="ieee" if x.dtype == torch.float32 or upcast else "tf32", UPCAST=upcast, **cfg)
    return y.view(*x.shape[:-1], N)


@functools.cache
def _kernel():
    """The kernel, jitted at first use, with Triton imported then and not with the package: Triton's CPU
    interpreter (TRITON_INTERPRET=1) must be chosen before Triton is first imported."""
    global tl, _dot
    import triton
    import triton.language
    tl = triton.language
    _dot = triton.jit(_dot_src)  # the kernel calls it by this name
    return triton.jit(_qlinear_src)


if hasattr(torch.library, "custom_op"):
    @torch.library.custom_op("chatglm::qlinear", mutates_args=())
    def qlinear_op(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, bits: int,
                   group_size: int) -> torch.Tensor:
        return qlinear(x, q, scale, bias, bits, group_size or None)

    @qlinear_op.register_fake
    def _(x, q, scale, bias, bits, group_size):
        return x.new_empty(*x.shape[:-1], q.shape[0])
