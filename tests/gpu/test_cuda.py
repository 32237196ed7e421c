# Every GPU path against its reference on a CUDA device, as the model cards call them. scripts/gpu_check.sh runs
# these on a lent GPU; without one they are skipped (the same logic runs on the CPU in test_static.py,
# test_triton_qlinear.py and test_cuda_errors.py).
import pytest
import torch

from chatglm import AutoModel, AutoTokenizer, static
from chatglm.kernels import triton_qlinear
from chatglm.quantize import QuantizedLinear, reference_linear
from conftest import GOLDEN, golden_json, needs_shared
from helpers import random_model, write_checkpoint
from static_harness import compare

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")
HALF = [torch.float16, torch.bfloat16]


# Each case compiles a decoder (a few seconds each on a GPU machine): the families and the P-Tuning prefix in fp16,
# bf16 once; the other shape variants run compiled on the CPU (test_static.py).
CASES = [("chatglm", {}, torch.float16), ("chatglm2", {}, torch.float16),
         ("chatglm3", {"pre_seq_len": 3}, torch.float16), ("chatglm3", {}, torch.bfloat16)]


@pytest.mark.parametrize("family,overrides,dtype", CASES, ids=["chatglm-fp16", "chatglm2-fp16", "chatglm3-prefix-fp16",
                                                                "chatglm3-bf16"])
def test_static_decode_matches_eager(family, overrides, dtype, monkeypatch):
    """Compiled with CUDA graphs: a left-padded batch and the engine's slots, against the eager model."""
    model = random_model(family, **overrides).to("cuda", dtype)
    compare(monkeypatch, static.StaticDecoder(model.model), model, tol=2e-2)


@pytest.mark.parametrize("bits,group", [(4, None), (8, None), (4, 128)], ids=["int4", "int8", "int4-g128"])
@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_quantized_layers_use_the_triton_kernel(bits, group, dtype, monkeypatch):
    calls = []
    kernel = triton_qlinear.qlinear
    monkeypatch.setattr(triton_qlinear, "qlinear", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    model = random_model("chatglm3").quantize(bits, group).to("cuda", dtype)
    lin = next(m for m in model.modules() if isinstance(m, QuantizedLinear))
    x = torch.randn(3, lin.in_features, device="cuda", dtype=dtype)
    with torch.inference_mode():
        y = lin(x)
    ref = reference_linear(x.float(), lin.weight, lin.weight_scale, lin.bias, bits, group)
    assert calls and ((y.float() - ref).norm() / ref.norm()).item() <= (1e-3 if dtype == torch.float16 else 8e-3)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_decode_compiles_with_the_kernel(bits, monkeypatch):
    model = random_model("chatglm3").quantize(bits).to("cuda", torch.float16)
    compare(monkeypatch, static.StaticDecoder(model.model), model, tol=2e-2)


# ---------------------------------------------------------------- the golden cases, in fp32 on the GPU

@needs_shared
def test_golden_forward_and_chat_on_cuda(golden_name):
    tok = AutoTokenizer.from_pretrained(GOLDEN / f"{golden_name}-tiny")
    model = AutoModel.from_pretrained(GOLDEN / f"{golden_name}-tiny", dtype=torch.float32, device="cuda")
    golden = golden_json(golden_name)
    with torch.inference_mode():
        for case in golden["forward"]:
            logits = model(torch.tensor([case["input_ids"]], device="cuda")).logits[0].cpu()
            assert logits.argmax(-1).tolist() == case["argmax"]
            assert torch.allclose(logits.logsumexp(-1), torch.tensor(case["logsumexp"]), atol=1e-3)
    for case in golden["chat"]:
        history = case["history"] if golden_name == "chatglm3-6b" else [tuple(h) for h in case["history"]]
        response, _ = model.chat(tok, case["query"], history=history, max_length=case["max_length"], do_sample=False)
        assert response == case["response"]
    for case in golden.get("batch", []):
        enc = tok(case["texts"], padding=True, return_tensors="pt")
        out = model.generate(**{k: v.cuda() for k, v in enc.items()}, max_new_tokens=12, do_sample=False)
        assert out.tolist() == case["output_ids"]


# ---------------------------------------------------------------- what the model cards call

@needs_shared
@pytest.mark.parametrize("how", ["half-cuda", "to-device", "device-arg", "quantize-cuda", "int4-load"])
def test_model_card_calls(how):
    """Each way the cards put a model on the GPU gives the CPU model's first greedy token (the same quantization
    on both sides; later tokens of random weights may part ways in half precision)."""
    path = GOLDEN / "chatglm3-6b-tiny"
    tok = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor([tok.encode("你好")])
    load = AutoModel.from_pretrained
    cpu, gpu = {"half-cuda": (lambda: load(path), lambda: load(path).half().cuda()),
                "to-device": (lambda: load(path), lambda: load(path).to(torch.device("cuda"))),
                "device-arg": (lambda: load(path), lambda: load(path, device="cuda")),
                "quantize-cuda": (lambda: load(path).quantize(8), lambda: load(path).half().quantize(8).cuda()),
                "int4-load": (lambda: load(path, quantization_bit=4),
                              lambda: load(path, quantization_bit=4, device="cuda"))}[how]
    want = cpu().generate(ids, max_new_tokens=4, do_sample=False)
    model = gpu()
    assert model.device.type == "cuda"
    out = model.generate(ids.cuda(), max_new_tokens=4, do_sample=False).cpu()
    assert out[0, :ids.shape[1] + 1].tolist() == want[0, :ids.shape[1] + 1].tolist()


def test_int4_load_streams_onto_the_gpu(tmp_path):
    """quantization_bit=4 with device="cuda": one fp16 weight at a time reaches the GPU and is quantized there,
    so the peak stays near the int4 model, far below its fp16 size."""
    cfg = {"model_type": "chatglm", "padded_vocab_size": 4096, "hidden_size": 1024, "num_layers": 6,
           "num_attention_heads": 8, "kv_channels": 128, "multi_query_attention": True, "multi_query_group_num": 2,
           "ffn_hidden_size": 2816, "seq_length": 512, "add_qkv_bias": True, "torch_dtype": "float16"}
    folder = write_checkpoint(tmp_path / "m", cfg, "chatglm3", layout="sharded-safetensors")
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    model = AutoModel.from_pretrained(folder, quantization_bit=4, device="cuda")
    final = torch.cuda.memory_allocated() - start
    peak = torch.cuda.max_memory_allocated() - start
    largest = 2 * 2 * 2816 * 1024  # dense_h_to_4h in fp16
    assert model.device.type == "cuda" and peak <= final + 4 * largest, f"peak {peak} B, final {final} B"


def test_cli_device_cuda(capsys):
    from chatglm.cli import main
    try:
        code = main(["generate", "--device", "cuda", "--dtype", "float16", "--greedy", "--prompt", "hello"])
    except SystemExit as e:
        code = e.code
    assert code in (0, None) and capsys.readouterr().out.strip()
