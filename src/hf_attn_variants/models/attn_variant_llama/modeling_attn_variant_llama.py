"""AttnVariantLlama: the Llama architecture with swappable token attention and an optional layerwise shortcut.

Parameter names equal `LlamaForCausalLM`'s, so a Llama state dict loads unchanged. The blocks that are identical to
Llama (RMSNorm, MLP, rotary embedding, eager attention) are imported from transformers rather than copied.

This folder is shipped as remote code: it imports only torch, transformers and its flat siblings.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.utils import can_return_tuple, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_attn_variant_llama import AttnVariantLlamaConfig
from .layer_shortcut import (
    ZERO_INIT_ATTRIBUTE,
    AttnVariantLlamaLayerShortcut,
    AttnVariantLlamaShortcutCache,
    uses_shortcut_cache,
)
from .stickbreaking_torch import register_stickbreaking_attention

logger = logging.get_logger(__name__)

register_stickbreaking_attention()

# `attn_implementation` names that select a model-level option rather than a token-attention function.
SHORTCUT_ATTN_IMPLEMENTATION = "shortcut"


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
        self.use_rope = config.rope_enabled

        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)
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

        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, H, T, D)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        if self.use_rope:
            cos, sin = position_embeddings
            query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
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


class AttnVariantLlamaPreTrainedModel(PreTrainedModel):
    config_class = AttnVariantLlamaConfig
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
        # With `layer_shortcut`, the last element of `attentions` is the shortcut's (B, heads, T, |S|) attention over
        # the source layers (see `AttnVariantLlamaLayerShortcut`); the others are the token attentions, as in Llama.
        "attentions": [AttnVariantLlamaAttention, AttnVariantLlamaLayerShortcut],
    }

    def __init__(self, config: AttnVariantLlamaConfig, *inputs, **kwargs):
        super().__init__(config, *inputs, **kwargs)
        # `save_pretrained` adds only the saved class to `auto_map`; list the whole family so every Auto class loads.
        config.auto_map = {
            "AutoConfig": "configuration_attn_variant_llama.AttnVariantLlamaConfig",
            "AutoModel": "modeling_attn_variant_llama.AttnVariantLlamaModel",
            "AutoModelForCausalLM": "modeling_attn_variant_llama.AttnVariantLlamaForCausalLM",
        }

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        """Translate the family's names into config fields (saved in config.json), then let transformers validate.

        - `"shortcut"` adds the layerwise shortcut and keeps the default token attention for the other layers.
        - `"stickbreaking"` makes stick-breaking the model's token attention (`attention_variant`), so the saved model
          reloads as stick-breaking without naming it again.
        """
        config = self.config
        if requested_attention == SHORTCUT_ATTN_IMPLEMENTATION:
            config.layer_shortcut = True
            requested_attention = None
        if requested_attention == "stickbreaking":
            config.attention_variant = "stickbreaking"
        elif requested_attention is None and config.attention_variant == "stickbreaking":
            requested_attention = "stickbreaking"
        elif requested_attention is not None and config.attention_variant == "stickbreaking":
            logger.warning_once(
                f"This model's `attention_variant` is 'stickbreaking' but `attn_implementation={requested_attention!r}` "
                "was requested: its layers will run softmax attention, which is not the function it was trained with."
            )
        valid = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys(), SHORTCUT_ATTN_IMPLEMENTATION]
        if requested_attention is not None and requested_attention not in valid:
            raise ValueError(
                f"`attn_implementation`={requested_attention!r} is not supported by {type(self).__name__}; "
                f"valid values are {sorted(set(valid))}."
            )
        return super().get_correct_attn_implementation(requested_attention, is_init_check)

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
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

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
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of `input_ids` or `inputs_embeds`.")

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)

        if use_cache and past_key_values is None:
            cache_class = AttnVariantLlamaShortcutCache if uses_shortcut_cache(self.config) else DynamicCache
            past_key_values = cache_class(config=self.config)

        if position_ids is None:
            past_seen_tokens = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )

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

        if self.shortcut is not None:
            hidden_states, _ = self.shortcut(
                hidden_states,
                *(source_states[layer_idx] for layer_idx in self.shortcut.source_layers),
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
            )

        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values)


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
        """`generate` builds a `DynamicCache` of the model's L layers; a `depth_context` shortcut needs
        `AttnVariantLlamaShortcutCache` (|S| more layers), so swap the default one. A user-passed cache is kept."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("past_key_values")
        is_default_cache = type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False)
        if uses_shortcut_cache(self.config) and is_default_cache:
            model_kwargs["past_key_values"] = AttnVariantLlamaShortcutCache(
                config=self.config.get_text_config(decoder=True), offloading=cache.offloading
            )

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
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs: BaseModelOutputWithPast = self.model(
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

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


AttnVariantLlamaConfig.register_for_auto_class()
AttnVariantLlamaModel.register_for_auto_class("AutoModel")
AttnVariantLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["AttnVariantLlamaForCausalLM", "AttnVariantLlamaModel", "AttnVariantLlamaPreTrainedModel"]
