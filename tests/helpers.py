# Random tiny models of any shape, built and saved exactly like real checkpoints.
import json
import shutil
from pathlib import Path

import pytest
import torch

from chatglm import kernels
from chatglm.cache import KVCache
from chatglm.chat import ChatGLM
from chatglm.engine import SlotCache
from chatglm.checkpoint import build_model, load_config
from chatglm.generate import decode_step, prefill

# Every test that needs the compiled CPU kernels: skipped, the same way everywhere, without a C compiler or with
# CHATGLM_NO_KERNEL=1 (the PyTorch twins are what then runs, and their tests still run).
needs_kernels = pytest.mark.skipif(kernels.library() is None,
                                   reason="the CPU kernels are not built (no C compiler, or CHATGLM_NO_KERNEL=1)")

V1_BASE = {"model_type": "chatglm", "vocab_size": 130528, "hidden_size": 64, "inner_hidden_size": 200,
           "num_layers": 2, "num_attention_heads": 4, "max_sequence_length": 256, "position_encoding_2d": True,
           "bos_token_id": 130004, "eos_token_id": 130005, "mask_token_id": 130000, "gmask_token_id": 130001,
           "pad_token_id": 3, "torch_dtype": "float16"}
V2_BASE = {"model_type": "chatglm", "padded_vocab_size": 65024, "hidden_size": 64, "num_layers": 2,
           "num_attention_heads": 4, "kv_channels": 16, "multi_query_attention": True,
           "multi_query_group_num": 2, "ffn_hidden_size": 136, "seq_length": 256, "add_qkv_bias": True,
           "add_bias_linear": False, "rmsnorm": True, "post_layer_norm": True, "torch_dtype": "float16",
           "eos_token_id": 2, "pad_token_id": 0}


def config(family: str, **overrides) -> dict:
    base = V1_BASE if family == "chatglm" else V2_BASE
    return {**base, **overrides}


def random_state(model, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight"):
            sd[name] = 1 + 0.1 * torch.randn(p.shape, generator=g)
        else:
            sd[name] = std * torch.randn(p.shape, generator=g)
    return sd


def write_checkpoint(folder: Path, cfg: dict, family: str, seed=0, layout="bin", dtype=torch.float16,
                     tokenizers: Path | None = None):
    """A checkpoint folder in the official layout with random weights."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    name = {"chatglm": "chatglm-6b", "chatglm2": "chatglm2-6b", "chatglm3": "chatglm3-6b"}[family]
    if tokenizers is not None:
        for f in (tokenizers / name).iterdir():
            if f.name != "config.json":
                shutil.copy(f, folder / f.name)
    else:
        (folder / "tokenizer_config.json").write_text(json.dumps({"name_or_path": f"THUDM/{name}"}))
    model = build_model(load_config(folder, family))
    sd = {k: v.to(dtype) for k, v in random_state(model, seed).items()}
    if family == "chatglm":
        sd["lm_head.weight"] = sd["transformer.word_embeddings.weight"].clone()
    save(folder, sd, layout)
    return folder


def save(folder: Path, sd: dict, layout: str):
    keys = list(sd)
    if layout == "bin":
        torch.save(sd, folder / "pytorch_model.bin")
    elif layout == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    elif layout in ("sharded-bin", "sharded-safetensors"):
        half = len(keys) // 2
        parts = [keys[:half], keys[half:]]
        st = layout == "sharded-safetensors"
        ext = "safetensors" if st else "bin"
        prefix = "model" if st else "pytorch_model"
        weight_map = {}
        for i, part in enumerate(parts, 1):
            fname = f"{prefix}-{i:05d}-of-00002.{ext}"
            shard = {k: sd[k].contiguous() for k in part}
            if st:
                from safetensors.torch import save_file
                save_file(shard, str(folder / fname))
            else:
                torch.save(shard, folder / fname)
            weight_map.update({k: fname for k in part})
        index = "model.safetensors.index.json" if st else "pytorch_model.bin.index.json"
        (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        raise ValueError(layout)


def random_model(family: str, seed=0, **overrides) -> ChatGLM:
    """A random model in memory (fp32), through the same loader as a checkpoint."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_checkpoint(Path(tmp), config(family, **overrides), family, seed, dtype=torch.float32)
        from chatglm import AutoModel
        return AutoModel.from_pretrained(folder, dtype=torch.float32, family=family)


# Decode harnesses shared by the fused-op and fused-layer tests: each fast path is compared with the code it
# replaces through whole decode steps.

DECODE_SHAPES = [("chatglm", {}), ("chatglm2", {}), ("chatglm3", {"multi_query_attention": False}),
                 ("chatglm3", {"multi_query_group_num": 1, "num_attention_heads": 8, "kv_channels": 8}),
                 ("chatglm3", {"pre_seq_len": 3})]


def decode_logits(model, steps=6):
    """Logits of a left-padded batch of two prompts and `steps` greedy decode steps, through KVCache."""
    m = model.model
    if model.family == "chatglm":
        rows = [[5, 74874, 130001, 130004], [19316, 398, 35, 63823, 130001, 130004]]
    else:
        rows = [[64790, 64792, 36474, 54591], [64790, 64792, 13755, 993, 30992, 31123, 1833]]
    n = max(map(len, rows))
    ids = torch.tensor([[0] * (n - len(r)) + r for r in rows])
    pad = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    out = []
    with torch.inference_mode():
        cache = KVCache.for_model(m, 2, n + steps)
        pad = torch.cat([pad.new_ones(2, cache.length), pad], 1)
        logits, last = prefill(m, ids, pad, cache)
        logits = logits[:, -1]
        for _ in range(steps):
            out.append(logits)
            pad = torch.cat([pad, pad.new_ones(2, 1)], 1)
            logits, last = decode_step(m, logits.argmax(-1)[:, None], last, pad, cache)
    return torch.stack(out)


def slot_cache_decode(m, family: str, rows: int = 2, steps: int = 5):
    """Two prompts of different lengths prefilled one by one, then decoded together in the server engine's
    SlotCache (`rows` slots): the stacked logits of each step, and the cache."""
    cache = SlotCache(m, rows=rows)
    prompts = [[5, 74874, 130001, 130004], [19316, 398, 35, 63823, 130001, 130004]] if family == "chatglm" \
        else [[64790, 64792, 36474], [64790, 64792, 13755, 993, 30992, 31123]]
    toks = []
    with torch.inference_mode():
        for row, p in enumerate(prompts):
            kv = KVCache.for_model(m, 1, len(p))
            logits, last = prefill(m, torch.tensor([p]), torch.ones(1, kv.length + len(p), dtype=torch.long), kv)
            toks.append(int(logits[0, -1].argmax()))
            cache.put(row, kv, last)
        tokens = torch.tensor(toks)[:, None]
        out = []
        for _ in range(steps):
            out.append(cache.step(m, tokens))
            tokens = out[-1].argmax(-1)[:, None]
    return torch.stack(out), cache
