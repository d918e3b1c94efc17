"""The AttnVariantLlama family: registered with the transformers Auto classes on import."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_attn_variant_llama import AttnVariantLlamaConfig
from .modeling_attn_variant_llama import (
    AttnVariantLlamaForCausalLM,
    AttnVariantLlamaModel,
    AttnVariantLlamaPreTrainedModel,
)

AutoConfig.register(AttnVariantLlamaConfig.model_type, AttnVariantLlamaConfig, exist_ok=True)
AutoModel.register(AttnVariantLlamaConfig, AttnVariantLlamaModel, exist_ok=True)
AutoModelForCausalLM.register(AttnVariantLlamaConfig, AttnVariantLlamaForCausalLM, exist_ok=True)

__all__ = [
    "AttnVariantLlamaConfig",
    "AttnVariantLlamaForCausalLM",
    "AttnVariantLlamaModel",
    "AttnVariantLlamaPreTrainedModel",
]
