"""The target config and the checks against the source tensors, before any weight is loaded (`--dry-run`)."""

from __future__ import annotations

import copy
import dataclasses
import os

import torch
from tqdm import tqdm

from ..models import AttnVariantLlamaConfig, AttnVariantLlamaForCausalLM
from .common import (
    _CONFIG_FIELDS_NOT_CARRIED,
    _count,
    _dtype_name,
    _first_line,
    _human_bytes,
    _names,
    _natural_key,
    _quiet_transformers,
    ConversionError,
    NEW_PARAMETER_MARKERS,
    VARIANT_OPTIONS,
)
from .sources import _require_supported, SourceCheckpoint


def build_target_config(
    source_config, dtype: torch.dtype | None = None, raw_config: dict | None = None, label: str = "the source",
    **variant_options,
) -> AttnVariantLlamaConfig:
    """The AttnVariantLlama config of a llama/mistral/qwen2/qwen3 `source_config` with `variant_options` applied.

    Refuses sliding-window sources (the family has full attention only). Qwen2's q/k/v biases become
    `attention_bias=False, attention_qkv_bias=True`; Qwen3's per-head q/k norms become `query_key_norm=True`.
    """
    model_type = getattr(source_config, "model_type", None)
    _require_supported(model_type, label)
    unknown = sorted(set(variant_options) - set(VARIANT_OPTIONS))
    if unknown:
        raise ConversionError(f"unknown variant option(s) {unknown}; expected some of {list(VARIANT_OPTIONS)}")
    _refuse_sliding_window(model_type, raw_config if raw_config is not None else source_config.to_dict(), label)
    fields = {k: v for k, v in source_config.to_dict().items() if k not in _CONFIG_FIELDS_NOT_CARRIED}
    if model_type == "qwen2":
        fields.update(attention_bias=False, attention_qkv_bias=True)  # Qwen2: q/k/v biases, none on o_proj
    elif model_type == "qwen3":
        fields.update(query_key_norm=True)  # attention_bias (all four projections) carries over as in Qwen3
    if dtype is not None:
        fields["dtype"] = str(dtype).removeprefix("torch.")
    try:
        return AttnVariantLlamaConfig(**{**fields, **variant_options})
    except (TypeError, ValueError) as error:
        raise ConversionError(f"invalid conversion options: {_first_line(error)}") from error


def _refuse_sliding_window(model_type: str, raw: dict, label: str):
    context = raw.get("max_position_embeddings")
    window = raw.get("sliding_window")
    if window is None or context is None or window >= context:
        return
    if model_type == "mistral":
        raise ConversionError(
            f"{label} is a Mistral model with sliding_window={window} < max_position_embeddings={context}; "
            "AttnVariantLlama has full attention only, so it would compute something else beyond "
            f"{window} tokens (a checkpoint with sliding_window null or >= its context converts)"
        )
    if model_type in ("qwen2", "qwen3"):
        layer_types = raw.get("layer_types") or []
        if raw.get("use_sliding_window") or "sliding_attention" in layer_types:
            raise ConversionError(
                f"{label} is a {model_type} model with use_sliding_window=true and sliding_window={window} < "
                f"max_position_embeddings={context}; AttnVariantLlama has full attention only (a checkpoint with "
                "use_sliding_window=false, or a window >= its context, converts)"
            )


def expected_tensors(config: AttnVariantLlamaConfig) -> dict:
    """Names and shapes of the target model's state dict (built on the meta device: no memory, no init)."""
    with torch.device("meta"), _quiet_transformers():
        model = AttnVariantLlamaForCausalLM(copy.deepcopy(config))
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def new_parameter_names(names) -> list:
    return sorted(name for name in names if any(marker in name for marker in NEW_PARAMETER_MARKERS))


def check_tensors(source_tensors: dict, expected: dict, tie_word_embeddings: bool, label: str, model_type: str,
                  unmapped: list = (), progress: bool = False) -> None:
    """Raise ConversionError unless the source tensors are exactly the target's (minus new and tied ones)."""
    new = set(new_parameter_names(expected))
    optional = {"lm_head.weight"} if tie_word_embeddings else set()
    mismatched = []
    for name, shape in tqdm(source_tensors.items(), desc="convert: check tensors", unit="tensor",
                            disable=not progress, leave=False):
        if name in expected and tuple(shape) != expected[name]:
            mismatched.append(f"{name}: source {tuple(shape)}, target {expected[name]}")
    missing = sorted(set(expected) - set(source_tensors) - new - optional)
    extra = sorted(set(source_tensors) - set(expected)) + sorted(unmapped)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({_names(missing)})")
    if extra:
        hint = (
            " - rope_freqs holds Llama-3.1-style RoPE scaling, which transformers' GGUF loader drops; convert the "
            "safetensors checkpoint instead" if "rope_freqs.weight" in extra else ""
        )
        problems.append(f"{len(extra)} extra ({_names(extra)}{hint})")
    if mismatched:
        problems.append(f"{len(mismatched)} with another shape ({'; '.join(mismatched[:3])})")
    if problems:
        raise ConversionError(
            f"{label}'s tensors do not match AttnVariantLlama for this {model_type} config: " + ", ".join(problems)
        )


def _function_preserving(config: AttnVariantLlamaConfig) -> bool:
    """Softmax attention with RoPE computes the source's function; the shortcut starts at zero, so it does too."""
    return config.attention_variant == "softmax" and config.rope_enabled


def _variant_summary(config) -> str:
    summary = "stick-breaking attention" if config.attention_variant == "stickbreaking" else "softmax attention"
    if config.layer_shortcut:
        summary += f" + layer shortcut ({config.shortcut_mode})"
    return summary


@dataclasses.dataclass
class ConversionPlan:
    source: SourceCheckpoint
    config: AttnVariantLlamaConfig
    dtype: torch.dtype
    dtype_reason: str
    output_dir: str
    replaces: bool
    files: list  # files the output folder will hold, tokenizer files excepted
    weight_bytes: int
    num_parameters: int
    new_parameters: list
    verify: bool = False
    verify_label: str | None = None
    push_to_hub: str | None = None
    private: bool = False

    def describe(self) -> str:
        source, config = self.source, self.config
        lines = [
            f"source:  {source.label} ({source.format}, {source.model_type}, {len(source.tensors)} tensors in "
            f"{len(source.weight_files)} file(s))",
            f"target:  AttnVariantLlamaForCausalLM, {_variant_summary(config)}, {config.num_hidden_layers} layers, "
            f"{self.num_parameters:,} parameters ({_count(self.new_parameters, 'new tensor')}), "
            f"dtype {_dtype_name(self.dtype)} ({self.dtype_reason})",
            "checked: every source tensor has its place and shape in the target"
            + (" (tied embeddings: no lm_head.weight needed)" if config.tie_word_embeddings else ""),
            f"would write {self.output_dir}{' (replacing the existing folder)' if self.replaces else ''}:",
        ]
        for name in self.files:
            size = f" ({_human_bytes(self.weight_bytes)} in all)" if name.endswith(".safetensors") and len(
                [f for f in self.files if f.endswith(".safetensors")]) == 1 else ""
            lines.append(f"  {name}{size}")
        if source.has_tokenizer:
            lines.append(f"  tokenizer files (from {', '.join(source.tokenizer_files)})")
        else:
            lines.append("  (no tokenizer: the source has none)")
        lines.append(f"verify:  {'on ' + self.verify_label if self.verify else 'not requested (--verify)'}")
        if self.push_to_hub:
            private = " (private)" if self.private else ""
            lines.append(f"push:    to {self.push_to_hub}{private} after the folder is complete")
        return "\n".join(lines)


def _planned_files(config, expected: dict, dtype: torch.dtype, max_shard_size) -> tuple[list, int]:
    """The file names save_pretrained will write for this config (weights sharded as it shards them)."""
    import inspect

    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers.dynamic_module_utils import get_relative_import_files

    state = {
        name: torch.empty(expected[name], dtype=dtype, device="meta")
        for name in sorted(expected, key=_natural_key)  # the order `_save_into` saves in
        if not (config.tie_word_embeddings and name == "lm_head.weight")
    }
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size or "50GB"
    )
    weight_files = sorted(split.filename_to_tensors)
    if split.is_sharded:
        weight_files.append("model.safetensors.index.json")
    code = set()
    for cls in (AttnVariantLlamaConfig, AttnVariantLlamaForCausalLM):
        module_file = inspect.getfile(cls)
        code.add(os.path.basename(module_file))
        code.update(os.path.basename(f) for f in get_relative_import_files(module_file))
    files = ["config.json", "generation_config.json", *weight_files, *sorted(code), "README.md"]
    weight_bytes = sum(t.numel() * t.element_size() for t in state.values())
    return files, weight_bytes
