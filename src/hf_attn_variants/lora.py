"""LoRA (peft) for the AttnVariantLlama family.

peft has default `target_modules` only for the model types it knows (`"llama": ["q_proj", "v_proj"]`), so a custom
`model_type` needs them spelled out. `lora_config` targets the Llama projections of the decoder layers and, when the
model has a layer shortcut, trains that small new module fully (`modules_to_save`): it starts at zero and is
needlessly rank-limited through LoRA.
"""

from peft import LoraConfig

# The Llama projections every decoder layer has; the names are Llama's, so adapters trained here match Llama's too.
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_config(model_or_config, r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.0, **kwargs) -> LoraConfig:
    """A causal-LM `LoraConfig` for `model_or_config` (a family model or its config); `kwargs` go to `LoraConfig`."""
    config = getattr(model_or_config, "config", model_or_config)
    projections = "|".join(LORA_TARGET_MODULES)
    # A regex, so the shortcut's own q/k/v/o projections (fully trained instead) are not wrapped twice.
    kwargs.setdefault("target_modules", rf".*\.layers\.\d+\.(self_attn|mlp)\.({projections})")
    if getattr(config, "layer_shortcut", False):
        kwargs.setdefault("modules_to_save", ["shortcut"])
    return LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, task_type="CAUSAL_LM", **kwargs)


__all__ = ["LORA_TARGET_MODULES", "lora_config"]
