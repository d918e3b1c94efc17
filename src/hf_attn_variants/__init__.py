"""hf-attn-variants: stick-breaking attention and layerwise attention shortcuts as a transformers model family.

Importing the package registers the `attn_variant_llama` family with `AutoConfig`, `AutoModel`,
`AutoModelForCausalLM`, `AutoModelForSequenceClassification` and `AutoModelForTokenClassification`, and the `"stickbreaking"` attention implementation with transformers' `AttentionInterface`.
`load_adapter(adapter_dir, base=None)` applies an adapter made by `hf-attn-variants train` to its base, building the
base from the source the adapter records when it is not at hand.
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
from . import quiet  # noqa: F401,E402  no "model of type `llama` ... not supported" warning for supported sources
from .lora import load_adapter  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AttnVariantLlamaConfig",
    "AttnVariantLlamaForCausalLM",
    "AttnVariantLlamaForSequenceClassification",
    "AttnVariantLlamaForTokenClassification",
    "AttnVariantLlamaModel",
    "AttnVariantLlamaPreTrainedModel",
    "__version__",
    "load_adapter",
]
