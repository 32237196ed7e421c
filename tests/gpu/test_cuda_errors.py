# What a user without the right GPU is told, checked on a CPU by standing in for torch.cuda's queries: no GPU, a
# device index past the cards, bf16 on a card without it, and a model that does not fit (with what it needs).
import pytest
import torch

from chatglm import AutoModel, checkpoint as load
from chatglm.auto import HEADROOM, weight_bytes
from chatglm.cli import main
from chatglm.demo import demo_model_path
from conftest import TOKENIZERS


def fake_gpu(monkeypatch, count=1, capability=(8, 0), free=80e9, total=80e9):
    c = torch.cuda
    monkeypatch.setattr(c, "is_available", lambda: count > 0)
    monkeypatch.setattr(c, "device_count", lambda: count)
    monkeypatch.setattr(c, "current_device", lambda: 0)
    monkeypatch.setattr(c, "get_device_name", lambda i=0: "Fake GPU")
    monkeypatch.setattr(c, "get_device_capability", lambda i=0: capability)
    monkeypatch.setattr(c, "mem_get_info", lambda i=0: (int(free), int(total)))


@pytest.mark.parametrize("case,kwargs,fake,message", [
    ("no-gpu", {"device": "cuda"}, {"count": 0}, "no CUDA"),
    ("index", {"device": "cuda:1"}, {"count": 1}, r"has 1 CUDA device \(cuda:0\)"),
    ("bf16", {"device": "cuda", "dtype": "bfloat16"}, {"capability": (7, 5)},
     r"cuda:0 \(Fake GPU\) has compute capability 7.5: bfloat16 needs 8.0"),
    ("fit", {"device": "cuda"}, {"free": 0.2e9, "total": 4e9},
     r"needs about 0.5 GB of GPU memory .* cuda:0 \(Fake GPU\) has 0.2 GB free of 4.0 GB; quantization_bit=8"),
    ("fit-int4", {"device": "cuda", "quantization_bit": 4}, {"free": 0.2e9, "total": 4e9}, r"of int4 weights"),
], ids=lambda v: v if isinstance(v, str) and v.isidentifier() or v in ("no-gpu", "fit-int4") else None)
def test_clear_errors_before_loading(monkeypatch, case, kwargs, fake, message):
    fake_gpu(monkeypatch, **fake)
    with pytest.raises(ValueError, match=message):
        AutoModel.from_pretrained(demo_model_path(), **kwargs)


def test_cli_reports_the_error(monkeypatch, capsys):
    fake_gpu(monkeypatch, capability=(7, 0))
    try:
        code = main(["generate", "--device", "cuda", "--dtype", "bfloat16", "--prompt", "hi"])
    except SystemExit as e:
        code = e.code
    assert code == 2
    assert "bfloat16 needs 8.0" in capsys.readouterr().err


@pytest.mark.parametrize("name,bits,low,high", [("chatglm-6b", 0, 12.2, 12.5), ("chatglm-6b", 4, 3.8, 4.0),
                                                ("chatglm3-6b", 0, 12.4, 12.6), ("chatglm3-6b", 8, 6.7, 6.9)])
def test_weight_estimate_at_6b(name, bits, low, high):
    """The 6B configs in fp16: ~12.5 GB; int4 under the model card's 6 GB with the headroom."""
    model = load.build_model(load.load_config(TOKENIZERS / name), device="meta")
    gb = weight_bytes(model, torch.float16, bits) / 1e9
    assert low <= gb <= high
    assert bits != 4 or gb + HEADROOM / 1e9 <= 6
