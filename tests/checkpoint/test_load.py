# Checkpoint folders in every official layout, and every way one can be broken.
import json
import os
import shutil

import pytest
import torch

from chatglm import AutoModel, AutoTokenizer
from conftest import GOLDEN, TOKENIZERS, needs_shared
from helpers import config, write_checkpoint

pytestmark = needs_shared


@pytest.mark.parametrize("layout", ["bin", "safetensors", "sharded-bin", "sharded-safetensors"])
@pytest.mark.parametrize("family", ["chatglm", "chatglm2", "chatglm3"])
def test_layouts_load_the_same_model(tmp_path, family, layout):
    ref = write_checkpoint(tmp_path / "ref", config(family), family, seed=1, tokenizers=TOKENIZERS)
    other = write_checkpoint(tmp_path / layout, config(family), family, seed=1, layout=layout,
                             tokenizers=TOKENIZERS)
    a, b = AutoModel.from_pretrained(ref), AutoModel.from_pretrained(other)
    assert a.family == b.family == family
    ids = torch.tensor([AutoTokenizer.from_pretrained(other).encode("你好")])
    assert torch.equal(a(ids).logits, b(ids).logits)


def test_dtypes_and_tied_head():
    path = GOLDEN / "chatglm-6b-tiny"
    m32 = AutoModel.from_pretrained(path)
    assert m32.dtype == torch.float32
    assert m32.model.lm_head.weight is m32.model.transformer.word_embeddings.weight
    ids = torch.tensor([[5, 74874, 130001, 130004]])
    ref = m32(ids).logits
    for dtype in ("float16", torch.bfloat16):
        m = AutoModel.from_pretrained(path, dtype=dtype)
        assert m.dtype == (torch.float16 if dtype == "float16" else torch.bfloat16)
        if m.dtype == torch.bfloat16 or hasattr(torch.backends, "cpu"):
            out = m(ids).logits.float()
            assert out.argmax(-1).tolist() == ref.argmax(-1).tolist()
    m16 = AutoModel.from_pretrained(GOLDEN / "chatglm3-6b-tiny").half().float()  # .half()/.float() work
    assert m16.dtype == torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        AutoModel.from_pretrained(path, dtype="float8")


def test_peak_memory_streams_shards(tmp_path):
    """Loading builds on the meta device: no random init of a second copy of the weights."""
    path = GOLDEN / "chatglm2-6b-tiny"
    m = AutoModel.from_pretrained(path)
    assert all(p.device.type == "cpu" for p in m.parameters())
    assert not any(p.is_meta for p in m.parameters())
    assert not any(b.is_meta for b in m.buffers())


def copy_golden(tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(GOLDEN / f"{name}-tiny", dst)
    for f in dst.iterdir():
        os.chmod(f, 0o644)
    os.chmod(dst, 0o755)
    return dst


def test_missing_and_truncated_files(tmp_path):
    d = copy_golden(tmp_path, "chatglm2-6b")
    (d / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(FileNotFoundError, match="pytorch_model-00002-of-00002.bin, which is missing"):
        AutoModel.from_pretrained(d)
    d = copy_golden(tmp_path / "t", "chatglm2-6b")
    f = d / "pytorch_model-00001-of-00002.bin"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="pytorch_model-00001-of-00002.bin: unreadable"):
        AutoModel.from_pretrained(d)
    d = copy_golden(tmp_path / "s", "chatglm3-6b")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors"):
        AutoModel.from_pretrained(d)
    d = copy_golden(tmp_path / "w", "chatglm3-6b")
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        AutoModel.from_pretrained(d)
    d = copy_golden(tmp_path / "c", "chatglm3-6b")
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        AutoModel.from_pretrained(d)
    d = copy_golden(tmp_path / "k", "chatglm3-6b")
    (d / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        AutoTokenizer.from_pretrained(d)
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        AutoModel.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(NotADirectoryError):
        AutoModel.from_pretrained(d / "config.json")


def _edit_weights(d, fn):
    from safetensors.torch import load_file, save_file
    sd = load_file(str(d / "model.safetensors"))
    fn(sd)
    save_file(sd, str(d / "model.safetensors"))


def test_missing_unexpected_and_misshaped_keys(tmp_path):
    d = copy_golden(tmp_path / "a", "chatglm3-6b")
    _edit_weights(d, lambda sd: sd.pop("transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"))
    with pytest.raises(ValueError, match="missing weights transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"):
        AutoModel.from_pretrained(d)
    d = copy_golden(tmp_path / "b", "chatglm3-6b")
    _edit_weights(d, lambda sd: sd.update({"transformer.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match="model.safetensors: unexpected key transformer.extra.weight"):
        AutoModel.from_pretrained(d)
    d = copy_golden(tmp_path / "c", "chatglm3-6b")
    cfg = json.loads((d / "config.json").read_text())
    cfg["ffn_hidden_size"] = 100
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model.safetensors: transformer.encoder.layers.0.mlp.dense_\w+.weight has shape \(\d+, \d+\), config.json implies"):
        AutoModel.from_pretrained(d)
    d = copy_golden(tmp_path / "d", "chatglm3-6b")
    _edit_weights(d, lambda sd: sd.update(
        {"transformer.output_layer.weight": torch.zeros(65024, 64, dtype=torch.int8)}))
    with pytest.raises(ValueError, match="output_layer.weight is torch.int8"):
        AutoModel.from_pretrained(d)


@pytest.mark.parametrize("content,match", [
    (b"\xff\xfe{not utf8", "not UTF-8"),
    (b'{"hidden_size": 64,', "invalid JSON"),
    (b"[1, 2]", "expected a JSON object"),
    (b'{"model_type": "llama"}', "model_type 'llama' is not a ChatGLM model"),
    (b'{"model_type": "chatglm"}', "not a ChatGLM config"),
    (b'{"padded_vocab_size": 65024, "hidden_size": "64"}', "'hidden_size' should be int"),
])
def test_bad_config(tmp_path, content, match):
    d = copy_golden(tmp_path, "chatglm3-6b")
    (d / "config.json").write_bytes(content)
    with pytest.raises(ValueError, match=match):
        AutoModel.from_pretrained(d)


def test_bad_index(tmp_path):
    d = copy_golden(tmp_path, "chatglm2-6b")
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    with pytest.raises(ValueError, match="not a plain file name"):
        AutoModel.from_pretrained(d)
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": [1, 2]}))
    with pytest.raises(ValueError, match="no weight_map"):
        AutoModel.from_pretrained(d)


def test_pickled_code_is_never_executed(tmp_path):
    """torch.load(weights_only=True): a checkpoint that smuggles a callable is refused, not run."""
    d = copy_golden(tmp_path, "chatglm-6b")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"transformer.word_embeddings.weight": Evil()}, d / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin: unreadable"):
        AutoModel.from_pretrained(d)
    assert not marker.exists()


def hub_offline(monkeypatch, cache):
    # huggingface_hub reads its environment once, at import
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


def test_hub_id_offline(tmp_path, monkeypatch):
    hub_offline(monkeypatch, tmp_path / "hub")
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        AutoModel.from_pretrained("THUDM/chatglm3-6b")


def test_hub_id_from_cache(tmp_path, monkeypatch):
    """A hub id resolves through huggingface_hub's cache layout (models--owner--name/snapshots/<rev>)."""
    hub_offline(monkeypatch, tmp_path / "hub")
    repo = tmp_path / "hub" / "models--THUDM--chatglm3-6b"
    rev = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(GOLDEN / "chatglm3-6b-tiny", repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    tok = AutoTokenizer.from_pretrained("THUDM/chatglm3-6b")
    model = AutoModel.from_pretrained("THUDM/chatglm3-6b")
    assert model.family == "chatglm3" and tok.family == "chatglm3"


def test_ptuning_checkpoint_loads_and_runs(tmp_path):
    for family, extra in (("chatglm3", {}), ("chatglm", {"prefix_projection": True})):
        cfg = config(family, pre_seq_len=4, **extra)
        d = write_checkpoint(tmp_path / family, cfg, family, tokenizers=TOKENIZERS)
        tok, model = AutoTokenizer.from_pretrained(d), AutoModel.from_pretrained(d)
        assert any(n.startswith("model.transformer.prefix_encoder") for n, _ in model.named_parameters())
        response, history = model.chat(tok, "你好", history=[], max_length=40, do_sample=False)
        assert isinstance(response, str)
        base = {k: v for k, v in cfg.items() if k != "pre_seq_len"}
        (d / "config.json").write_text(json.dumps(base))
        with pytest.raises(ValueError, match="unexpected key transformer.prefix_encoder"):
            AutoModel.from_pretrained(d)


@pytest.mark.parametrize("name", ["chatglm-6b", "chatglm3-6b"])
def test_random_checkpoint_script(tmp_path, name):
    """scripts/random_checkpoint.py (the README's 6B folder figure) writes an official sharded layout that loads,
    unquantized and quantized while loading; it refuses to write into a folder that has files."""
    import subprocess
    import sys

    from conftest import ROOT
    src = GOLDEN / f"{name}-tiny"
    out = tmp_path / "ckpt"
    cmd = [sys.executable, str(ROOT / "scripts" / "random_checkpoint.py"), str(src), str(out), "--shard-gb", "0.0002"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    ids = torch.tensor([AutoTokenizer.from_pretrained(out).encode("你好")])
    full, quant = AutoModel.from_pretrained(out), AutoModel.from_pretrained(out, quantization_bit=8)
    assert full.family == quant.family and full(ids).logits.isfinite().all()
    assert (full(ids).logits.argmax(-1) == quant(ids).logits.argmax(-1)).float().mean() > 0.5
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and "not empty" in r.stderr
    r = subprocess.run(cmd[:2] + [str(tmp_path), str(tmp_path / "x")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and "has no config.json" in r.stderr
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    r = subprocess.run(cmd[:2] + [str(tmp_path / "bad"), str(tmp_path / "y")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and "invalid JSON" in r.stderr and not (tmp_path / "y").exists()


@pytest.mark.parametrize("names", [
    {"_name_or_path": "my-demo-finetune", "tokenizer": "THUDM/chatglm2-6b", "folder": "demo"},
    {"_name_or_path": "", "tokenizer": "", "folder": "chatglm2-demo"},
])
def test_chatglm2_folder_named_demo_is_chatglm2(tmp_path, names):
    """Only the names say ChatGLM2 from ChatGLM3; "demo" in one of them says neither."""
    from chatglm.checkpoint import detect_family
    folder = tmp_path / names["folder"]
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps({"name_or_path": names["tokenizer"]}))
    cfg = {**config("chatglm2"), "_name_or_path": names["_name_or_path"]}
    assert detect_family(folder, cfg) == "chatglm2"
