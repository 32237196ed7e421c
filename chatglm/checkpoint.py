# Checkpoint folders -> models and tokenizers. The one boundary where files are read: config.json, the weights
# (safetensors or torch.load(weights_only=True)), the tokenizer model. Nothing from the folder is executed.
# Models are built on the meta device and filled shard by shard, so peak memory stays near the model's size.
from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import pickle
import re
import shutil
import stat
import zipfile
from pathlib import Path

import torch
from torch import nn

from .memory import hugepage_copy, hugepage_empty
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


MAX_JSON_BYTES = 16 << 20  # config.json, index and tokenizer_config files are kilobytes


def regular_file_size(path: Path) -> int:
    """The size of a regular file (or a symlink to one). Anything else is refused before it is opened: a FIFO
    blocks a reader forever and a device such as /dev/zero never ends."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: not a regular file")
    return st.st_size


def read_bytes(path: Path, limit: int) -> bytes:
    """At most `limit` bytes of a regular file; larger files are an error. O_NONBLOCK keeps the open itself from
    waiting on a FIFO, and the checks run on the opened descriptor (a swapped path cannot slip past them)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"{path}: not a regular file")
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path}: larger than {limit >> 20} MiB, too large for this kind of file")
    return data


def umask_mode(path: Path):
    """Give a saved file the mode open() gives new files, 0666 less the umask, as the rest of its folder has
    (safetensors writes through a private temporary file and leaves 0600)."""
    try:
        mask = int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _no_constant(name):
    raise ValueError(f"{name} is not a number JSON allows")


def read_json(path: Path, what: str = "") -> dict:
    try:
        raw = read_bytes(path, MAX_JSON_BYTES)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing{what}") from None
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"{path}: invalid JSON (nested too deeply)") from None
    except ValueError as e:  # integers past Python's digit limit, NaN/Infinity
        raise ValueError(f"{path}: invalid JSON ({e})") from None
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
            if "chatglm3" in n:
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
        cfg = glm.GLMConfig.from_dict(config)
    else:
        cfg = glm2.GLM2Config.from_dict(config, family)
    check_sizes(cfg, folder / "config.json")
    return cfg


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# generation_config.json keys a checkpoint may set, with what each must be. The others transformers writes there
# (eos and pad ids, max_length, transformers_version) belong to the family's chat format and are ignored.
GENERATION_KEYS = {
    "do_sample": (lambda v: isinstance(v, bool), "true or false"),
    "temperature": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a whole number >= 0"),
    "repetition_penalty": (lambda v: _is_number(v) and v > 0, "a number > 0"),
}


def load_generation_config(folder: Path) -> dict:
    """The checkpoint's own sampling defaults from its optional generation_config.json (transformers' file): the
    GENERATION_KEYS it sets, checked. {} without the file."""
    path = folder / "generation_config.json"
    if not path.exists():
        return {}
    raw = read_json(path)
    out = {}
    for key, (ok, what) in GENERATION_KEYS.items():
        if key in raw:
            if not ok(raw[key]):
                raise ValueError(f"{path}: {key} must be {what}, got {raw[key]!r}")
            out[key] = raw[key]
    return out

# Far above every ChatGLM release (6B: 28 layers, width 4096, 128K context), far below sizes that would take
# minutes to build or allocate before anything could complain.
SIZE_LIMITS = {"num_layers": 1024, "hidden_size": 1 << 16, "num_attention_heads": 1024, "kv_channels": 4096,
               "multi_query_group_num": 1024, "ffn_hidden_size": 1 << 18, "inner_hidden_size": 1 << 18,
               "padded_vocab_size": 1 << 20, "vocab_size": 1 << 20, "seq_length": 1 << 20,
               "max_sequence_length": 1 << 20, "pre_seq_len": 1 << 16}


def check_sizes(cfg, path: Path):
    for name, limit in SIZE_LIMITS.items():
        v = getattr(cfg, name, None)
        if v is not None and not 1 <= v <= limit:
            raise ValueError(f"{path}: {name} must be between 1 and {limit}, got {v}")


def min_weight_bytes(cfg) -> int:
    """A lower bound on the bytes of any checkpoint of this config: per layer at least the attention output
    (h*h) and the two MLP products (2*h*ffn), plus the embeddings, at int4's half a byte per weight."""
    h = cfg.hidden_size
    ffn = getattr(cfg, "ffn_hidden_size", None) or getattr(cfg, "inner_hidden_size", 4 * h)
    return (cfg.num_layers * (h * h + 2 * h * ffn) + cfg.vocab_size * h) // 2


def check_weights_fit(cfg, folder: Path, shards: list[Path]):
    """Refuse a config.json that describes a larger model than the weights on disk, before building it (small
    models build in no time, and their shards' own errors say more)."""
    on_disk = sum(regular_file_size(s) for s in shards)
    need = min_weight_bytes(cfg)
    if need > max(on_disk, 64 << 20):
        raise ValueError(f"{folder / 'config.json'}: describes a model of at least {need:,} bytes of weights, "
                         f"but the weight files hold {on_disk:,} bytes (does config.json belong to these weights?)")


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
        if not path.exists() and not path.is_symlink():
            continue
        if not name.endswith(".index.json"):
            regular_file_size(path)
            return [path]
        index = read_json(path)
        wm = index.get("weight_map")
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise ValueError(f"{path}: no weight_map of key -> file name")
        if not wm:
            raise ValueError(f"{path}: the weight_map lists no weights")
        shards = []
        for f in wm.values():
            shard = folder / f
            if Path(f).name != f:
                raise ValueError(f"{path}: shard name {f!r} is not a plain file name")
            if not shard.exists():
                raise FileNotFoundError(f"{path} lists {f}, which is missing")
            regular_file_size(shard)
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
    sd, mapped = load_bin(path)
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    for k in list(sd):
        v = sd.pop(k)
        if not torch.is_tensor(v):
            raise ValueError(f"{path}: {k} is not a tensor")
        yield k, v
        if mapped:
            _drop_pages(v)


def load_bin(path: Path):
    """(object, mapped) from a torch.save file, with weights_only=True and every failure one ValueError naming the
    file. Zip files (torch >= 1.6) map their storages from the file, whose records torch checks against the
    tensors' sizes; the legacy format allocates each storage at the size its pickle claims, so those claims are
    checked against the file's size first."""
    size = regular_file_size(path)
    try:
        if zipfile.is_zipfile(path):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True), True
        _check_legacy(path, size)
        return torch.load(path, map_location="cpu", weights_only=True), False
    except ValueError as e:
        if str(e).startswith(str(path)):
            raise
        raise _load_error(path, e) from None
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError, KeyError, RecursionError, MemoryError, ...
        raise _load_error(path, e) from None


def _load_error(path: Path, e: Exception) -> ValueError:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        # torch's own message suggests retrying with weights_only=False: keep only the reason
        why = " ".join(line for line in lines[1:] if not line.startswith(("Check the documentation", "Please file")))
        why = why.replace("WeightsUnpickler error:", "").strip()
        return ValueError(f"{path}: unreadable checkpoint, refused: it holds more than tensors and plain data ({why}). "
                          "Nothing in it was run. Never load it with weights_only=False: that would run whatever "
                          "code it carries.")
    return ValueError(f"{path}: unreadable checkpoint ({type(e).__name__}"
                      f"{': ' + lines[0] if lines else ''})")


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization's magic number for the pre-1.6 format
_ELEMENT_BYTES = {"Double": 8, "Long": 8, "ComplexFloat": 8, "ComplexDouble": 16, "Float": 4, "Int": 4, "Half": 2,
                  "BFloat16": 2, "Short": 2}


class _Stub:
    """What every global of a scanned pickle becomes: it accepts any construction and any state."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Stub()

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class _ScanUnpickler(pickle.Unpickler):
    """Reads a legacy torch.save pickle without importing or calling anything, collecting the storages it names
    (persistent ids: ('storage', storage type, key, location, numel, ...)) and the tensors over them."""

    def __init__(self, f):
        super().__init__(f)
        self.storages, self.tensors = {}, []

    def find_class(self, module, name):
        if module == "torch._utils" and name.startswith("_rebuild_tensor"):
            return self._tensor
        return type(name, (_Stub,), {})

    def persistent_load(self, pid):
        storage = _Stub()
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[4], int):
            kind = getattr(pid[1], "__name__", "").removesuffix("Storage")
            self.storages[pid[2]] = pid[4] * _ELEMENT_BYTES.get(kind, 1)
            storage.numel = pid[4]
        return storage

    def _tensor(self, storage, offset, size, stride, *rest):
        self.tensors.append((getattr(storage, "numel", None), offset, size, stride))
        return _Stub()


def _tensor_fits(numel, offset, size, stride) -> bool:
    """Whether a tensor's elements lie inside its storage (else torch would grow the storage to fit it)."""
    ints = all(isinstance(v, int) for v in (numel, offset, *size, *stride))
    if not ints or len(size) != len(stride) or offset < 0 or any(n < 0 for n in size):
        return False
    if 0 in size:
        return True
    return min(stride, default=0) >= 0 and offset + sum((n - 1) * st for n, st in zip(size, stride)) < numel


def _check_legacy(path: Path, size: int):
    with open(path, "rb") as f:
        try:
            magic = _ScanUnpickler(f).load()
        except Exception:
            magic = None
        if magic != _LEGACY_MAGIC:
            raise ValueError(f"{path}: unreadable: not a PyTorch checkpoint (neither a zip archive nor torch's legacy format)")
        scan = _ScanUnpickler(f)
        for _ in range(3):  # protocol version, system info, then the object itself
            scan.load()
    claimed = sum(scan.storages.values())
    if any(n < 0 for n in scan.storages.values()) or claimed > size:
        raise ValueError(f"{path}: unreadable: its tensors claim {claimed:,} bytes of storage, but the file has "
                         f"{size:,} bytes (a damaged or hostile file); nothing was allocated")
    if not all(_tensor_fits(*t) for t in scan.tensors):
        raise ValueError(f"{path}: unreadable: a tensor's size reaches past its storage (a damaged or hostile "
                         "file); nothing was allocated")


def _drop_pages(t: torch.Tensor):
    """Tell the kernel it may drop the (read-only, file-backed) pages under a tensor read through mmap."""
    if not hasattr(mmap, "MADV_DONTNEED") or t.device.type != "cpu":
        return
    page = mmap.PAGESIZE
    start = (t.data_ptr() + page - 1) // page * page
    end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    if end > start:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)


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


# ---------------------------------------------------------------- random checkpoints (benchmarks, tests)

def random_model(config_path, *, family: str | None = None, bits: int = 0, group_size: int | None = None,
                 dtype=torch.float32, device="cpu", overrides: dict | None = None):
    """(model, family, raw config) for an official config.json with random weights, built straight into its final
    storage: quantized layers get random ints and scales, so a 6B model never exists in fp16 first. overrides
    replace config keys (e.g. fewer layers)."""
    from .quantize import check_bits, empty_quantized, half_stored, storage_dtype
    path, device = Path(config_path), torch.device(device)
    raw = {**read_json(path), **(overrides or {})}
    family = family or detect_family(path.parent, raw)
    cfg = glm.GLMConfig.from_dict(raw) if family == "chatglm" else glm2.GLM2Config.from_dict(raw, family)
    check_sizes(cfg, path)
    model = build_model(cfg, device="meta")
    if bits:
        check_bits(bits, group_size)
        empty_quantized(model, bits, group_size)
        if device.type == "cpu":
            half_stored(model)
        cfg.quantization_bit, cfg.quantization_group_size = bits, group_size
    g = torch.Generator(device="cpu").manual_seed(0)
    modules = dict(model.named_modules())
    for name, p in list(model.named_parameters()):
        mod_name, _, leaf = name.rpartition(".")
        t = hugepage_empty(p.shape, p.dtype if p.dtype == torch.int8 or leaf == "weight_scale"
                           else storage_dtype(modules[mod_name], leaf, dtype))
        random_fill_(t, mod_name, leaf, bits, g)
        modules[mod_name]._parameters[leaf] = nn.Parameter(t.to(device), requires_grad=False)
    if getattr(cfg, "tie_word_embeddings", False):
        model.lm_head.weight = model.transformer.word_embeddings.weight
    model.init_buffers()
    return model, family, raw


def write_random_checkpoint(src: Path, out: Path, shard_bytes: int) -> int:
    """A checkpoint folder in the official layout (fp16, sharded safetensors + index) with random weights for the
    config in `src`, whose other files (the tokenizer) are copied beside them; written one shard at a time, so a
    6B folder never sits in memory whole. Returns the number of shards."""
    from collections import Counter

    from safetensors.torch import save_file
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; give a new folder")
    model = build_model(load_config(src), device="meta")  # a bad config fails before anything is written
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".index.json")):
            shutil.copy(f, out / f.name)
    g = torch.Generator().manual_seed(0)
    state = model.state_dict(keep_vars=True)
    uses = Counter(id(p) for p in state.values())
    tied = {}  # ChatGLM-6B's output layer is its embedding: the same tensor under both names
    shards, shard, size = [], {}, 0
    for name, p in state.items():
        t = tied.get(id(p))
        if t is None:
            t = torch.empty(p.shape, dtype=torch.float16).normal_(
                1.0 if "layernorm" in name and name.endswith("weight") else 0.0, 0.02, generator=g)
            if uses[id(p)] > 1:
                tied[id(p)] = t
        shard[name] = t
        size += t.numel() * 2
        if size >= shard_bytes:
            shards.append(list(shard))
            save_file(shard, str(out / f"part-{len(shards)}.safetensors"), metadata={"format": "pt"})
            shard, size = {}, 0
    if shard:
        shards.append(list(shard))
        save_file(shard, str(out / f"part-{len(shards)}.safetensors"), metadata={"format": "pt"})
    weight_map = {}
    for i, keys in enumerate(shards, 1):  # the official names, now that the count is known
        official = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        (out / f"part-{i}.safetensors").rename(out / official)
        weight_map.update({k: official for k in keys})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    return len(shards)


def random_fill_(t: torch.Tensor, mod_name: str, leaf: str, bits: int, g: torch.Generator):
    """A random model's parameter, filled in place (temporaries the size of a weight would inflate the peak
    memory a benchmark measures): quantized weights uniform, scales fixed, norms near 1, the rest N(0, 0.02)."""
    if t.dtype == torch.int8:
        t.random_(-127 if bits == 8 else -128, 128, generator=g)
    elif leaf == "weight_scale":
        t.fill_(0.02 / (127 if bits == 8 else 7))
    elif "norm" in mod_name:
        t.normal_(1.0 if leaf == "weight" else 0.0, 0.02, generator=g)
    else:
        t.normal_(0.0, 0.02, generator=g)
