# Quantized models end to end: on-the-fly, in place, pre-quantized THUDM folders, save and reload, bad input.
import json
import shutil

import pytest
import torch

from chatglm import AutoModel, AutoTokenizer
from chatglm.quantize import HalfEmbedding, HalfLinear, QuantizedLinear, quantize_weight
from conftest import GOLDEN, TOKENIZERS, needs_shared
from helpers import config, write_checkpoint

pytestmark = needs_shared
NAMES = ["chatglm-6b", "chatglm2-6b", "chatglm3-6b"]


def ids_for(tok):
    return torch.tensor([tok.encode("晚上睡不着应该怎么办 Hello, world")])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bits", [4, 8])
def test_load_quantized_equals_quantize_in_place(name, bits):
    path = GOLDEN / f"{name}-tiny"
    tok = AutoTokenizer.from_pretrained(path)
    ids = ids_for(tok)
    loaded = AutoModel.from_pretrained(path, quantization_bit=bits)
    layers = [m for m in loaded.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 4 * loaded.config.num_layers and all(m.bits == bits for m in layers)
    # on CPU the embeddings and output layer are kept in fp16, as the checkpoint holds them
    assert any(isinstance(m, HalfEmbedding) for m in loaded.modules())
    assert any(isinstance(m, HalfLinear) for m in loaded.modules())
    in_place = AutoModel.from_pretrained(path).quantize(bits)
    assert torch.equal(loaded(ids).logits, in_place(ids).logits)
    # and chat runs through the same generation code
    r, _ = loaded.chat(tok, "你好", max_length=40, do_sample=False)
    assert isinstance(r, str)


@pytest.mark.parametrize("name", NAMES)
def test_quantized_error_is_small_for_int8(name):
    path = GOLDEN / f"{name}-tiny"
    ids = ids_for(AutoTokenizer.from_pretrained(path))
    ref = AutoModel.from_pretrained(path)(ids).logits
    q8 = AutoModel.from_pretrained(path, quantization_bit=8)(ids).logits
    assert ((q8 - ref).norm() / ref.norm()) < 0.05


@pytest.mark.parametrize("group", [None, 8])
def test_save_and_reload_without_requantizing(tmp_path, group):
    path = GOLDEN / "chatglm3-6b-tiny"
    tok = AutoTokenizer.from_pretrained(path)
    m = AutoModel.from_pretrained(path, quantization_bit=4, quantization_group_size=group)
    m.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["quantization_bit"] == 4 and saved.get("quantization_group_size") == group
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        w = f.get_tensor("transformer.encoder.layers.0.self_attention.query_key_value.weight")
        s = f.get_tensor("transformer.encoder.layers.0.self_attention.query_key_value.weight_scale")
    assert w.dtype == torch.int8 and w.shape == (m.config.multi_query_group_num * 2 * 16 + 64, 32)
    assert s.dtype == torch.float16
    back = AutoModel.from_pretrained(tmp_path)
    assert back.family == "chatglm3" and back.config.quantization_bit == 4
    ids = ids_for(tok)
    assert torch.equal(back(ids).logits, m(ids).logits)
    assert AutoTokenizer.from_pretrained(tmp_path).encode("你好") == tok.encode("你好")
    with pytest.raises(FileExistsError):
        shutil.copy(GOLDEN / "chatglm2-6b-tiny" / "pytorch_model.bin.index.json", tmp_path)
        m.save_pretrained(tmp_path)


def thudm_int4_folder(tmp_path, family="chatglm", bits=4):
    """A pre-quantized folder in THUDM's layout: one pytorch_model.bin with int8 weight + fp16 weight_scale
    for every block Linear, fp16 everything else, quantization_bit in config.json, no lm_head (v1)."""
    cfg = config(family, quantization_bit=bits)
    src = write_checkpoint(tmp_path / "src", config(family), family, seed=3, tokenizers=TOKENIZERS)
    sd = torch.load(src / "pytorch_model.bin", weights_only=True)
    out = {}
    for k, v in sd.items():
        leaf = k.rsplit(".", 2)
        if k.endswith(".weight") and ".layers." in k and leaf[-2] in ("query_key_value", "dense", "dense_h_to_4h",
                                                                       "dense_4h_to_h"):
            q, s = quantize_weight(v, bits)
            out[k], out[k + "_scale"] = q, s.half()
        elif k != "lm_head.weight":
            out[k] = v
    dst = tmp_path / "int4"
    shutil.copytree(src, dst)
    (dst / "config.json").write_text(json.dumps(cfg))
    torch.save(out, dst / "pytorch_model.bin")
    return src, dst


@pytest.mark.parametrize("family", ["chatglm", "chatglm2"])
@pytest.mark.parametrize("bits", [4, 8])
def test_prequantized_thudm_folder_loads(tmp_path, family, bits):
    src, dst = thudm_int4_folder(tmp_path, family, bits)
    pre = AutoModel.from_pretrained(dst)
    assert pre.config.quantization_bit == bits
    fly = AutoModel.from_pretrained(src, quantization_bit=bits)
    tok = AutoTokenizer.from_pretrained(dst)
    ids = ids_for(tok)
    assert torch.equal(pre(ids).logits, fly(ids).logits)
    with pytest.raises(ValueError, match=f"already quantized to {bits} bits"):
        AutoModel.from_pretrained(dst, quantization_bit=12 - bits)


def test_bad_quantization_input(tmp_path):
    path = GOLDEN / "chatglm3-6b-tiny"
    with pytest.raises(ValueError, match="must be 4 or 8"):
        AutoModel.from_pretrained(path, quantization_bit=3)
    m = AutoModel.from_pretrained(path, quantization_bit=8)
    with pytest.raises(ValueError, match="already quantized"):
        m.quantize(4)
    with pytest.raises(ValueError, match="must be 4 or 8"):
        AutoModel.from_pretrained(path).quantize(2)
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        AutoModel.from_pretrained(path, quantization_bit=4, quantization_group_size=32)  # 136 columns
    with pytest.raises(ValueError, match="needs quantization_bit"):
        AutoModel.from_pretrained(path, quantization_group_size=32)
    # a pre-quantized folder whose shapes don't match its config
    src, dst = thudm_int4_folder(tmp_path, "chatglm2", 4)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["ffn_hidden_size"] = 100
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"weight has shape .* config.json implies"):
        AutoModel.from_pretrained(dst)
    # an int4 folder that claims 8 bits
    src, dst = thudm_int4_folder(tmp_path / "b", "chatglm2", 4)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_bit"] = 8
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json implies"):
        AutoModel.from_pretrained(dst)
    # fp16 weights in a folder that says it is quantized
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_bit"] = 4
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="expected int8"):
        AutoModel.from_pretrained(src)
    # chatglm-6b-int4-qe quantizes the embeddings too: refused clearly
    src, dst = thudm_int4_folder(tmp_path / "qe", "chatglm", 4)
    qe = json.loads((dst / "config.json").read_text())
    qe["quantization_embeddings"] = True
    (dst / "config.json").write_text(json.dumps(qe))
    with pytest.raises(ValueError, match="quantization_embeddings .* is not supported"):
        AutoModel.from_pretrained(dst)


def test_quantized_generation_cached_equals_full():
    path = GOLDEN / "chatglm2-6b-tiny"
    m = AutoModel.from_pretrained(path, quantization_bit=4)
    ids = ids_for(AutoTokenizer.from_pretrained(path))
    out = m.generate(ids, max_new_tokens=8, eos_token_id=[])
    full = m(out).logits[0]
    assert full[ids.shape[1] - 1:-1].argmax(-1).tolist() == out[0, ids.shape[1]:].tolist()
