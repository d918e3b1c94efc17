"""AttnVariantLlama: the Llama architecture with swappable token attention and an optional layerwise shortcut.

Parameter names equal `LlamaForCausalLM`'s, so a Llama state dict loads unchanged. The blocks that are identical to
Llama (RMSNorm, MLP, rotary embedding, eager attention) are imported from transformers rather than copied.

This folder is shipped as remote code: it imports only torch, transformers and its flat siblings.
"""

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.generation import GenerationMixin
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.modeling_layers import (
    GenericForSequenceClassification,
    GenericForTokenClassification,
    GradientCheckpointingLayer,
)
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .transformers_compat import (  # first: refuses unsupported transformers releases with a clear message
    PAGED_CACHE_UPDATE_TAKES_KWARGS,
    PAGED_STICKBREAKING_MIN_VERSION,
    cache_output,
    create_causal_mask,
    output_cache,
    generation_cache,
    is_paged_cache,
    pop_cache_argument,
    set_generation_cache,
    slice_logits_to_keep,
)
from .configuration_attn_variant_llama import AttnVariantLlamaConfig
from .layer_shortcut import (
    ZERO_INIT_ATTRIBUTE,
    AttnVariantLlamaLayerShortcut,
    AttnVariantLlamaShortcutCache,
    AttnVariantLlamaShortcutStaticCache,
    uses_shortcut_cache,
)
from .stickbreaking_torch import (
    STICKBREAKING_ATTENTION_NAME,
    _packed_request_bounds,
    cpu_kernels_compile_fullgraph,
    eager_paged_stickbreaking_attention_forward,
    eager_stickbreaking_attention_forward,
    paged_stickbreaking_attention_forward,
    register_stickbreaking_attention,
    stickbreaking_attention_forward,
)

logger = logging.get_logger(__name__)

register_stickbreaking_attention()

# `attn_implementation` names that select a model-level option rather than a token-attention function.
SHORTCUT_ATTN_IMPLEMENTATION = "shortcut"
# How stick-breaking can run: "eager" (and continuous batching's "paged|eager", to which it switches "eager") is the
# reference that returns the weights, the others the blockwise/Triton op.
STICKBREAKING_REFERENCE_IMPLEMENTATIONS = ("eager", "paged|eager")
STICKBREAKING_ATTN_IMPLEMENTATIONS = ("eager", "sdpa", STICKBREAKING_ATTENTION_NAME, "paged|eager")


def check_stickbreaking_implementation(implementation: str | None) -> None:
    """Refuse an implementation that cannot run stick-breaking: any other name is a softmax backend (flash, flex, or a
    host's own, e.g. vLLM's transformers backend writes "vllm" into the config), which would silently compute softmax
    attention, or none at all where the host keeps the KV cache."""
    if implementation is not None and implementation not in STICKBREAKING_ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"`attn_implementation`={implementation!r} cannot run stick-breaking attention "
            f"(`attention_variant`='stickbreaking'); use one of {list(STICKBREAKING_ATTN_IMPLEMENTATIONS)}, or set "
            "`config.attention_variant = 'softmax'` first to run softmax attention."
        )


@torch.compiler.disable  # one host sync per call to split the packed requests
def paged_sdpa_per_request_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, cu_seq_lens_q=None, cu_seq_lens_k=None,
    **kwargs,
):
    """Softmax under continuous batching on CPU: SDPA per packed request over its own past + new keys (its queries at
    their end), instead of every packed query against every packed key through a block-diagonal mask (what "sdpa"
    runs there; flash's varlen kernels, which avoid that, are CUDA-only). A batch of 16 requests of ~600 keys then
    costs each query its own keys, not all ~10k: several times faster per step. Rows of no request are zero."""
    if dropout:
        raise ValueError(f"`dropout` is not supported under continuous batching, got {dropout!r}.")
    requests = _packed_request_bounds(query, key, cu_seq_lens_q, cu_seq_lens_k)
    heads, groups = query.shape[1], module.num_key_value_groups
    output = query.new_zeros(1, query.shape[2], heads, value.shape[-1])
    for q0, q1, k0, k1 in requests:
        q, k, v = query[:, :, q0:q1], key[:, :, k0:k1], value[:, :, k0:k1]
        if q1 - q0 == 1 and groups > 1:  # one query sees every key: its heads as rows per kv head (as "sdpa" decodes)
            o = F.scaled_dot_product_attention(q.reshape(1, heads // groups, groups, -1), k, v, scale=scaling)
            output[:, q0] = o.reshape(1, heads, -1)
            continue
        mask = None
        if 1 < q1 - q0 < k1 - k0:  # a prefill chunk after earlier keys: causal, aligned to the end of the keys
            mask = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool, device=query.device).tril_(k1 - k0 - (q1 - q0))
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and q1 - q0 > 1, scale=scaling, enable_gqa=groups > 1
        )
        output[:, q0:q1] = o.transpose(1, 2)
    return output, None


@dataclass
class AttnVariantLlamaModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    shortcut_attentions (`torch.FloatTensor` of shape `(batch_size, shortcut_heads, sequence_length, num_sources)`, *optional*):
        With `output_attentions=True` and a layer shortcut: its attention over the source layers (the depth softmax,
        or in `depth_context` mode the probability mass each source layer receives). `attentions` keeps one entry per
        decoder layer, as in Llama.
    """

    shortcut_attentions: torch.FloatTensor | None = None


@dataclass
class AttnVariantLlamaCausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    shortcut_attentions (`torch.FloatTensor` of shape `(batch_size, shortcut_heads, sequence_length, num_sources)`, *optional*):
        See `AttnVariantLlamaModelOutputWithPast`.
    """

    shortcut_attentions: torch.FloatTensor | None = None


class AttnVariantLlamaAttention(nn.Module):
    """Llama attention whose score function is whatever `config._attn_implementation` names (softmax backends or
    stick-breaking), with rotary embeddings optional (stick-breaking needs no positional encoding)."""

    def __init__(self, config: AttnVariantLlamaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True

        qkv_bias = config.qkv_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)
        if config.query_key_norm:  # Qwen3-style per-head RMSNorm of queries and keys, before RoPE
            self.q_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        if config.stickbreaking_remainder == "bias":
            # Receives the stick-breaking remainder rem_i (lm-engine's "remainder bias"); zero-init adds nothing.
            self.stickbreaking_remainder_bias = nn.Parameter(torch.zeros(config.num_attention_heads, self.head_dim))

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states).view(hidden_shape)
        key_states = self.k_proj(hidden_states).view(hidden_shape)
        if self.config.query_key_norm:
            query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)
        query_states, key_states = query_states.transpose(1, 2), key_states.transpose(1, 2)  # (B, H, T, D)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        # Read from the config at each call: `set_attn_implementation` may switch the variant after loading.
        if self.config.rope_enabled:
            cos, sin = position_embeddings
            query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        paged_cache = past_key_values if is_paged_cache(past_key_values) else None
        stickbreaking = self.config.attention_variant == "stickbreaking"
        if paged_cache is None and stickbreaking and is_paged_cache(kwargs.get("cache")):
            # Before 5.24 the paged cache comes in the kwargs for the paged attention function to update, and
            # stick-breaking's paged function is this module's: update it here.
            paged_cache = kwargs.pop("cache")
        if paged_cache is not None:
            # Continuous batching: writes the new keys/values and returns every request's past + new ones, packed (and
            # sets this layer's `cu_seq_lens_k` in the kwargs), as LlamaAttention does.
            key_states, value_states = paged_cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
        elif past_key_values is not None:
            past_length = past_key_values.get_seq_length(self.layer_idx)
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
            # Under torch.compile the static cache's length is a tensor (the cut would break the graph): the attention
            # function's own trim rotates the unfilled keys out of the way instead.
            compiling = torch.compiler.is_compiling()
            if stickbreaking and not compiling and key_states.shape[2] > past_length + input_shape[1]:
                # A static cache returns its whole buffer; stick-breaking places the queries at the end of the keys.
                kv_length = int(past_length) + input_shape[1]
                key_states, value_states = key_states[:, :, :kv_length], value_states[:, :, :kv_length]
                if attention_mask is not None:
                    attention_mask = attention_mask[..., :kv_length]

        attn_output, attn_weights = self.attention_function(paged=paged_cache is not None)(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights

    def attention_function(self, paged: bool = False) -> Callable:
        """`config.attention_variant` says what the attention computes, `config._attn_implementation` how: on a
        stick-breaking model "eager" (or continuous batching's "paged|eager") is the reference that returns the
        weights, anything else the fast op; `paged` picks their per-request forms for continuous batching's packed
        paged keys (softmax's paged functions are the implementation's own, except "sdpa" on CPU: per request)."""
        implementation = self.config._attn_implementation
        if self.config.attention_variant == "stickbreaking":
            check_stickbreaking_implementation(implementation)  # also a name written into the config after loading
            if implementation in STICKBREAKING_REFERENCE_IMPLEMENTATIONS:
                return eager_paged_stickbreaking_attention_forward if paged else eager_stickbreaking_attention_forward
            return paged_stickbreaking_attention_forward if paged else stickbreaking_attention_forward
        if implementation == STICKBREAKING_ATTENTION_NAME:  # the variant was switched back to softmax by hand
            implementation = "sdpa"
        if paged and implementation in ("sdpa", "paged|sdpa") and self.q_proj.weight.device.type == "cpu":
            return paged_sdpa_per_request_forward
        return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)


class AttnVariantLlamaRotaryEmbedding(LlamaRotaryEmbedding):
    """Llama's rotary embedding; with `config.rope_max_wavelength`, frequencies of a longer wavelength are left
    unrotated (cos 1, sin 0: p-RoPE). Applied to the output, so every RoPE type and `inv_freq` update keeps it."""

    def forward(self, x, position_ids):
        cos, sin = super().forward(x, position_ids)
        max_wavelength = getattr(self.config, "rope_max_wavelength", None)
        if max_wavelength is None:
            return cos, sin
        frequencies = self.inv_freq.to(device=cos.device, dtype=torch.float32)
        unrotated = (2 * torch.pi / frequencies > max_wavelength).repeat(cos.shape[-1] // frequencies.shape[-1])
        # cos carries rope's attention scaling (1 for plain RoPE): an unrotated dimension keeps that scale.
        cos = torch.where(unrotated, torch.full_like(cos, self.attention_scaling), cos)
        return cos, sin.masked_fill(unrotated, 0.0)


class AttnVariantLlamaDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: AttnVariantLlamaConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = AttnVariantLlamaAttention(config=config, layer_idx=layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


class _CanCompileFullgraph:
    """`_can_compile_fullgraph`, read on the class (transformers' tests) or on a model.

    Softmax variants trace as Llama does. Stick-breaking traces without a graph break where the package's C++ kernels
    run it (its torch.library custom ops, on CPU): on the class that is whether they are available; on a model, also
    whether it is a stick-breaking model on CPU in float32/float64 (bf16/fp16 decode keeps the PyTorch path) with a
    backend other than "torch". The pure-PyTorch path (remote code without the package) breaks the graph at its
    data-dependent early exits, so there it is False.
    """

    def __get__(self, model, owner=None):
        if model is None:
            return cpu_kernels_compile_fullgraph()
        config = model.config
        if getattr(config, "attention_variant", "softmax") != "stickbreaking":
            return True
        backend = os.environ.get("HF_ATTN_VARIANTS_SB_BACKEND") or getattr(config, "stickbreaking_backend", "auto")
        return (model.device.type == "cpu" and model.dtype in (torch.float32, torch.float64) and backend != "torch"
                and cpu_kernels_compile_fullgraph())


class AttnVariantLlamaPreTrainedModel(PreTrainedModel):
    config_class = AttnVariantLlamaConfig
    _can_compile_fullgraph = _CanCompileFullgraph()
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["AttnVariantLlamaDecoderLayer", "AttnVariantLlamaLayerShortcut"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "hidden_states": AttnVariantLlamaDecoderLayer,
        # One entry per decoder layer; the shortcut's attention over the source layers is `shortcut_attentions`.
        "attentions": AttnVariantLlamaAttention,
    }

    def __init__(self, config: AttnVariantLlamaConfig, *inputs, **kwargs):
        super().__init__(config, *inputs, **kwargs)
        # `save_pretrained` adds only the saved class to `auto_map`; list the whole family so every Auto class loads.
        config.auto_map = {
            "AutoConfig": "configuration_attn_variant_llama.AttnVariantLlamaConfig",
            "AutoModel": "modeling_attn_variant_llama.AttnVariantLlamaModel",
            "AutoModelForCausalLM": "modeling_attn_variant_llama.AttnVariantLlamaForCausalLM",
            "AutoModelForSequenceClassification": "modeling_attn_variant_llama.AttnVariantLlamaForSequenceClassification",
            "AutoModelForTokenClassification": "modeling_attn_variant_llama.AttnVariantLlamaForTokenClassification",
        }

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        """Turn the family's names into config fields (saved in config.json), then let transformers validate.

        `attention_variant` says *what* the token attention computes, `attn_implementation` *how*:

        - `"stickbreaking"` makes stick-breaking the model's token attention (`attention_variant`), so the saved model
          reloads as stick-breaking without naming it again. On a stick-breaking model `"eager"` runs the reference
          that returns the weights; `"sdpa"`, `"stickbreaking"` and the default run the blockwise op (Triton on CUDA).
        - `"shortcut"` adds the layerwise shortcut (zero-initialised when added to a built model, so its function is
          unchanged) and keeps the default token attention.

        Going back to softmax attention is an explicit config change: `model.config.attention_variant = "softmax"`.
        """
        config = self.config
        wants_shortcut = requested_attention == SHORTCUT_ATTN_IMPLEMENTATION
        wants_stickbreaking = requested_attention == STICKBREAKING_ATTENTION_NAME
        if wants_shortcut:
            requested_attention = None
        # transformers validates the name first (its own error for unknown ones); nothing is changed before that.
        implementation = super().get_correct_attn_implementation(requested_attention, is_init_check)
        if wants_stickbreaking or config.attention_variant == "stickbreaking":
            check_stickbreaking_implementation(implementation)
        if wants_stickbreaking:
            config.attention_variant = "stickbreaking"
        if wants_shortcut and not config.layer_shortcut:
            config.layer_shortcut = True
            if not is_init_check:
                self.base_model.add_layer_shortcut()
        return implementation

    def push_to_hub(self, repo_id: str, *args, **kwargs):
        """transformers' `push_to_hub`, except that a repo without a model card first gets the card saved beside this
        model (the converter's: Hub metadata, usage, variant settings, verification) instead of transformers' generic
        one, which `push_to_hub` would otherwise write over it."""
        card = os.path.join(str(self.name_or_path), "README.md")
        if os.path.isfile(card):
            from huggingface_hub import HfApi, ModelCard
            from huggingface_hub.errors import EntryNotFoundError

            token = kwargs.get("token")
            try:
                ModelCard.load(repo_id, token=token)
            except EntryNotFoundError:
                api = HfApi(token=token)
                repo_id = api.create_repo(repo_id, private=kwargs.get("private"), exist_ok=True).repo_id
                api.upload_file(
                    path_or_fileobj=card, path_in_repo="README.md", repo_id=repo_id, commit_message="Add model card"
                )
        return super().push_to_hub(repo_id, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, nn.Linear) and getattr(module, ZERO_INIT_ATTRIBUTE, False):
            # The shortcut's o_proj (and feature-MLP outputs) start at zero so the model's function is unchanged; this
            # also runs for the missing keys when `from_pretrained` adds a shortcut to a checkpoint without one.
            init.zeros_(module.weight)
            return
        super()._init_weights(module)
        if isinstance(module, AttnVariantLlamaAttention) and hasattr(module, "stickbreaking_remainder_bias"):
            init.zeros_(module.stickbreaking_remainder_bias)


class AttnVariantLlamaModel(AttnVariantLlamaPreTrainedModel):
    def __init__(self, config: AttnVariantLlamaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size

        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [AttnVariantLlamaDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        # Added to the final layer's output before `self.norm`, so the LM head's input distribution is untouched at init.
        self.shortcut = AttnVariantLlamaLayerShortcut(config) if config.layer_shortcut else None
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # Kept even without RoPE: no parameters, and `set_attn_implementation` may switch back to a softmax backend.
        self.rotary_emb = AttnVariantLlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def add_layer_shortcut(self) -> None:
        """Build the layer shortcut on a model built without it (`set_attn_implementation("shortcut")`), zero-initialised
        so the model's function is unchanged, on the device and in the dtype of the final layer."""
        if self.shortcut is not None:
            return
        reference = self.layers[-1].self_attn.o_proj.weight
        shortcut = AttnVariantLlamaLayerShortcut(self.config)
        self._init_weights_recursively(shortcut)
        self.shortcut = shortcut.to(device=reference.device, dtype=reference.dtype)

    def _init_weights_recursively(self, module: nn.Module) -> None:
        for submodule in module.modules():
            self._init_weights(submodule)

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> AttnVariantLlamaModelOutputWithPast:
        past_key_values = pop_cache_argument(past_key_values, kwargs)  # `cache=` from transformers >= 5.24
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of `input_ids` or `inputs_embeds`.")

        if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and use_cache:
            # Recomputed layers would write to the cache twice (what GradientCheckpointingLayer guards against).
            logger.warning_once("`use_cache=True` is incompatible with gradient checkpointing; using `use_cache=False`.")
            use_cache, past_key_values = False, None

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)

        if use_cache and past_key_values is None:
            cache_class = AttnVariantLlamaShortcutCache if uses_shortcut_cache(self.config) else DynamicCache
            past_key_values = cache_class(config=self.config)

        if position_ids is None:
            past_seen_tokens = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        causal_mask = create_causal_mask(self.config, inputs_embeds, attention_mask, past_key_values, position_ids)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids) if self.config.rope_enabled else None

        # Pre-norm outputs of the shortcut's source layers, by layer index.
        source_states = {}
        shortcut_sources = set(self.shortcut.source_layers) if self.shortcut is not None else set()
        for layer_idx, decoder_layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **kwargs,
            )
            if layer_idx in shortcut_sources:
                source_states[layer_idx] = hidden_states

        shortcut_attentions = None
        if self.shortcut is not None:
            hidden_states, shortcut_attentions = self.shortcut(
                hidden_states,
                *(source_states[layer_idx] for layer_idx in self.shortcut.source_layers),
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
            )
            if not kwargs.get("output_attentions", self.config.output_attentions):
                shortcut_attentions = None

        hidden_states = self.norm(hidden_states)
        return AttnVariantLlamaModelOutputWithPast(
            last_hidden_state=hidden_states, shortcut_attentions=shortcut_attentions, **cache_output(past_key_values)
        )


class AttnVariantLlamaForCausalLM(AttnVariantLlamaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: AttnVariantLlamaConfig):
        super().__init__(config)
        self.model = AttnVariantLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """`generate` builds a `DynamicCache` or `StaticCache` of the model's L layers; a `depth_context` shortcut also
        needs room for its sources' keys/values, so swap in the family's subclass. A user-passed cache is kept."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = generation_cache(model_kwargs)
        if not uses_shortcut_cache(self.config) or cache is None or getattr(cache, "shortcut_cache", None) is not None:
            return
        if getattr(cache, "_is_user_defined", False) or kwargs.get("user_defined_cache") is not None:
            return  # the shortcut raises a clear error at the first forward
        text_config = self.config.get_text_config(decoder=True)
        if type(cache) is DynamicCache:
            set_generation_cache(model_kwargs, AttnVariantLlamaShortcutCache(config=text_config, offloading=cache.offloading))
        elif type(cache) is StaticCache:
            set_generation_cache(
                model_kwargs,
                AttnVariantLlamaShortcutStaticCache(
                    config=text_config, max_cache_len=cache.layers[0].max_cache_len, offloading=cache.offloading
                ),
            )

    def init_continuous_batching(self, generation_config=None, continuous_batching_config=None, *args, **kwargs):
        """transformers' continuous batching (what `generate_batch` and `transformers serve --continuous-batching`
        start): softmax and the `depth` shortcut run as Llama does (on CPU, "sdpa" per request), stick-breaking per
        request over the packed paged keys. What cannot run paged is refused here, once, rather than failing every request."""
        if uses_shortcut_cache(self.config):
            raise ValueError(
                "Continuous batching cannot run the `shortcut_mode`='depth_context' layer shortcut (its source layers' "
                "keys/values have no room in the paged cache); use generate(), or a model with shortcut_mode='depth'."
            )
        if self.config.attention_variant != "stickbreaking":
            return super().init_continuous_batching(generation_config, continuous_batching_config, *args, **kwargs)
        if not PAGED_CACHE_UPDATE_TAKES_KWARGS:
            raise ValueError(
                "Continuous batching of stick-breaking attention needs transformers >= "
                f"{PAGED_STICKBREAKING_MIN_VERSION} (installed: {transformers.__version__}); upgrade it, or use "
                "generate()."
            )
        # Continuous batching takes only "paged|eager", "sdpa" and flash names, and on CUDA switches "sdpa" to flash if
        # it can: stick-breaking runs as "sdpa" (the fast op, like "stickbreaking") or "paged|eager" (the reference).
        if continuous_batching_config is None:  # transformers' deprecated place for it
            generation_config_or_default = generation_config or self.generation_config
            continuous_batching_config = getattr(generation_config_or_default, "continuous_batching_config", None)
        if isinstance(continuous_batching_config, ContinuousBatchingConfig):
            continuous_batching_config = copy.copy(continuous_batching_config)
        else:
            continuous_batching_config = ContinuousBatchingConfig()
        continuous_batching_config.auto_switch_to_flash = False
        # The paged stick-breaking function splits the packed requests on the host, which a CUDA graph cannot capture.
        if continuous_batching_config.use_cuda_graph not in (None, False, (False, False)):
            raise ValueError(
                "Continuous batching of stick-breaking attention cannot run in CUDA graphs (it splits the requests on "
                "the host); leave `use_cuda_graph` unset or False."
            )
        continuous_batching_config.use_cuda_graph = False
        renamed = self.config._attn_implementation == STICKBREAKING_ATTENTION_NAME
        if renamed:
            self.set_attn_implementation("sdpa")
        manager = super().init_continuous_batching(generation_config, continuous_batching_config, *args, **kwargs)
        if renamed and getattr(manager, "_original_attn_impl", False) is None:
            manager._original_attn_impl = STICKBREAKING_ATTENTION_NAME  # the manager restores it when it stops
        return manager

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> AttnVariantLlamaCausalLMOutputWithPast:
        past_key_values = pop_cache_argument(past_key_values, kwargs)  # `cache=` from transformers >= 5.24
        outputs: AttnVariantLlamaModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return AttnVariantLlamaCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            shortcut_attentions=outputs.shortcut_attentions,
            **cache_output(output_cache(outputs)),
        )


class AttnVariantLlamaForSequenceClassification(GenericForSequenceClassification, AttnVariantLlamaPreTrainedModel):
    def __init__(self, config: AttnVariantLlamaConfig):
        # Not `GenericForSequenceClassification.__init__`: it builds the base model through `AutoModel`, which needs
        # `trust_remote_code` again when this file runs as remote code.
        AttnVariantLlamaPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = AttnVariantLlamaModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()


class AttnVariantLlamaForTokenClassification(GenericForTokenClassification, AttnVariantLlamaPreTrainedModel):
    def __init__(self, config: AttnVariantLlamaConfig):
        AttnVariantLlamaPreTrainedModel.__init__(self, config)  # see AttnVariantLlamaForSequenceClassification
        self.num_labels = config.num_labels
        self.model = AttnVariantLlamaModel(config)
        dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(0.1 if dropout is None else dropout)
        self.score = nn.Linear(
            config.hidden_size, config.num_labels, bias=getattr(config, "token_classification_bias", True)
        )
        self.post_init()


AttnVariantLlamaConfig.register_for_auto_class()
AttnVariantLlamaModel.register_for_auto_class("AutoModel")
AttnVariantLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
AttnVariantLlamaForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
AttnVariantLlamaForTokenClassification.register_for_auto_class("AutoModelForTokenClassification")

__all__ = [
    "AttnVariantLlamaCausalLMOutputWithPast",
    "AttnVariantLlamaForCausalLM",
    "AttnVariantLlamaForSequenceClassification",
    "AttnVariantLlamaForTokenClassification",
    "AttnVariantLlamaModel",
    "AttnVariantLlamaModelOutputWithPast",
    "AttnVariantLlamaPreTrainedModel",
]
