# Checkpoint folders -> models and tokenizers. The one boundary where files are read: config.json, the weights
# (safetensors or torch.load(weights_only=True)), the tokenizer model. Nothing from the folder is executed.
# Models are built on the meta device and filled shard by shard, so peak memory stays near the model's size.
from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import re
from pathlib import Path

import torch
from torch import nn

from .models import glm, glm2

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")
# Buffers the originals store but recompute (only their dtype mattered there).
IGNORED_KEYS = re.compile(r".*(rotary_emb|rotary_pos_emb)\.inv_freq$")
FAMILIES = ("chatglm", "chatglm2", "chatglm3")


# ---------------------------------------------------------------- folders

def resolve(name_or_path) -> Path:
    """A local checkpoint folder, or a hub id (owner/name) through huggingface_hub's cache or download."""
    p = Path(os.fspath(name_or_path)).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise NotADirectoryError(f"{p} is a file; pass the checkpoint folder that holds config.json")
    name = os.fspath(name_or_path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not name.startswith("."):
        return _from_hub(name)
    raise FileNotFoundError(f"no such checkpoint folder: {p}")


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{repo_id!r} is not a local folder, and huggingface_hub is not installed to "
                                "fetch it; pass a checkpoint folder") from None
    # Weights, configs and tokenizer models only: the hub repos' .py files are never fetched or run.
    patterns = ["*.json", "*.safetensors", "*.bin", "*.model"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise FileNotFoundError(
            f"{repo_id!r} is not a local folder, not in the Hugging Face cache, and could not be downloaded "
            f"({type(e).__name__}). Offline? Download it elsewhere and pass the folder's path.") from None


def read_json(path: Path, what: str = "") -> dict:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing{what}") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def detect_family(folder: Path, config: dict) -> str:
    """chatglm (ChatGLM-6B), chatglm2 or chatglm3. ChatGLM2 and ChatGLM3 share architecture and tokenizer file;
    they differ in chat format and RoPE precision, and only their names tell them apart."""
    mt = config.get("model_type", "chatglm")
    if mt != "chatglm":
        raise ValueError(f"{folder / 'config.json'}: model_type {mt!r} is not a ChatGLM model")
    if config.get("chatglm_family") in FAMILIES:  # written by save_pretrained
        return config["chatglm_family"]
    if "inner_hidden_size" in config or "position_encoding_2d" in config or (folder / "ice_text.model").exists():
        return "chatglm"
    if "padded_vocab_size" in config or "multi_query_group_num" in config or "ffn_hidden_size" in config:
        names = [str(config.get("_name_or_path", ""))]
        tc = folder / "tokenizer_config.json"
        if tc.exists():
            try:
                names.append(str(read_json(tc).get("name_or_path", "")))
            except ValueError:
                pass
        names.append(folder.resolve().name)
        for n in names:
            n = n.lower()
            if "chatglm2" in n:
                return "chatglm2"
            if "chatglm3" in n or "demo" in n:
                return "chatglm3"
        return "chatglm3"
    raise ValueError(f"{folder / 'config.json'}: not a ChatGLM config (no inner_hidden_size or "
                     "padded_vocab_size)")


def load_config(folder: Path, family: str | None = None):
    config = read_json(folder / "config.json", " (is this a checkpoint folder?)")
    family = family or detect_family(folder, config)
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    if family == "chatglm":
        return glm.GLMConfig.from_dict(config)
    return glm2.GLM2Config.from_dict(config, family)


def build_model(cfg, device=None):
    """The model for a config. On the meta device (to be filled by load_weights) the layers' random
    initialisation is skipped: on meta tensors it costs a second of one-time Python setup and does nothing."""
    cls = glm.ChatGLMModel if isinstance(cfg, glm.GLMConfig) else glm2.ChatGLM2Model
    if device is None or torch.device(device).type != "meta":
        return cls(cfg)
    inits = {c: c.reset_parameters for c in (nn.Linear, nn.Embedding, nn.LayerNorm)}
    try:
        for c in inits:
            c.reset_parameters = lambda self: None
        with torch.device("meta"):
            return cls(cfg)
    finally:
        for c, f in inits.items():
            c.reset_parameters = f


# ---------------------------------------------------------------- weights

def weight_shards(folder: Path) -> list[Path]:
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.exists():
            continue
        if not name.endswith(".index.json"):
            return [path]
        index = read_json(path)
        wm = index.get("weight_map")
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise ValueError(f"{path}: no weight_map of key -> file name")
        shards = []
        for f in wm.values():
            shard = folder / f
            if Path(f).name != f:
                raise ValueError(f"{path}: shard name {f!r} is not a plain file name")
            if not shard.exists():
                raise FileNotFoundError(f"{path} lists {f}, which is missing")
            if shard not in shards:
                shards.append(shard)
        return shards
    raise FileNotFoundError(f"{folder}: no weights (expected one of {', '.join(WEIGHT_FILES)})")


def read_shard(path: Path):
    """Yields (key, tensor) from one weights file, one tensor at a time: a safetensors file is opened per tensor
    and a .bin shard's mapped pages are released after each tensor, so the file's pages never pile up in the
    process (they measured +1.8 GB of RSS per shard)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys = list(f.keys())
        except Exception as e:
            raise ValueError(f"{path}: unreadable safetensors file ({e})") from None
        for k in keys:
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    t = f.get_tensor(k)
            except Exception as e:
                raise ValueError(f"{path}: cannot read {k} ({e})") from None
            yield k, t
        return
    mapped = True
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise ValueError(f"{path}: unreadable or truncated checkpoint ({str(e).splitlines()[0]})") from None
        sd, mapped = torch.load(path, map_location="cpu", weights_only=True), False  # legacy (non-zip) format
    except Exception as e:
        raise ValueError(f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    for k in list(sd):
        v = sd.pop(k)
        if not torch.is_tensor(v):
            raise ValueError(f"{path}: {k} is not a tensor")
        yield k, v
        if mapped:
            _drop_pages(v)


def _drop_pages(t: torch.Tensor):
    """Tell the kernel it may drop the (read-only, file-backed) pages under a tensor read through mmap."""
    if not hasattr(mmap, "MADV_DONTNEED") or t.device.type != "cpu":
        return
    page = mmap.PAGESIZE
    start = (t.data_ptr() + page - 1) // page * page
    end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    if end > start:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)


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


def _set_param(model: nn.Module, key: str, tensor: torch.Tensor):
    mod_name, _, name = key.rpartition(".")
    mod = model.get_submodule(mod_name)
    mod._parameters[name] = nn.Parameter(tensor, requires_grad=False)


def load_weights(model: nn.Module, shards: list[Path], dtype: torch.dtype, device, quantize: bool = False):
    """Fill a meta-device model from checkpoint shards, one shard at a time. Floating-point weights of
    QuantizedLinear layers are quantized as they arrive when `quantize` is set (peak memory then stays near the
    quantized size); pre-quantized int8 weights and their scales load as they are."""
    from .quantize import QuantizedLinear, quantize_weight, storage_dtype
    expected = dict(model.named_parameters())
    modules = dict(model.named_modules())
    tied = getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" not in expected
    loaded = set()
    for path in shards:
        for key, t in read_shard(path):
            if IGNORED_KEYS.fullmatch(key):
                continue
            if tied and key == "lm_head.weight":
                continue  # tied to the word embeddings, as transformers ties them
            if key not in expected:
                raise ValueError(f"{path}: unexpected key {key} (does config.json match these weights?)")
            mod_name, _, name = key.rpartition(".")
            mod = modules[mod_name]
            out = {key: t}
            if isinstance(mod, QuantizedLinear) and name == "weight" and t.is_floating_point():
                if not quantize:
                    raise ValueError(f"{path}: {key} is {t.dtype}, but config.json says the checkpoint is quantized "
                                     f"(quantization_bit={mod.bits}): expected int8")
                if tuple(t.shape) != (mod.out_features, mod.in_features):
                    raise ValueError(f"{path}: {key} has shape {tuple(t.shape)}, config.json implies "
                                     f"{(mod.out_features, mod.in_features)}")
                q, scale = quantize_weight(t.to(device) if torch.device(device).type == "cuda" else t, mod.bits,
                                           mod.group_size)
                out = {key: q, f"{mod_name}.weight_scale": scale.to(torch.float16)}
            else:
                want = expected[key]
                if tuple(t.shape) != tuple(want.shape):
                    raise ValueError(f"{path}: {key} has shape {tuple(t.shape)}, config.json implies "
                                     f"{tuple(want.shape)}")
                if want.dtype == torch.int8 and t.dtype != torch.int8:
                    raise ValueError(f"{path}: {key} is {t.dtype}, expected int8 quantized weights")
                if want.dtype != torch.int8 and not t.is_floating_point():
                    raise ValueError(f"{path}: {key} is {t.dtype}, expected floating-point weights")
            for k, v in out.items():
                m, _, n = k.rpartition(".")
                v = v.to(device=device, dtype=storage_dtype(modules[m], n, dtype) or v.dtype)
                shares_file = v.device.type == "cpu" and v.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
                v = hugepage_copy(v) if v.device.type == "cpu" else v
                if shares_file and v.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
                    v = v.clone()  # don't keep the mmapped file alive inside the model
                _set_param(model, k, v)
                loaded.add(k)
        # the shard's tensors are released here, before the next one is read
    missing = [k for k in expected if k not in loaded]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"{shards[0].parent}: missing weights {', '.join(missing[:5])}{more}")
    if tied:
        model.lm_head.weight = model.transformer.word_embeddings.weight
    model.init_buffers()
    return model
