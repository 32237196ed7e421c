import json
import os
from pathlib import Path

# As `import chatglm` does, before torch loads libgomp: OpenMP threads that spin take the cores of the
# servers and kernels the tests start beside them.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models gain nothing from a second thread, and a busy machine makes them crawl

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
GOLDEN = SHARED / "golden"
TOKENIZERS = SHARED / "tokenizers"
FAMILIES = {"chatglm-6b": "chatglm", "chatglm2-6b": "chatglm2", "chatglm3-6b": "chatglm3"}

needs_shared = pytest.mark.skipif(not GOLDEN.is_dir(), reason=f"{GOLDEN} is absent (the shared golden checkpoints)")


def golden_json(name: str) -> dict:
    return json.loads((GOLDEN / f"{name}-tiny.json").read_text("utf-8"))


_cache = {}


def golden_model(name: str):
    """(tokenizer, model) for a golden checkpoint, loaded once per session (fp32 on CPU, as the goldens)."""
    if name not in _cache:
        from chatglm import AutoModel, AutoTokenizer
        path = GOLDEN / f"{name}-tiny"
        _cache[name] = (AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path, dtype=torch.float32))
    return _cache[name]


@pytest.fixture(params=list(FAMILIES))
def golden_name(request):
    if not GOLDEN.is_dir():
        pytest.skip(f"{GOLDEN} is absent")
    return request.param
