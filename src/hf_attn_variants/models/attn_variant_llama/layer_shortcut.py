"""Layerwise attention shortcuts (Verma & Pilanci, arXiv 2409.10870): the final layer attends to intermediate layers.

The shortcut reads the outputs h_l of the source layers l in S (`config.shortcut_sources`) and adds

    o_proj(attention(q = q_proj(RMSNorm(h_final)), keys/values = k_proj/v_proj(s_l)))

to the final layer's output, before the model's final norm, where s_l = RMSNorm_l(h_l) (optional) followed by
s_l + MLP_l(s_l) (optional). `o_proj` is zero-initialised, so a model with a fresh shortcut computes exactly the
function of the model without it (adding zeros is bit-exact), and gradients still reach `o_proj` at the first step.

Two modes (`config.shortcut_mode`):

- `"depth"`: token t attends over {s_l[t] : l in S}, a softmax over |S| items per head (fp32). No mask, no cache, no
  position encoding (query and keys share the position). The key/value projections are folded into the query and the
  mixed sources (q . W_k s_l = (W_k^T q) . s_l and sum_l a_l W_v s_l = W_v sum_l a_l s_l), so the cost is that of four
  d x d projections per token however many sources there are. The per-source RMSNorm is folded the same way: its
  weight multiplies the stacked sources once, its 1 / rms scales the scores and the mixing weights.
- `"depth_context"`: token t attends over {s_l[p] : l in S, p <= t, p not padding}, one softmax over |S| * t keys.
  Computed exactly as one causal attention per source, merged by log-sum-exp (never a |S| * T key set per query).
  Queries and keys get rotary embeddings of the token positions when the model uses RoPE. At decode time the keys and
  values of every source are kept in |S| extra layers of the generation cache (`AttnVariantLlamaShortcutCache`).

Keys and values have `config.shortcut_key_value_heads` heads (grouped-query attention, like the model's layers):
query head h reads key/value head h // (heads / kv_heads).

The attention weights returned with the output are (B, heads, T, |S|): the depth softmax in `"depth"` mode, the
probability mass each source layer receives (summed over positions) in `"depth_context"` mode.

This file is shipped as remote code: it imports only torch, transformers and its flat siblings.
"""

import copy

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, StaticCache, StaticLayer
from transformers.masking_utils import find_packed_sequence_indices
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, rotate_half

from transformers.utils import logging

from .configuration_attn_variant_llama import AttnVariantLlamaConfig

logger = logging.get_logger(__name__)

# Linear layers tagged with this attribute are zero-initialised by `AttnVariantLlamaPreTrainedModel._init_weights`
# (transformers would otherwise re-draw every nn.Linear from N(0, initializer_range) in `post_init`/`from_pretrained`).
ZERO_INIT_ATTRIBUTE = "_attn_variant_zero_init"


def zero_init_linear(in_features: int, out_features: int) -> nn.Linear:
    """A bias-free Linear that starts at zero and keeps that value through transformers' weight initialisation."""
    linear = nn.Linear(in_features, out_features, bias=False)
    nn.init.zeros_(linear.weight)
    setattr(linear, ZERO_INIT_ATTRIBUTE, True)
    return linear


def uses_shortcut_cache(config: AttnVariantLlamaConfig) -> bool:
    """Whether the model needs the extra cache layers of the `depth_context` shortcut at decode time."""
    return bool(config.layer_shortcut) and config.shortcut_mode == "depth_context"


class ShortcutCacheMixin:
    """Keeps the `depth_context` shortcut's keys and values, one cache layer per source, in `self.shortcut_cache` (a
    `Cache` of |S| layers) *beside* the model's layers: the cache still has one layer per decoder layer, as
    transformers' contract says, and every operation that acts on all layers (`reorder_cache` for beam search,
    `crop`, `batch_repeat_interleave`, `batch_select_indices`, `reset`) acts on the shortcut's layers too."""

    shortcut_cache: Cache

    def reorder_cache(self, *args, **kwargs):
        super().reorder_cache(*args, **kwargs)
        self.shortcut_cache.reorder_cache(*args, **kwargs)

    def crop(self, *args, **kwargs):
        super().crop(*args, **kwargs)
        self.shortcut_cache.crop(*args, **kwargs)

    def batch_repeat_interleave(self, *args, **kwargs):
        super().batch_repeat_interleave(*args, **kwargs)
        self.shortcut_cache.batch_repeat_interleave(*args, **kwargs)

    def batch_select_indices(self, *args, **kwargs):
        super().batch_select_indices(*args, **kwargs)
        self.shortcut_cache.batch_select_indices(*args, **kwargs)

    def reset(self, *args, **kwargs):
        super().reset(*args, **kwargs)
        self.shortcut_cache.reset(*args, **kwargs)


class AttnVariantLlamaShortcutCache(ShortcutCacheMixin, DynamicCache):
    """`DynamicCache` of the model's L layers plus the shortcut's |S| source layers (`shortcut_cache`), which
    `forward(use_cache=True)` and `generate` create for a `depth_context` model."""

    def __init__(self, config: AttnVariantLlamaConfig, **kwargs):
        super().__init__(config=config, **kwargs)
        self.shortcut_cache = Cache(layers=[DynamicLayer() for _ in config.shortcut_sources])


class AttnVariantLlamaShortcutStaticCache(ShortcutCacheMixin, StaticCache):
    """`StaticCache` of the model's L layers plus the shortcut's |S| source layers, each preallocated to
    `max_cache_len` (what `generate(cache_implementation="static")` creates for a `depth_context` model)."""

    def __init__(self, config: AttnVariantLlamaConfig, max_cache_len: int, **kwargs):
        super().__init__(config=config, max_cache_len=max_cache_len, **kwargs)
        self.shortcut_cache = Cache(layers=[StaticLayer(max_cache_len=max_cache_len) for _ in config.shortcut_sources])


class ShortcutSourceRMSNorm(nn.Module):
    """One RMSNorm per source layer, all applied in one pass: weight (|S|, d) on stacked sources (..., |S|, d).

    The formula is `LlamaRMSNorm`'s (float32 statistics; a float64 model keeps float64); one module instead of |S|
    saves kernel launches when decoding token by token.
    "RMSNorm" in the class name makes transformers' `_init_weights` set the weight to ones.
    """

    def __init__(self, num_sources: int, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_sources, hidden_size))
        self.variance_epsilon = eps

    def inverse_rms(self, stacked_sources: torch.Tensor) -> torch.Tensor:
        """1 / sqrt(mean(s^2) + eps) over the last dim, in float32 (float64 stays float64), without a squared copy."""
        dtype = torch.promote_types(stacked_sources.dtype, torch.float32)
        norm = torch.linalg.vector_norm(stacked_sources, dim=-1, dtype=dtype)
        return torch.rsqrt(norm.square() / stacked_sources.shape[-1] + self.variance_epsilon)

    def forward(self, stacked_sources: torch.Tensor) -> torch.Tensor:
        input_dtype = stacked_sources.dtype
        normalised = stacked_sources.to(torch.promote_types(input_dtype, torch.float32))  # float64 stays float64
        normalised = normalised * self.inverse_rms(stacked_sources).unsqueeze(-1)
        return self.weight * normalised.to(input_dtype)


class ShortcutFeatureMLP(nn.Module):
    """The paper's learned feature map of one source layer, as a residual: s + W_out SiLU(W_in s), W_out zero-init."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.in_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.out_proj = zero_init_linear(hidden_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.out_proj(nn.functional.silu(self.in_proj(hidden_states)))


class AttnVariantLlamaLayerShortcut(GradientCheckpointingLayer):
    r"""
    Attention of the final layer's output over the outputs of the source layers; see the module docstring.

    Args:
        config (`AttnVariantLlamaConfig`):
            Reads `shortcut_mode`, `shortcut_sources`, `shortcut_heads`, `shortcut_key_value_heads`,
            `shortcut_feature_mlp`, `shortcut_normalize_sources`, `hidden_size`, `rms_norm_eps`, `num_hidden_layers`
            and `rope_enabled`.

    Inputs:
        hidden_states (`torch.Tensor`): (B, T, d) output of the final decoder layer (before the model's norm).
        *source_states (`torch.Tensor`): one (B, T, d) output per source layer, in `config.shortcut_sources` order.
            Positional, so reentrant activation checkpointing sees them as inputs.
        attention_mask (`torch.Tensor`, *optional*): the model's 2D padding mask (B, past + T), 1 = real token, or a
            4D boolean / additive mask. Only used in `depth_context` mode.
        position_ids (`torch.LongTensor`, *optional*): (B or 1, T) token positions (RoPE and packed sequences).
        past_key_values (`Cache`, *optional*): `depth_context` mode keeps keys/values in its `shortcut_cache`.

    Returns:
        `(hidden_states + shortcut, attention_weights)`, the weights of shape (B, heads, T, |S|) in float32 (float64 for a
        float64 model).
    """

    def __init__(self, config: AttnVariantLlamaConfig):
        super().__init__()
        hidden_size = config.hidden_size
        self.mode = config.shortcut_mode
        self.source_layers = config.shortcut_sources
        self.num_model_layers = config.num_hidden_layers
        self.num_heads = config.shortcut_heads
        self.num_kv_heads = config.shortcut_key_value_heads
        self.num_kv_groups = self.num_heads // self.num_kv_heads
        self.head_dim = hidden_size // self.num_heads
        self.scaling = self.head_dim**-0.5

        self.query_norm = LlamaRMSNorm(hidden_size, eps=config.rms_norm_eps)
        self.source_norm = None
        if config.shortcut_normalize_sources:
            # Residual-stream norms grow with depth: without a per-source norm, deep sources dominate the keys.
            self.source_norm = ShortcutSourceRMSNorm(len(self.source_layers), hidden_size, config.rms_norm_eps)
        self.feature_mlps = None
        if config.shortcut_feature_mlp:
            self.feature_mlps = nn.ModuleList(ShortcutFeatureMLP(hidden_size) for _ in self.source_layers)
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = zero_init_linear(hidden_size, hidden_size)

        self.rotary_emb = None
        if self.mode == "depth_context" and config.rope_enabled:
            # The shortcut's head size may differ from the model's: same RoPE settings, its own head_dim.
            rope_config = copy.deepcopy(config)
            rope_config.head_dim = self.head_dim
            self.rotary_emb = LlamaRotaryEmbedding(config=rope_config)

    def source_features(self, source_states: tuple[torch.Tensor, ...], device: torch.device) -> torch.Tensor:
        """s_l for every source, stacked (B, T, |S|, d): the (normalised, feature-mapped) inputs of keys and values."""
        # With `device_map="auto"` the sources may live on other devices than the final layer.
        stacked = torch.stack([source.to(device) for source in source_states], dim=2)
        if self.source_norm is not None:
            stacked = self.source_norm(stacked)
        if self.feature_mlps is not None:
            stacked = torch.stack([mlp(stacked[:, :, k]) for k, mlp in enumerate(self.feature_mlps)], dim=2)
        return stacked

    def forward(
        self,
        hidden_states: torch.Tensor,
        *source_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if len(source_states) != len(self.source_layers):
            raise ValueError(f"Expected {len(self.source_layers)} source states, got {len(source_states)}.")
        query = self.q_proj(self.query_norm(hidden_states))
        if self.mode == "depth":
            attn_output, attn_weights = self.depth_attention(query, source_states)
        else:
            stacked_sources = self.source_features(source_states, hidden_states.device)
            attn_output, attn_weights = self.depth_context_attention(
                query, stacked_sources, attention_mask, position_ids, past_key_values
            )
        return hidden_states + self.o_proj(attn_output), attn_weights

    def depth_attention(
        self, query: torch.Tensor, source_states: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax over the sources at the query's own position, with k_proj/v_proj folded into query and output.

        Without feature MLPs the source RMSNorm is folded too: s_l = w_l * h_l / rms(h_l), so the sources are stacked
        once and multiplied by w_l (in place at inference), and 1 / rms(h_l) (B, T, |S|) scales the scores and the
        mixing weights instead of a normalised copy of every source.
        """
        batch, length, hidden_size = query.shape
        device, dtype = query.device, query.dtype
        kv_heads, groups = self.num_kv_heads, self.num_kv_groups
        inverse_rms = None
        if self.feature_mlps is not None:
            stacked_sources = self.source_features(source_states, device)
        else:
            # With `device_map="auto"` the sources may live on other devices than the final layer.
            stacked_sources = torch.stack([source.to(device) for source in source_states], dim=2)  # (B, T, |S|, d)
            if self.source_norm is not None:
                inverse_rms = self.source_norm.inverse_rms(stacked_sources)[:, :, None, :]  # (B, T, 1, |S|)
                weight = self.source_norm.weight.to(dtype)
                in_place = not (torch.is_grad_enabled() and (stacked_sources.requires_grad or weight.requires_grad))
                stacked_sources = stacked_sources.mul_(weight) if in_place else stacked_sources * weight

        query = query.view(batch, length, kv_heads, groups, self.head_dim)
        key_weight = self.k_proj.weight.view(kv_heads, self.head_dim, hidden_size)
        value_weight = self.v_proj.weight.view(kv_heads, self.head_dim, hidden_size)
        # (W_k^T q) per query head (k, g), which reads key/value head k: (B, T, H, d).
        query_in_source_space = torch.einsum("btkge,ked->btkgd", query, key_weight).flatten(2, 3)
        scores = torch.matmul(query_in_source_space, stacked_sources.transpose(-1, -2))  # (B, T, H, |S|)
        scores = scores.to(softmax_dtype(dtype)) * self.scaling
        if inverse_rms is not None:
            scores = scores * inverse_rms
        probabilities = scores.softmax(dim=-1)
        mixing = probabilities if inverse_rms is None else probabilities * inverse_rms
        mixed_sources = torch.matmul(mixing.to(dtype), stacked_sources)  # (B, T, H, d)
        mixed_sources = mixed_sources.view(batch, length, kv_heads, groups, hidden_size)
        attn_output = torch.einsum("btkgd,ked->btkge", mixed_sources, value_weight).reshape(batch, length, hidden_size)
        return attn_output, probabilities.transpose(1, 2)  # (B, heads, T, |S|)

    def depth_context_attention(
        self,
        query: torch.Tensor,
        stacked_sources: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        past_key_values: Cache | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One causal attention per source over its cached and new keys, merged by log-sum-exp into the joint softmax."""
        batch, length, hidden_size = query.shape
        heads_shape = (batch, length, self.num_heads, self.head_dim)
        query = query.view(heads_shape).transpose(1, 2)  # (B, H, T, D)
        shortcut_cache = None if past_key_values is None else self.shortcut_cache_of(past_key_values)
        past_length = 0 if shortcut_cache is None else int(shortcut_cache.get_seq_length())
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + length, device=query.device)[None]
        position_embeddings = self.rotary_emb(query, position_ids) if self.rotary_emb is not None else None
        if position_embeddings is not None:
            query = apply_rope(query, *position_embeddings)

        # Keys and values of all sources in one projection each (fewer, larger kernels); heads of source k are the
        # k-th group of `num_kv_heads` in dim 1. Every source gets the same token positions.
        stacked_shape = (batch, length, len(self.source_layers) * self.num_kv_heads, self.head_dim)
        all_keys = self.k_proj(stacked_sources).view(stacked_shape).transpose(1, 2)  # (B, |S| H, T, D)
        all_values = self.v_proj(stacked_sources).view(stacked_shape).transpose(1, 2)
        if position_embeddings is not None:
            all_keys = apply_rope(all_keys, *position_embeddings)

        fused = use_fused_cpu_attention(query, all_keys, all_values)
        outputs, log_normalisers, mask, is_causal = [], [], None, False
        per_source = zip(all_keys.split(self.num_kv_heads, dim=1), all_values.split(self.num_kv_heads, dim=1))
        for source_index, (key, value) in enumerate(per_source):
            if shortcut_cache is not None:
                key, value = shortcut_cache.update(key, value, source_index)
                # A static layer returns its whole buffer: keep the positions written so far.
                key, value = key[:, :, : past_length + length], value[:, :, : past_length + length]
            if mask is None:  # every source has the same key positions: build the mask once
                # Like transformers, packed sequences are only detected without a cache (training).
                packed_position_ids = position_ids if past_key_values is None else None
                mask = context_mask(attention_mask, packed_position_ids, batch, length, key.shape[2], query.device)
                kernel_mask = mask
                if fused:  # the kernel skips the masked blocks of a plain causal mask, and needs no mask at all
                    kernel_mask, is_causal = fused_kernel_mask(mask, query.dtype)
            if fused:
                output, log_normaliser = fused_cpu_attention_with_log_normaliser(
                    query, key, value, kernel_mask, self.scaling, is_causal=is_causal
                )
            else:
                output, log_normaliser = attention_with_log_normaliser(query, key, value, kernel_mask, self.scaling)
            outputs.append(output)
            log_normalisers.append(log_normaliser)

        # Joint softmax over all (source, position) keys: source l's share is exp(lse_l - logsumexp_l lse_l).
        log_normalisers = torch.stack(log_normalisers, dim=-1)  # (B, H, T, |S|)
        total = log_normalisers.logsumexp(dim=-1, keepdim=True)
        # Queries that see no key at all (left padding) get weight 0 instead of exp(-inf + inf) = NaN.
        source_mass = torch.exp(log_normalisers - total.nan_to_num(neginf=0.0))
        if fused:  # the fused kernel reports log-sum-exp 0, not -inf, for a query without visible keys
            source_mass = source_mass * mask.any(dim=-1, keepdim=True)
        attn_output = sum(source_mass[..., k, None] * output for k, output in enumerate(outputs))
        attn_output = attn_output.to(query.dtype).transpose(1, 2).reshape(batch, length, hidden_size)
        return attn_output, source_mass

    @staticmethod
    def shortcut_cache_of(past_key_values: Cache) -> Cache:
        """The cache layers of the shortcut's sources, or a clear error for a cache built without them."""
        shortcut_cache = getattr(past_key_values, "shortcut_cache", None)
        if shortcut_cache is None:
            raise ValueError(
                "`shortcut_mode`='depth_context' keeps keys/values of each source layer in the cache, but "
                f"{type(past_key_values).__name__} has no room for them; pass `AttnVariantLlamaShortcutCache(config)` "
                "or `AttnVariantLlamaShortcutStaticCache(config, max_cache_len)` (what the model and `generate` create "
                "by default)."
            )
        return shortcut_cache


def softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmaxes run in float32 at least (bf16/fp16 scores lose the small weights), float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def apply_rope(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of (B, H, T, D) states with (B, T, D) cos/sin (Llama's formula, one tensor at a time)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return states * cos + rotate_half(states) * sin


def context_mask(
    attention_mask: torch.Tensor | None,
    packed_position_ids: torch.LongTensor | None,
    batch: int,
    query_length: int,
    key_length: int,
    device: torch.device,
) -> torch.Tensor:
    """Boolean (B or 1, 1, T_q, T_k) mask, True = may attend: causal (queries are the last T_q of the T_k positions),
    minus padded keys (2D mask), or else within the same packed sequence (when `packed_position_ids` restart), or a
    given 4D mask (boolean, or additive where 0 = attend)."""
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        return mask[..., -query_length:, :key_length].to(device)
    past_length = key_length - query_length
    query_positions = torch.arange(past_length, key_length, device=device)
    mask = (torch.arange(key_length, device=device)[None, :] <= query_positions[:, None])[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :key_length].to(device=device, dtype=torch.bool)
    elif packed_position_ids is not None:
        sequence_ids = find_packed_sequence_indices(packed_position_ids.expand(batch, -1).to(device))
        if sequence_ids is not None:
            mask = mask & (sequence_ids[:, None, :, None] == sequence_ids[:, None, None, :])
    return mask


def attention_with_log_normaliser(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention in float32 (or float64) returning (output (B, H, T_q, D), log-sum-exp of the scores
    (B, H, T_q)). Differentiable through both. A query with every key masked gets output 0 and log-sum-exp -inf, so
    it adds nothing to the merge. Keys and values may have fewer heads K than the query (grouped-query attention:
    query head h reads key/value head h // (H / K)); they are broadcast over the group, never repeated.
    """
    heads, kv_heads = query.shape[1], key.shape[1]
    if kv_heads != heads:
        grouped_query = query.unflatten(1, (kv_heads, heads // kv_heads))  # (B, K, H / K, T_q, D)
        output, log_normaliser = attention_with_log_normaliser(
            grouped_query, key.unsqueeze(2), value.unsqueeze(2), mask.unsqueeze(2), scaling
        )
        return output.flatten(1, 2), log_normaliser.flatten(1, 2)
    dtype = softmax_dtype(query.dtype)
    scores = torch.matmul(query.to(dtype), key.to(dtype).transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).detach().nan_to_num(neginf=0.0)  # detach: the result doesn't depend on it
    weights = torch.exp(scores - row_max)
    normaliser = weights.sum(dim=-1, keepdim=True)
    output = torch.matmul(weights, value.to(dtype)) / normaliser.masked_fill(normaliser == 0, 1.0)
    return output, (row_max + normaliser.log()).squeeze(-1)


# PyTorch's fused CPU attention kernel also returns the log-sum-exp; it is an internal op, so it is optional.
_FUSED_CPU_ATTENTION = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def use_fused_cpu_attention(*tensors: torch.Tensor) -> bool:
    """The fused kernel serves inference on CPU only: its log-sum-exp output has no gradient."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return _FUSED_CPU_ATTENTION is not None and tensors[0].device.type == "cpu" and not needs_grad


def _disable_fused_cpu_attention(error: Exception) -> None:
    """The private op changed or failed in this torch release: use the public path from now on."""
    global _FUSED_CPU_ATTENTION
    _FUSED_CPU_ATTENTION = None
    logger.warning_once(f"PyTorch's fused CPU attention op failed ({error}); using the plain PyTorch path instead.")


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask (True = attend) as the additive 0 / -inf mask that the fused kernel takes."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def fused_kernel_mask(mask: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor | None, bool]:
    """What the fused kernel needs for a boolean (B or 1, 1, T_q, T_k) mask: `(None, False)` when every key is visible
    (decoding without padding), `(None, True)` for the plain causal mask of a prefill (T_q == T_k, no padding: the
    kernel then skips the blocks above the diagonal, half the work), else `(additive mask, False)`. Under
    torch.compile always the additive mask (the same result; the shortcuts' checks read data, a graph break)."""
    if torch.compiler.is_compiling():
        return additive_mask(mask, dtype), False
    if bool(mask.all()):
        return None, False
    query_length, key_length = mask.shape[-2:]
    if query_length == key_length:
        causal = torch.ones(query_length, key_length, dtype=torch.bool, device=mask.device).tril()
        if torch.equal(mask, causal.expand(mask.shape)):
            return None, True
    return additive_mask(mask, dtype), False


def fused_cpu_attention_with_log_normaliser(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_with_log_normaliser` through the fused CPU kernel (`mask` additive, in the query's dtype, or None;
    `is_causal` means the top-left aligned causal mask, only right for T_q == T_k)."""
    try:
        output, log_normaliser = _FUSED_CPU_ATTENTION(
            query, key, value, 0.0, is_causal, attn_mask=mask, scale=scaling
        )[:2]
    except (RuntimeError, TypeError) as error:
        _disable_fused_cpu_attention(error)
        if mask is None:
            query_length, key_length = query.shape[-2], key.shape[-2]
            mask = torch.ones(query_length, key_length, dtype=torch.bool, device=query.device)
            mask = mask.tril() if is_causal else mask
        else:
            mask = mask == 0
        return attention_with_log_normaliser(query, key, value, mask, scaling)
    dtype = softmax_dtype(query.dtype)
    return output.to(dtype), log_normaliser.to(dtype)


__all__ = ["AttnVariantLlamaLayerShortcut", "AttnVariantLlamaShortcutCache", "AttnVariantLlamaShortcutStaticCache"]
