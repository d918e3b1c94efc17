"""Loading the student and the teacher, choosing what trains (parameter groups, LoRA)."""

from __future__ import annotations

import re

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ..lora import lora_config, target_regex
from ..models import AttnVariantLlamaForCausalLM
from .config import DTYPES, FAMILY_MODEL_TYPES, LORA_FULL_MODULES, PARAMETER_GROUPS, TrainConfig

def _load_causal_lm(path: str, gguf_file: str | None, dtype: torch.dtype, **config_overrides):
    kwargs = dict(dtype=dtype, **config_overrides)
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    model_type = AutoConfig.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {})).model_type
    if model_type in FAMILY_MODEL_TYPES:
        model = AttnVariantLlamaForCausalLM.from_pretrained(path, **kwargs)
    else:  # any other causal LM (plain fine-tuning); remote code only when the user trusts it
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if gguf_file:  # GGUF weights arrive dequantized: drop the quantizer so they train and save like any others
        model.hf_quantizer, model.is_quantized = None, False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model, model_type


def variant_fields(model_config) -> dict:
    """The attention-variant fields of a family config (what distinguishes a conversion from its source)."""
    prefixes = ("attention_variant", "use_rope", "rope_max_wavelength", "stickbreaking_", "layer_shortcut", "shortcut_", "attention_qkv_bias",
                "query_key_norm")
    return {k: v for k, v in sorted(model_config.to_dict().items()) if k.startswith(prefixes)}


def variant_overrides(config: TrainConfig) -> dict:
    names = ("attention_variant", "use_rope", "rope_max_wavelength", "stickbreaking_remainder", "stickbreaking_attend_current",
             "layer_shortcut", "shortcut_mode")
    return {name: getattr(config, name) for name in names if getattr(config, name) is not None}


def load_student(config: TrainConfig):
    """The model to train, and whether it differs from what `config.model` holds on disk (then its base is saved)."""
    overrides = variant_overrides(config)
    model, model_type = _load_causal_lm(config.model, config.gguf_file, DTYPES[config.dtype], **overrides)
    changed = bool(overrides) or config.gguf_file is not None or model_type != "attn_variant_llama"
    return model, changed


def load_teacher(config: TrainConfig):
    model, _ = _load_causal_lm(config.teacher, config.teacher_gguf_file, DTYPES[config.dtype])
    model.eval().requires_grad_(False)
    return model


def select_parameters(model, patterns: list[str]) -> list[str]:
    """Freeze every parameter of `model` except those whose name matches one of `patterns` (group aliases or regexes);
    returns the trained names."""
    regexes = [re.compile(PARAMETER_GROUPS.get(p, p)) for p in (patterns or ["all"])]
    trained = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(any(r.search(name) for r in regexes))
        if parameter.requires_grad:
            trained.append(name)
    if not trained:
        raise ValueError(f"`--train {' '.join(patterns)}` matches no parameter of {type(model).__name__}.")
    return trained


def apply_lora(model, config: TrainConfig):
    from peft import get_peft_model

    modules_to_save = []
    for group in config.train:
        modules_to_save += LORA_FULL_MODULES.get(group, [group])
    kwargs = dict(target_modules=target_regex(config.lora_targets))
    if modules_to_save:
        kwargs["modules_to_save"] = sorted(set(modules_to_save) | ({"shortcut"} if getattr(model.config, "layer_shortcut", False) else set()))
    peft_config = lora_config(model, r=config.lora_r, lora_alpha=config.lora_alpha or 2 * config.lora_r, **kwargs)
    return get_peft_model(model, peft_config)

