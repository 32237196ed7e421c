# LoRA through peft, on our models as they are: module names are THUDM's, so adapters saved here are in peft's
# format with the original key names, and adapters peft made on THUDM's models load into ours. QLoRA is the same
# over our int4/int8 QuantizedLinear base (peft's LoRA layer around it; the quantized product keeps autograd for
# its input), with the fp16-stored embeddings and output layer of a quantized CPU model made plain again.
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..quantize import HalfEmbedding, HalfLinear, QuantizedLinear, quantize_model
from .policy import raw

TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


def _peft():
    try:
        import peft
    except ImportError:
        raise SystemExit("LoRA needs peft: pip install 'chatglm[train]'") from None
    return peft


def check_targets(model: nn.Module, targets) -> list[str]:
    leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantizedLinear))}
    missing = [t for t in targets if t not in leaves]
    if missing:
        raise ValueError(f"LoRA target {', '.join(missing)} matches no linear module; the model has "
                         f"{', '.join(sorted(leaves))}")
    return list(targets)


def add_lora(model: nn.Module, r: int = 8, alpha: int = 16, dropout: float = 0.0, targets=TARGETS):
    """Wrap the target linears of a ChatGLMModel / ChatGLM2Model (in place) with LoRA adapters; returns the peft
    model. Only the adapters train."""
    peft = _peft()
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                             target_modules=check_targets(model, targets))
    config._register_custom_module({QuantizedLinear: peft.tuners.lora.layer.Linear})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        return peft.get_peft_model(model, config)


def quantize_base(model: nn.Module, bits: int, group_size: int | None = None):
    """QLoRA's base: the block linears quantized (unless they already are); the output layer of a quantized CPU
    model, stored in fp16 for a C kernel without a backward, back in the compute dtype (gradients pass through it).
    The fp16 embedding stays as it is (nothing upstream of it learns), unless the output layer is tied to it."""
    if not any(isinstance(m, QuantizedLinear) for m in model.modules()):
        quantize_model(model, bits, group_size)
    dtype, tied = model.dtype, getattr(model.config, "tie_word_embeddings", False)
    for name, m in list(model.named_modules()):
        if isinstance(m, HalfLinear) or (tied and isinstance(m, HalfEmbedding)):
            new = (nn.Linear(m.in_features, m.out_features, bias=False, device="meta") if isinstance(m, HalfLinear)
                   else nn.Embedding(*m.weight.shape, device="meta"))
            new.weight = nn.Parameter(m.weight.detach().to(dtype), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
    if tied and hasattr(model, "lm_head"):
        model.lm_head.weight = model.transformer.word_embeddings.weight
    return model


def save_adapter(peft_model, folder):
    peft_model.save_pretrained(str(folder))


def load_adapter(model, folder, trainable: bool = False):
    """A peft LoRA adapter folder (adapter_config.json + adapter weights) onto our model; returns the peft model."""
    peft = _peft()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        config = peft.LoraConfig.from_pretrained(str(folder))
        config._register_custom_module({QuantizedLinear: peft.tuners.lora.layer.Linear})
        return peft.PeftModel.from_pretrained(raw(model), str(folder), config=config, is_trainable=trainable)


def merge(peft_model) -> nn.Module:
    """The base model with the adapters folded into its weights (a plain checkpoint; needs an unquantized base)."""
    if any(isinstance(m, QuantizedLinear) for m in peft_model.modules()):
        raise ValueError("merging needs an unquantized base: load the base without --bits, then the adapter")
    with torch.no_grad():
        return peft_model.merge_and_unload()
