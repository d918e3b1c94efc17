"""Configuration of the AttnVariantLlama family: a Llama whose attention can be swapped for a variant.

Every `LlamaConfig` field is accepted unchanged (the class extends it), so any Llama `config.json` converts. The extra
fields default to plain Llama behaviour: a config without them describes exactly a `LlamaForCausalLM`.
"""

from transformers import LlamaConfig

TOKEN_ATTENTION_VARIANTS = ("softmax", "stickbreaking")
STICKBREAKING_REMAINDER_MODES = ("none", "value", "bias")
STICKBREAKING_BACKENDS = ("auto", "torch", "triton")
SHORTCUT_MODES = ("depth", "depth_context")
# Boolean fields are checked strictly: `layer_shortcut="false"` is a truthy string, not False.
BOOL_FIELDS = (
    "use_rope", "stickbreaking_attend_current", "layer_shortcut", "shortcut_feature_mlp",
    "shortcut_normalize_sources", "attention_qkv_bias", "query_key_norm",
)
OPTIONAL_BOOL_FIELDS = ("use_rope", "attention_qkv_bias")  # None means "derive it" (see the docstring)


class AttnVariantLlamaConfig(LlamaConfig):
    r"""
    Llama configuration plus the attention-variant options. All `LlamaConfig` arguments are accepted.

    Args:
        attention_variant (`str`, *optional*, defaults to `"softmax"`):
            Token attention of every decoder layer, saved in `config.json` so a model reloads as itself:
            `"softmax"` (Llama; backend chosen by `attn_implementation`: eager / sdpa / flash) or `"stickbreaking"`
            (Tan et al., arXiv 2410.17980). Loading with `attn_implementation="stickbreaking"` sets it.
        use_rope (`bool`, *optional*):
            Apply rotary position embeddings to queries and keys. `None` means: yes for softmax, no for stick-breaking
            (the paper's models use no positional encoding; the stick-breaking order encodes position).
        rope_max_wavelength (`float`, *optional*):
            Rotary frequencies whose wavelength (2π / frequency, in positions) exceeds this are not rotated: those
            dimensions carry content only (p-RoPE, Barbero et al., arXiv 2410.06205). Set to a source checkpoint's
            training window, no query-key distance rotates a dimension past angles it trained on, so distances
            beyond the window stay in distribution. `None` rotates every frequency (plain RoPE).
        stickbreaking_attend_current (`bool`, *optional*, defaults to `False`):
            Whether token i may attend to itself (j <= i) or only to earlier tokens (j < i, the official default).
        stickbreaking_remainder (`str`, *optional*, defaults to `"none"`):
            What to do with the unassigned mass rem_i = 1 - sum_j A_ij: `"none"` drops it (official 3B checkpoint),
            `"value"` adds rem_i * v_i, `"bias"` adds rem_i * a learned per-head vector (zero-initialised).
        stickbreaking_scale (`float`, *optional*):
            Logit scale s in z_ij = s * q_i . k_j. `None` uses the attention module's scaling, 1/sqrt(head_dim).
        stickbreaking_backend (`str`, *optional*, defaults to `"auto"`):
            `"auto"` (Triton kernels on CUDA when installed; PyTorch otherwise, on CPU with the package's fused C++
            kernels when it is installed and they build), `"torch"` (pure PyTorch) or `"triton"`.
            The environment variable `HF_ATTN_VARIANTS_SB_BACKEND` overrides it.
        layer_shortcut (`bool`, *optional*, defaults to `False`):
            Add the layerwise attention shortcut (Verma & Pilanci, arXiv 2409.10870): the final layer attends to the
            outputs of intermediate layers. Loading with `attn_implementation="shortcut"` sets it.
        shortcut_mode (`str`, *optional*, defaults to `"depth"`):
            `"depth"`: token t attends over its own position in each source layer. `"depth_context"`: token t attends
            over (source layer, position <= t), the paper's causal reading.
        shortcut_source_layers (`list[int]`, *optional*):
            0-based indices of the decoder layers whose outputs are attended to; each must be before the final layer.
            `None` means every intermediate layer, `0 .. num_hidden_layers - 2`.
        shortcut_num_heads (`int`, *optional*):
            Heads of the shortcut attention; `None` uses `num_attention_heads`. Must divide `hidden_size`.
        shortcut_num_key_value_heads (`int`, *optional*):
            Key/value heads of the shortcut attention (grouped-query attention): `k_proj`/`v_proj` output
            `shortcut_num_key_value_heads * head_dim` features and, in `"depth_context"` mode, each source's cache
            layer holds that many heads. Must divide the shortcut's heads. `None` keeps the model's ratio of query to
            key/value heads: `shortcut_heads * num_key_value_heads // num_attention_heads` (at least 1), lowered to
            the nearest divisor of the shortcut's heads; with `shortcut_num_heads=None` that is `num_key_value_heads`.
        shortcut_feature_mlp (`bool`, *optional*, defaults to `False`):
            Pass each source through its own residual feature MLP (the paper's feature maps) before keys and values.
        shortcut_normalize_sources (`bool`, *optional*, defaults to `True`):
            RMS-normalise each source before keys and values (residual-stream norms grow with depth).
        attention_qkv_bias (`bool`, *optional*):
            Biases on `q_proj`/`k_proj`/`v_proj`. `None` follows `attention_bias` (Llama: one flag for all four
            projections); Qwen2-style checkpoints have `attention_qkv_bias=True, attention_bias=False` (no `o_proj`
            bias).
        query_key_norm (`bool`, *optional*, defaults to `False`):
            Per-head RMSNorm of queries and keys before rotary embeddings (`self_attn.q_norm`/`k_norm`, Qwen3-style).
    """

    model_type = "attn_variant_llama"

    attention_variant: str = "softmax"
    use_rope: bool | None = None
    rope_max_wavelength: float | None = None
    stickbreaking_attend_current: bool = False
    stickbreaking_remainder: str = "none"
    stickbreaking_scale: float | None = None
    stickbreaking_backend: str = "auto"
    layer_shortcut: bool = False
    shortcut_mode: str = "depth"
    shortcut_source_layers: list[int] | None = None
    shortcut_num_heads: int | None = None
    shortcut_num_key_value_heads: int | None = None
    shortcut_feature_mlp: bool = False
    shortcut_normalize_sources: bool = True
    attention_qkv_bias: bool | None = None
    query_key_norm: bool = False

    def __post_init__(self, **kwargs):
        for name in BOOL_FIELDS:
            _require_bool(name, getattr(self, name), optional=name in OPTIONAL_BOOL_FIELDS)
        # Validate before LlamaConfig fills defaults, so errors name the field the user actually set.
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            _require_positive(name, getattr(self, name))
        for name in ("num_key_value_heads", "head_dim", "shortcut_num_heads", "shortcut_num_key_value_heads"):
            if getattr(self, name) is not None:
                _require_positive(name, getattr(self, name))
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`num_attention_heads`={self.num_attention_heads} must divide `hidden_size`={self.hidden_size}."
            )
        if self.num_key_value_heads is not None and self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"`num_key_value_heads`={self.num_key_value_heads} must divide "
                f"`num_attention_heads`={self.num_attention_heads}."
            )
        _require_choice("attention_variant", self.attention_variant, TOKEN_ATTENTION_VARIANTS)
        _require_choice("stickbreaking_remainder", self.stickbreaking_remainder, STICKBREAKING_REMAINDER_MODES)
        _require_choice("stickbreaking_backend", self.stickbreaking_backend, STICKBREAKING_BACKENDS)
        _require_choice("shortcut_mode", self.shortcut_mode, SHORTCUT_MODES)
        scale = self.stickbreaking_scale
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
            raise ValueError(f"`stickbreaking_scale` must be a positive number or None, got {self.stickbreaking_scale!r}.")
        wavelength = self.rope_max_wavelength
        if wavelength is not None and (
            isinstance(wavelength, bool) or not isinstance(wavelength, (int, float)) or not wavelength > 0
        ):
            raise ValueError(f"`rope_max_wavelength` must be a positive number or None, got {wavelength!r}.")
        if self.shortcut_num_heads is not None and self.hidden_size % self.shortcut_num_heads != 0:
            raise ValueError(
                f"`shortcut_num_heads`={self.shortcut_num_heads} must divide `hidden_size`={self.hidden_size}."
            )
        shortcut_heads = self.shortcut_num_heads or self.num_attention_heads
        if self.shortcut_num_key_value_heads is not None and shortcut_heads % self.shortcut_num_key_value_heads != 0:
            raise ValueError(
                f"`shortcut_num_key_value_heads`={self.shortcut_num_key_value_heads} must divide the shortcut's heads "
                f"(`shortcut_num_heads`, else `num_attention_heads`)={shortcut_heads}."
            )
        if self.shortcut_source_layers is not None:
            sources = self.shortcut_source_layers
            if not isinstance(sources, (list, tuple)) or any(
                isinstance(i, bool) or not isinstance(i, int) for i in sources
            ):
                raise ValueError(
                    f"`shortcut_source_layers` must be a list of integer layer indices or None, got {sources!r}."
                )
            sources = self.shortcut_source_layers = list(sources)
            last = self.num_hidden_layers - 1
            bad = [i for i in sources if not 0 <= i < last]
            if not sources or bad or len(set(sources)) != len(sources):
                raise ValueError(
                    f"`shortcut_source_layers`={self.shortcut_source_layers} must be a non-empty list of distinct layer "
                    f"indices in [0, {last - 1}] (before the final layer {last} of `num_hidden_layers`="
                    f"{self.num_hidden_layers}); invalid: {bad}."
                )
        if self.layer_shortcut and self.num_hidden_layers < 2:
            raise ValueError(
                f"`layer_shortcut`=True needs at least 2 layers (a source before the final one), got "
                f"`num_hidden_layers`={self.num_hidden_layers}."
            )
        super().__post_init__(**kwargs)

    @property
    def rope_enabled(self) -> bool:
        """Whether queries and keys get rotary embeddings (resolves `use_rope=None` from the attention variant)."""
        if self.use_rope is None:
            return self.attention_variant == "softmax"
        return self.use_rope

    @property
    def qkv_bias(self) -> bool:
        """Whether `q_proj`/`k_proj`/`v_proj` have biases (resolves `attention_qkv_bias=None`)."""
        return self.attention_bias if self.attention_qkv_bias is None else self.attention_qkv_bias

    @property
    def shortcut_heads(self) -> int:
        """Query heads of the layerwise shortcut (`shortcut_num_heads`, else `num_attention_heads`)."""
        return self.shortcut_num_heads or self.num_attention_heads

    @property
    def shortcut_key_value_heads(self) -> int:
        """Key/value heads of the layerwise shortcut (resolves `shortcut_num_key_value_heads=None`, see above)."""
        heads = self.shortcut_heads
        if self.shortcut_num_key_value_heads is not None:
            return self.shortcut_num_key_value_heads
        model_kv_heads = self.num_key_value_heads or self.num_attention_heads
        kv_heads = max(1, heads * model_kv_heads // self.num_attention_heads)
        while heads % kv_heads:
            kv_heads -= 1
        return kv_heads

    @property
    def shortcut_sources(self) -> list[int]:
        """The resolved list of source layers of the layerwise shortcut."""
        if self.shortcut_source_layers is None:
            return list(range(self.num_hidden_layers - 1))
        return list(self.shortcut_source_layers)


def _require_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def _require_bool(name, value, optional=False):
    if value is None and optional:
        return
    if not isinstance(value, bool):
        allowed = "True, False or None" if optional else "True or False"
        raise ValueError(f"`{name}` must be {allowed} (a bool), got {value!r} ({type(value).__name__}).")


def _require_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"`{name}`={value!r} is not supported; expected one of {list(allowed)}.")


__all__ = ["AttnVariantLlamaConfig"]
