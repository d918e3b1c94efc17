"""Loading the source weights into the family model, and the tokenizer."""

from __future__ import annotations

import copy
import json
import os

import torch
from transformers import AutoTokenizer

from ..models import AttnVariantLlamaConfig, AttnVariantLlamaForCausalLM
from .common import (
    _first_line,
    _IGNORABLE_SOURCE_TENSOR,
    _names,
    _NO_MODEL_MAX_LENGTH,
    _quiet_transformers,
    _TOKENIZER_LOADING_LEFTOVERS,
    _warn,
    ConversionError,
    TOKENIZER_FILES,
)
from .plan import build_target_config, check_tensors, expected_tensors, new_parameter_names
from .sources import _gguf_stock_class, SourceCheckpoint


def load_converted_model(source: SourceCheckpoint, config: AttnVariantLlamaConfig, dtype: torch.dtype,
                         seed: int = 0, return_source_model: bool = False):
    """Load the source weights straight into the family model (a GGUF goes through transformers' own class).

    With `return_source_model`, also return transformers' model of a GGUF source (it shares the weights, so keeping
    it costs no memory; `verify_conversion` then need not dequantize the file again), or None for safetensors.
    """
    stock = None
    with _quiet_transformers(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the variant's new parameters (shortcut q/k/v) are reproducible
        if source.gguf_file is None:
            model, info = AttnVariantLlamaForCausalLM.from_pretrained(
                source.folder, config=copy.deepcopy(config), dtype=dtype, use_safetensors=True,
                output_loading_info=True,
            )
        else:
            stock = _dequantized(_gguf_stock_class(source.model_type).from_pretrained(
                source.folder, gguf_file=source.gguf_file, dtype=dtype
            ))
            model, info = _family_from_state_dict(stock, config, dtype)
    _check_loading_info(info, source.label)
    if return_source_model:
        return model.eval(), stock
    return model.eval()


def convert_model(source_model, **variant_options) -> AttnVariantLlamaForCausalLM:
    """Build the family model from an in-memory llama/mistral/qwen2/qwen3 `*ForCausalLM` (weights shared, not copied).

    Every source weight must find its place with its shape; only the variant's new parameters (shortcut, remainder
    bias) are initialised, function-preservingly (zero output projections).
    """
    dtype = source_model.dtype
    label = type(source_model).__name__
    config = build_target_config(source_model.config, dtype=dtype, label=label, **variant_options)
    state = source_model.state_dict()
    check_tensors({k: tuple(v.shape) for k, v in state.items() if not _IGNORABLE_SOURCE_TENSOR.search(k)},
                  expected_tensors(config), config.tie_word_embeddings, label, source_model.config.model_type)
    with _quiet_transformers():
        model, info = _family_from_state_dict(source_model, config, dtype)
    _check_loading_info(info, label)
    return model.eval()


convert_llama_model = convert_model  # the name of releases that converted Llama only


def _dequantized(model):
    """A model loaded from GGUF holds plain (dequantized) weights; drop the quantizer so it can be cast and saved."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def _family_from_state_dict(stock, config, dtype):
    state = {k: v for k, v in stock.state_dict().items() if not _IGNORABLE_SOURCE_TENSOR.search(k)}
    model, info = AttnVariantLlamaForCausalLM.from_pretrained(
        None, config=copy.deepcopy(config), state_dict=state, dtype=dtype, output_loading_info=True
    )
    if getattr(stock, "generation_config", None) is not None:
        model.generation_config = copy.deepcopy(stock.generation_config)
    return model, info


def _check_loading_info(info: dict, label: str):
    """What transformers reports after loading must agree with the header check (defence in depth)."""
    missing = sorted(set(info.get("missing_keys", ())) - set(new_parameter_names(info.get("missing_keys", ()))))
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not _IGNORABLE_SOURCE_TENSOR.search(k))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    if missing or unexpected or mismatched:
        raise ConversionError(
            f"loading {label} left weights unset or unused: missing {_names(missing)}, unexpected "
            f"{_names(unexpected)}, mismatched {_names(mismatched)}"
        )


def load_tokenizer(source: SourceCheckpoint):
    """The source tokenizer, or None with a ConversionWarning naming what was skipped."""
    if not source.has_tokenizer:
        looked = "GGUF tokenizer metadata (tokenizer.ggml.*)" if source.gguf_file else ", ".join(TOKENIZER_FILES[:5])
        _warn(f"{source.label} has no tokenizer (looked for {looked}); the output folder has none either")
        return None
    try:
        with _quiet_transformers():
            if source.gguf_file:
                return AutoTokenizer.from_pretrained(source.folder, gguf_file=source.gguf_file, trust_remote_code=False)
            return AutoTokenizer.from_pretrained(source.folder, trust_remote_code=False)
    except Exception as error:
        _warn(
            f"the tokenizer of {source.label} could not be read ({type(error).__name__}: {_first_line(error)}); "
            f"skipped {', '.join(source.tokenizer_files)}: the output folder has no tokenizer"
        )
        return None


def clean_tokenizer_config(folder: str, model_max_length: int | None = None) -> None:
    """Drop loading-time leftovers from `folder/tokenizer_config.json`; replace an unset (1e30) model_max_length."""
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    for key in _TOKENIZER_LOADING_LEFTOVERS:
        data.pop(key, None)
    length = data.get("model_max_length")
    if isinstance(length, (int, float)) and length >= _NO_MODEL_MAX_LENGTH:
        if model_max_length:
            data["model_max_length"] = int(model_max_length)
        else:
            data.pop("model_max_length")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
