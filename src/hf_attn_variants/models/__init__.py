from .attn_variant_llama import (
    AttnVariantLlamaConfig,
    AttnVariantLlamaForCausalLM,
    AttnVariantLlamaModel,
    AttnVariantLlamaPreTrainedModel,
)

__all__ = [
    "AttnVariantLlamaConfig",
    "AttnVariantLlamaForCausalLM",
    "AttnVariantLlamaModel",
    "AttnVariantLlamaPreTrainedModel",
]
