"""A faithful, self-contained runtime for ChatGLM-6B, ChatGLM2-6B and ChatGLM3-6B checkpoints."""
import os

# OpenMP threads (torch's, MKL's and the C kernels') spin for ~3 ms after each parallel region
# before they sleep. On a machine shared with other multi-threaded processes those spins take the cores everyone
# needs, and decode slowed ~8x at a load average of 6-9. A passive wait sleeps at once (see scripts/bench_busy.py
# for what it costs and saves). libgomp reads this when torch first loads it, so it must be set before torch is
# imported: here for the `chatglm` command and for programs that import chatglm first; others set
# OMP_WAIT_POLICY=PASSIVE in the environment. A policy the user chose is kept.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

from .auto import AutoModel, AutoTokenizer  # noqa: E402
from .chat import ChatGLM

__all__ = ["AutoModel", "AutoTokenizer", "ChatGLM"]
__version__ = "0.1.0"
