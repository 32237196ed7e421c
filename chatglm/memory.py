# Memory for weights: big CPU tensors in their own anonymous mappings, advised for transparent huge pages.
from __future__ import annotations

import math
import mmap

import torch

_HUGE = 2 << 20


def hugepage_empty(shape, dtype) -> torch.Tensor:
    """An uninitialised CPU tensor in its own anonymous mapping, advised for transparent huge pages before its
    first write (so the page faults allocate huge pages). Decoding streams every weight once per token; with
    4 KiB pages the TLB misses cost a large share of the bandwidth. Its own mapping also keeps big weights out of
    the malloc heap, where they fragmented it around the loader's temporaries (peak RSS grew by GBs)."""
    n = math.prod(shape)
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    if nbytes < 2 * _HUGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(buf, dtype=dtype, count=n).view(shape)  # the tensor keeps the mapping alive


def hugepage_copy(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cpu" or t.numel() * t.element_size() < 2 * _HUGE:
        return t
    return hugepage_empty(t.shape, t.dtype).copy_(t)
