# AutoTokenizer / AutoModel: the model cards' entry points, without trust_remote_code.
from __future__ import annotations

import torch

from . import checkpoint as load
from .chat import ChatGLM
from .quantize import check_bits, empty_quantized, half_stored, quantizable, storage_dtype
from .tokenizer import ChatGLM2Tokenizer, ChatGLM3Tokenizer, ChatGLMTokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of float32, float16, bfloat16")
    return DTYPES[dtype]


class AutoTokenizer:
    @staticmethod
    def from_pretrained(name_or_path, family: str | None = None, trust_remote_code=None, **kwargs):
        """A checkpoint folder (or hub id) -> its tokenizer. trust_remote_code is accepted and ignored:
        no code from the folder is ever run."""
        folder = load.resolve(name_or_path)
        if (folder / "ice_text.model").exists() and family in (None, "chatglm"):
            return ChatGLMTokenizer(str(folder / "ice_text.model"))
        if not (folder / "tokenizer.model").exists():
            raise FileNotFoundError(f"{folder}: no tokenizer (expected ice_text.model or tokenizer.model)")
        if family is None:
            config = load.read_json(folder / "config.json") if (folder / "config.json").exists() else {}
            family = load.detect_family(folder, config) if config else "chatglm3"
        if family == "chatglm":
            raise FileNotFoundError(f"{folder}: ChatGLM-6B needs ice_text.model")
        cls = ChatGLM2Tokenizer if family == "chatglm2" else ChatGLM3Tokenizer
        return cls(str(folder / "tokenizer.model"))


class AutoModel:
    @staticmethod
    def from_pretrained(name_or_path, dtype=None, device=None, family: str | None = None,
                        quantization_bit: int = 0, quantization_group_size: int | None = None, torch_dtype=None,
                        trust_remote_code=None, **kwargs) -> ChatGLM:
        """Load a checkpoint folder (or hub id). dtype defaults to float32 on CPU and the checkpoint's dtype on
        GPUs; device defaults to cpu; torch_dtype is an alias of dtype. quantization_bit=4 or 8 quantizes the
        transformer blocks while the shards stream in (see chatglm.quantize); a pre-quantized checkpoint
        (quantization_bit in its config.json) loads as it is."""
        if kwargs:
            raise TypeError(f"unexpected arguments: {', '.join(sorted(kwargs))}")
        folder = load.resolve(name_or_path)
        raw = load.read_json(folder / "config.json", " (is this a checkpoint folder?)")
        cfg = load.load_config(folder, family)
        generation = load.load_generation_config(folder)
        device = torch.device(device or "cpu")
        dtype = parse_dtype(dtype or torch_dtype)
        if dtype is None:
            dtype = torch.float32 if device.type == "cpu" else parse_dtype(cfg.torch_dtype)
        shards = load.weight_shards(folder)
        load.check_weights_fit(cfg, folder, shards)
        model = load.build_model(cfg, device="meta")
        bits, group = quantization_plan(cfg, quantization_bit, quantization_group_size)
        if bits:
            empty_quantized(model, bits, group)
            if device.type == "cpu":
                half_stored(model)  # embeddings and output layer in fp16: what the checkpoint holds, half of fp32
        check_device(model, dtype, device, bits)
        load.load_weights(model, shards, dtype, device, quantize=bool(quantization_bit))
        if bits:
            model.config.quantization_bit, model.config.quantization_group_size = bits, group
        out = ChatGLM(model, getattr(cfg, "family", "chatglm"), raw, generation).eval()
        return out


GB = 1e9
HEADROOM = 0.5 * GB  # activations of a prefill and a short KV cache, on top of the weights


def check_device(model, dtype: torch.dtype, device: torch.device, bits: int = 0):
    """Clear errors before any weight moves to a GPU: no CUDA device, an index past the devices, bf16 on a card
    without it, or a model that does not fit in the card's free memory (its weights as they will be stored,
    counted on the meta-device model, plus HEADROOM)."""
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"device {device}: {why} (torch {torch.__version__}); use device='cpu'")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= count:
        raise ValueError(f"device {device}: this machine has {count} CUDA device{'s' if count > 1 else ''} "
                         f"(cuda:0{f'..cuda:{count - 1}' if count > 1 else ''})")
    name = f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    major, minor = torch.cuda.get_device_capability(index)
    if dtype == torch.bfloat16 and major < 8:
        raise ValueError(f"{name} has compute capability {major}.{minor}: bfloat16 needs 8.0 (Ampere) or newer; "
                         "load with dtype=torch.float16")
    need = weight_bytes(model, dtype)
    free, total = torch.cuda.mem_get_info(index)
    if need + HEADROOM > free:
        what = f"int{bits} weights" if bits else f"{str(dtype).split('.')[-1]} weights"
        hint = ""
        if not bits:
            hint = "; quantization_bit=8 needs about {:.1f} GB, quantization_bit=4 about {:.1f} GB".format(
                *((weight_bytes(model, dtype, b) + HEADROOM) / GB for b in (8, 4)))
        raise ValueError(f"the model needs about {(need + HEADROOM) / GB:.1f} GB of GPU memory ({need / GB:.1f} GB of "
                         f"{what} + {HEADROOM / GB:.1f} GB for activations and the KV cache); {name} has "
                         f"{free / GB:.1f} GB free of {total / GB:.1f} GB{hint}")


def weight_bytes(model, dtype: torch.dtype, bits: int = 0) -> int:
    """Bytes of a (meta-device) model's weights as they will be stored in `dtype`; with `bits`, as if its block
    linears were quantized to that many bits (int weights and fp16 scales)."""
    total, seen = 0, set()
    for name, module in model.named_modules():
        for leaf, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if bits and leaf == "weight" and quantizable(name, module):
                total += p.numel() * bits // 8 + p.shape[0] * 2
                continue
            stored = storage_dtype(module, leaf, dtype) or p.dtype
            total += p.numel() * torch.empty((), dtype=stored).element_size()
    return total


def quantization_plan(cfg, bits: int, group_size: int | None):
    """(bits, group_size) to build with: the request, or what a pre-quantized checkpoint holds."""
    stored = cfg.quantization_bit or 0
    if getattr(cfg, "quantization_embeddings", False):
        raise ValueError("config.json: quantization_embeddings (chatglm-6b-int4-qe) is not supported")
    if stored:
        check_bits(stored, cfg.quantization_group_size)
        if bits and (bits != stored or (group_size or None) != cfg.quantization_group_size):
            raise ValueError(f"the checkpoint is already quantized to {stored} bits; load it without "
                             "quantization_bit, or load the unquantized checkpoint")
        return stored, cfg.quantization_group_size
    if bits:
        check_bits(bits, group_size)
        return bits, group_size
    if group_size:
        raise ValueError("quantization_group_size needs quantization_bit")
    return 0, None
