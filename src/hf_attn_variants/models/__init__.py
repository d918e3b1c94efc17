from .attn_variant_llama import (
    AttnVariantLlamaConfig,
    AttnVariantLlamaForCausalLM,
    AttnVariantLlamaForSequenceClassification,
    AttnVariantLlamaForTokenClassification,
    AttnVariantLlamaModel,
    AttnVariantLlamaPreTrainedModel,
)

__all__ = [
    "AttnVariantLlamaConfig",
    "AttnVariantLlamaForCausalLM",
    "AttnVariantLlamaForSequenceClassification",
    "AttnVariantLlamaForTokenClassification",
    "AttnVariantLlamaModel",
    "AttnVariantLlamaPreTrainedModel",
]
