"""The converted folder's Hub model card."""

from __future__ import annotations

import json
import os
from importlib import resources

import torch

from .common import _dtype_name
from .plan import _function_preserving, _variant_summary, new_parameter_names
from .sources import _source_card_metadata, _source_label, SourceCheckpoint
from .verify import Verification


def render_model_card(model, source: str, *, base_model: str | None = None, card_metadata: dict | None = None,
                      verification: Verification | None = None, repo_id: str | None = None,
                      source_info: SourceCheckpoint | None = None) -> str:
    """The Hub model card (`README.md`) of a converted model: YAML metadata, usage, variant settings, verification.

    `source` names the source; a local path is reduced to its folder name (a GGUF file to `folder/file`), so the card
    carries no path of the converting machine.
    """
    from huggingface_hub import ModelCardData

    config = model.config if hasattr(model, "config") else model
    label = base_model or (source_info.label if source_info else _label_from_spec(source))
    if card_metadata is None:
        card_metadata = source_info.card_metadata if source_info else _card_metadata_from_spec(source)
    metadata = dict(card_metadata)
    tags = ["attn_variant_llama", "hf-attn-variants", "custom_code",
            "stick-breaking-attention" if config.attention_variant == "stickbreaking" else "softmax-attention"]
    if config.layer_shortcut:
        tags += ["layer-shortcut", f"layer-shortcut-{config.shortcut_mode.replace('_', '-')}"]
    source_type = source_info.model_type if source_info else None
    if source_type:
        tags.append(f"converted-from-{source_type}")
    card_data = ModelCardData(
        base_model=label, license=metadata.get("license"), license_name=metadata.get("license_name"),
        license_link=metadata.get("license_link"), language=metadata.get("language"),
        library_name="transformers", pipeline_tag="text-generation", tags=tags,
    )
    num_parameters = model.num_parameters() if hasattr(model, "num_parameters") else None
    parameters = dict(model.named_parameters()) if hasattr(model, "named_parameters") else {}
    new = new_parameter_names(parameters)
    settings = {
        k: v for k, v in config.to_dict().items()
        if k.startswith(("attention_variant", "stickbreaking", "shortcut", "layer_shortcut", "use_rope", "rope_max_wavelength"))
        or k in ("attention_qkv_bias", "query_key_norm")
    }
    template = resources.files("hf_attn_variants").joinpath("templates/model_card.md").read_text(encoding="utf-8")
    source_format = ""
    if source_info:
        source_format = f" ({'GGUF' if source_info.gguf_file else 'safetensors'}, {source_info.model_type})"
    return template.format(
        metadata=f"---\n{card_data.to_yaml()}\n---",
        title=f"{label.split('/')[-1]} · AttnVariantLlama ({_variant_summary(config)})",
        source=label,
        source_format=source_format,
        variant=_variant_summary(config),
        rope="yes" if config.rope_enabled else "no (NoPE)",
        num_parameters=f"{num_parameters:,}" if num_parameters is not None else "?",
        new_parameters=f"{sum(parameters[n].numel() for n in new):,}",
        dtype=_dtype_name(getattr(model, "dtype", None) or torch.float32),
        repo=repo_id or f"path/to/{label.split('/')[-1]}-attn-variant",
        config_json=json.dumps(settings, indent=2),
        verification=_verification_markdown(verification, config),
        function_note=_function_note(config),
    )


def _label_from_spec(source: str) -> str:
    source = os.fspath(source)
    if os.path.isabs(source) or os.path.exists(source):
        if os.path.isfile(source) or source.endswith(".gguf"):
            folder, name = os.path.split(os.path.abspath(source))
            return _source_label(folder, name, None)
        return _source_label(source, None, None)
    return source


def _card_metadata_from_spec(source: str) -> dict:
    """License/language of a local source named by path (a .gguf file's metadata, or a folder's README card)."""
    source = os.fspath(source)
    if os.path.isfile(source) and source.endswith(".gguf"):
        try:
            from gguf import GGUFReader

            fields = GGUFReader(source).fields
        except Exception:
            return {}
        keys = {"license": "general.license", "license_name": "general.license.name",
                "license_link": "general.license.link", "language": "general.languages"}
        found = {name: fields[key].contents() for name, key in keys.items() if key in fields}
        return {name: value for name, value in found.items() if value} or _source_card_metadata(os.path.dirname(source))
    if os.path.isdir(source):
        return _source_card_metadata(source)
    return {}


def _verification_markdown(verification: Verification | None, config) -> str:
    if verification is None:
        return ("Not verified at conversion time (`python -m hf_attn_variants.convert ... --verify` compares the "
                "source's and the output's logits and perplexities).")
    outcome = (
        f"**passed**: a function-preserving conversion, equal to the source within {verification.tolerance:.2g}"
        if verification.function_preserving and verification.passed
        else "**failed**" if verification.function_preserving
        else "reported only: this variant changes the function (fine-tune before use)"
    )
    return "\n".join([
        f"Source and converted model run on {verification.num_tokens} tokens of {verification.text_label}, "
        f"from the saved {verification.weights_dtype} weights, computed in float32:",
        "",
        "| | source | converted |",
        "|---|---|---|",
        f"| perplexity | {verification.source_perplexity:.4f} | {verification.output_perplexity:.4f} |",
        "",
        f"- max \\|Δlogit\\| = {verification.max_abs_logit_diff:.3g} — {outcome}.",
    ])


def _function_note(config) -> str:
    if _function_preserving(config):
        note = "Softmax attention with RoPE, as in the source: the converted model computes the source's function."
        if config.layer_shortcut:
            note += (" The layer shortcut's output projection starts at zero, so the logits equal the source's until "
                     "training moves it; fine-tune (e.g. LoRA with `hf_attn_variants.lora.lora_config`) to use it.")
        return note
    return ("Stick-breaking attention (or attention without RoPE) replaces the source's softmax attention: the "
            "converted model computes a different function and needs fine-tuning (for example LoRA with "
            "`hf_attn_variants.lora.lora_config`) before it is useful.")
