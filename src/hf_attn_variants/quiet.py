"""No false alarm when a supported source loads into the family.

`PreTrainedConfig.from_pretrained` warns "You are using a model of type `llama` to instantiate a model of type
`attn_variant_llama`. ... not supported and can yield errors" whenever the checkpoint's model type differs from the
class's, although converting a Llama-style checkpoint on load (`AttnVariantLlamaForCausalLM.from_pretrained(llama,
attention_variant=...)`, a GGUF included) is this package's supported path. Importing the package adds a filter to
that logger which drops the warning for the source types the converter supports (`SUPPORTED_SOURCE_TYPES`); any other
model type still warns.
"""

import logging
import re

SUPPORTED_SOURCE_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # = hf_attn_variants.convert.SUPPORTED_MODEL_TYPES
FAMILY_MODEL_TYPE = "attn_variant_llama"
_MESSAGE = re.compile(r"You are using a model of type `([\w-]+)` to instantiate a model of type `([\w-]+)`")


class SupportedSourceFilter(logging.Filter):
    """Drops transformers' model-type mismatch warning for a supported source loaded into the family."""

    def filter(self, record: logging.LogRecord) -> bool:
        match = _MESSAGE.match(str(record.msg))
        return not (match and match.group(1) in SUPPORTED_SOURCE_TYPES and match.group(2) == FAMILY_MODEL_TYPE)


def install() -> None:
    """Idempotent."""
    logger = logging.getLogger("transformers.configuration_utils")
    if not any(isinstance(f, SupportedSourceFilter) for f in logger.filters):
        logger.addFilter(SupportedSourceFilter())


install()
