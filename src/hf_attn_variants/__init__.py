"""hf-attn-variants: stick-breaking attention and layerwise attention shortcuts as a transformers model family.

Importing the package registers the `attn_variant_llama` family with `AutoConfig`, `AutoModel`,
`AutoModelForCausalLM`, `AutoModelForSequenceClassification` and `AutoModelForTokenClassification`, and the `"stickbreaking"` attention implementation with transformers' `AttentionInterface`.
"""

from .models import (
    AttnVariantLlamaConfig,
    AttnVariantLlamaForCausalLM,
    AttnVariantLlamaForSequenceClassification,
    AttnVariantLlamaForTokenClassification,
    AttnVariantLlamaModel,
    AttnVariantLlamaPreTrainedModel,
)
from . import lora  # noqa: F401,E402  registers the family's default LoRA targets with peft

__version__ = "0.1.0"

__all__ = [
    "AttnVariantLlamaConfig",
    "AttnVariantLlamaForCausalLM",
    "AttnVariantLlamaForSequenceClassification",
    "AttnVariantLlamaForTokenClassification",
    "AttnVariantLlamaModel",
    "AttnVariantLlamaPreTrainedModel",
    "__version__",
]
