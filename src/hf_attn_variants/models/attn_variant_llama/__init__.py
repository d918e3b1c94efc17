"""The AttnVariantLlama family: registered with the transformers Auto classes on import."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .configuration_attn_variant_llama import AttnVariantLlamaConfig
from .modeling_attn_variant_llama import (
    AttnVariantLlamaForCausalLM,
    AttnVariantLlamaForSequenceClassification,
    AttnVariantLlamaForTokenClassification,
    AttnVariantLlamaModel,
    AttnVariantLlamaPreTrainedModel,
)

AutoConfig.register(AttnVariantLlamaConfig.model_type, AttnVariantLlamaConfig, exist_ok=True)
AutoModel.register(AttnVariantLlamaConfig, AttnVariantLlamaModel, exist_ok=True)
AutoModelForCausalLM.register(AttnVariantLlamaConfig, AttnVariantLlamaForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(AttnVariantLlamaConfig, AttnVariantLlamaForSequenceClassification, exist_ok=True)
AutoModelForTokenClassification.register(AttnVariantLlamaConfig, AttnVariantLlamaForTokenClassification, exist_ok=True)

__all__ = [
    "AttnVariantLlamaConfig",
    "AttnVariantLlamaForCausalLM",
    "AttnVariantLlamaForSequenceClassification",
    "AttnVariantLlamaForTokenClassification",
    "AttnVariantLlamaModel",
    "AttnVariantLlamaPreTrainedModel",
]
