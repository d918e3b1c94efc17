"""LoRA (peft) for the AttnVariantLlama family.

peft has default `target_modules` only for the model types it knows (`"llama": ["q_proj", "v_proj"]`). Importing
this module (which `import hf_attn_variants` does) registers the family's default with peft, so
`get_peft_model(model, LoraConfig(task_type="CAUSAL_LM"))` without `target_modules` targets the seven Llama
projections of every decoder layer (`LORA_TARGET_REGEX`). A model loaded as remote code only (`trust_remote_code=True`
in a process that never imports this package) has no such default: peft then raises its own "Please specify
`target_modules` ... in `peft_config`", and you pass the seven names yourself:
`target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]`.

`lora_config` is the explicit form: the same targets and, when the model has a layer shortcut, that small new module
trained fully (`modules_to_save`): it starts at zero and is needlessly rank-limited through LoRA.
"""

from peft import LoraConfig
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

MODEL_TYPE = "attn_variant_llama"

# The Llama projections every decoder layer has; the names are Llama's, so adapters trained here match Llama's too.
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def target_regex(names=None) -> str:
    """A peft `target_modules` regex for `names` (default: all seven) of the decoder layers only, so the layer
    shortcut's own q/k/v/o projections (trained fully instead) are not wrapped."""
    projections = "|".join(names or LORA_TARGET_MODULES)
    return rf".*\.layers\.\d+\.(self_attn|mlp)\.({projections})"


LORA_TARGET_REGEX = target_regex()


def register_peft_defaults() -> None:
    """Make the family's projections peft's default LoRA targets for `model_type="attn_variant_llama"`.

    peft accepts a regex string as a mapping value (it ships one for gemma4); the list form would also wrap the layer
    shortcut's projections. Idempotent; an entry someone registered before is left alone."""
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault(MODEL_TYPE, LORA_TARGET_REGEX)


register_peft_defaults()


def lora_config(model_or_config, r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.0, **kwargs) -> LoraConfig:
    """A causal-LM `LoraConfig` for `model_or_config` (a family model or its config); `kwargs` go to `LoraConfig`."""
    config = getattr(model_or_config, "config", model_or_config)
    kwargs.setdefault("target_modules", LORA_TARGET_REGEX)
    if getattr(config, "layer_shortcut", False):
        kwargs.setdefault("modules_to_save", ["shortcut"])
    return LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, task_type="CAUSAL_LM", **kwargs)


__all__ = ["LORA_TARGET_MODULES", "LORA_TARGET_REGEX", "lora_config", "register_peft_defaults", "target_regex"]
