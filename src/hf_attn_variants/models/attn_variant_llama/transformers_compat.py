"""The transformers APIs this family uses that moved between the releases it supports (5.4.0 through 5.24.x).

One place for every difference, so the model code reads as if there were one transformers:

- 5.24 renamed the cache argument and output field `past_key_values` -> `cache` (in `generate`, the models and the
  masking utilities). The family's forwards accept both names (`pop_cache_argument`), build masks through
  `create_causal_mask` here, and fill their outputs under the installed release's field name (`CACHE_FIELD`).
- `slice_logits_to_keep` appeared in 5.21 (`modeling_utils`); older releases get the same function from here.
- Continuous batching (`generate_batch`) hands the model a `PagedAttentionCache`: from 5.24 as the model's cache, which
  the attention module updates (as Llama does); before, as an attention kwarg that the paged attention functions update
  (`pop_cache_argument` leaves it there). Its `update(k, v, layer_idx, kwargs=...)` form dates from 5.21 at the latest
  (5.4 took read/write indices): stick-breaking runs paged only from there (`PAGED_STICKBREAKING_MIN_VERSION`).
- 5.3 and older need `cache_position` for masks and lack output capturing: refused at import with a clear message.

This file is shipped as remote code with the model: it imports only torch and transformers.
"""

import inspect

import torch
import transformers
from transformers import masking_utils
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils import logging

logger = logging.get_logger(__name__)

MIN_TRANSFORMERS_VERSION = (5, 4, 0)


def _release(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string such as '5.24.0' or '5.25.0.dev0'."""
    numbers = []
    for part in version.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        numbers.append(int(digits) if digits else 0)
    return tuple(numbers + [0] * (3 - len(numbers)))


if _release(transformers.__version__) < MIN_TRANSFORMERS_VERSION:
    raise ImportError(
        f"The AttnVariantLlama model code needs transformers >= {'.'.join(map(str, MIN_TRANSFORMERS_VERSION))}, but "
        f"transformers {transformers.__version__} is installed (it lacks the cache-position-free masks and output "
        "capturing this model uses). Upgrade with: pip install -U 'transformers>=5.4'"
    )

# Name of the cache in model outputs and in `generate`'s model kwargs: "cache" from 5.24 on, "past_key_values" before.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
_CACHE_NAMES = ("past_key_values", "cache")
_MASK_CACHE_ARGUMENT = (
    "cache" if "cache" in inspect.signature(masking_utils.create_causal_mask).parameters else "past_key_values"
)


try:
    from transformers.generation.continuous_batching.cache import PagedAttentionCache
except ImportError:  # a release without continuous batching
    PagedAttentionCache = None

# From 5.24 continuous batching's paged cache is the model's cache (the attention module updates it, as Llama does);
# before, it travels in the attention kwargs and the paged attention functions update it.
PAGED_CACHE_IS_MODEL_CACHE = CACHE_FIELD == "cache"
# The paged cache's `update(key, value, layer_idx, kwargs=...)`, which the paged stick-breaking path calls.
PAGED_CACHE_UPDATE_TAKES_KWARGS = (
    PagedAttentionCache is not None and "kwargs" in inspect.signature(PagedAttentionCache.update).parameters
)
PAGED_STICKBREAKING_MIN_VERSION = "5.21"  # the oldest release checked to have that `update` (5.4.0 has not)


def is_paged_cache(cache) -> bool:
    """Whether `cache` is continuous batching's `PagedAttentionCache` (packed requests, no `get_seq_length`)."""
    return PagedAttentionCache is not None and isinstance(cache, PagedAttentionCache)


def pop_cache_argument(past_key_values, kwargs: dict):
    """The cache passed to a forward under either name (`past_key_values=`, or `cache=` as 5.24's `generate` does);
    removes `cache` from `kwargs` so it is not handed on twice. Before 5.24 a paged cache stays in `kwargs`: it belongs
    to the attention functions there (see `PAGED_CACHE_IS_MODEL_CACHE`)."""
    cache = kwargs.pop("cache", None)
    if is_paged_cache(cache) and not PAGED_CACHE_IS_MODEL_CACHE:
        kwargs["cache"] = cache
        return past_key_values
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("Pass the cache once, as `past_key_values=` or `cache=`, not both.")
    return cache if cache is not None else past_key_values


def cache_output(cache) -> dict:
    """`{field: cache}` for a model output class of the installed release."""
    return {CACHE_FIELD: cache}


def output_cache(outputs):
    """The cache a model output holds (`outputs.cache` from 5.24 on, `outputs.past_key_values` before)."""
    return getattr(outputs, CACHE_FIELD)


def generation_cache(model_kwargs: dict):
    """The cache `generate` keeps in its model kwargs (under the installed release's name), or None."""
    for name in _CACHE_NAMES:
        if model_kwargs.get(name) is not None:
            return model_kwargs[name]
    return None


def set_generation_cache(model_kwargs: dict, cache) -> None:
    model_kwargs[CACHE_FIELD] = cache


def create_causal_mask(config, inputs_embeds, attention_mask, cache, position_ids):
    """`masking_utils.create_causal_mask` with the cache passed under the installed release's argument name."""
    return masking_utils.create_causal_mask(
        config=config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        **{_MASK_CACHE_ARGUMENT: cache},
    )


try:
    from transformers.modeling_utils import slice_logits_to_keep
except ImportError:  # transformers < 5.21

    def slice_logits_to_keep(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
        """Keep the last `logits_to_keep` positions (0 keeps all), or the positions a 1D index tensor selects."""
        if isinstance(logits_to_keep, int):
            return hidden_states if logits_to_keep == 0 else hidden_states[:, -logits_to_keep:, :]
        return hidden_states[:, logits_to_keep, :]


__all__ = [
    "CACHE_FIELD",
    "PAGED_CACHE_UPDATE_TAKES_KWARGS",
    "PAGED_STICKBREAKING_MIN_VERSION",
    "cache_output",
    "create_causal_mask",
    "generation_cache",
    "is_paged_cache",
    "output_cache",
    "pop_cache_argument",
    "set_generation_cache",
    "slice_logits_to_keep",
]
