"""Constants, errors and small helpers shared by the conversion modules."""

from __future__ import annotations

import contextlib
import re
import warnings

import torch

from .. import cli_common as _common
from ..models import AttnVariantLlamaConfig


SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


# llama.cpp writes Mistral checkpoints with the llama architecture; gguf-py has no plain "mistral" one.
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# Family fields a conversion may set. `attention_qkv_bias` and `query_key_norm` are facts of the source architecture.
VARIANT_OPTIONS = tuple(
    name for name in AttnVariantLlamaConfig.__annotations__ if name not in ("attention_qkv_bias", "query_key_norm")
)


# Parameters the variant adds (initialised function-preservingly); everything else must come from the source.
NEW_PARAMETER_MARKERS = ("shortcut.", "stickbreaking_remainder_bias")


# Non-persistent buffers that some old checkpoints carry; recomputed from the config, never needed.
_IGNORABLE_SOURCE_TENSOR = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


_SAFETENSORS_DTYPES = {"F32": "float32", "F64": "float32", "BF16": "bfloat16", "F16": "float16"}


_GGUF_FLOAT_DTYPES = {"F32": "float32", "F64": "float32", "BF16": "bfloat16", "F16": "float16"}


# Source config fields that do not describe an AttnVariantLlama (sliding windows are refused before this).
_CONFIG_FIELDS_NOT_CARRIED = (
    "architectures", "auto_map", "model_type", "transformers_version", "_name_or_path", "_model_name_or_path",
    "name_or_path", "quantization_config", "torch_dtype", "dtype", "use_sliding_window", "sliding_window",
    "max_window_layers", "layer_types", "_attn_implementation_autoset", "_commit_hash",
)


TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


# Loading arguments that transformers writes back into tokenizer_config.json; they mean nothing to a reader.
_TOKENIZER_LOADING_LEFTOVERS = (
    "local_files_only", "is_local", "cache_dir", "force_download", "resume_download", "proxies", "token",
    "use_auth_token", "revision", "subfolder", "_commit_hash", "_from_auto", "trust_remote_code", "gguf_file",
    "name_or_path",
)


_NO_MODEL_MAX_LENGTH = 1e29  # transformers' VERY_LARGE_INTEGER (int(1e30)) means "not set"


VERIFY_TOKENS = 512


VERIFY_TEXT_LABEL = "Pride and Prejudice, chapter 1 (Jane Austen, public domain)"


class ConversionError(_common.CommandError):
    """A refusal or failure explained in one line (the CLI prints it and exits with status 2)."""


class OutputExistsError(ConversionError, _common.OutputExistsError):
    """The output folder exists and `overwrite` was not given."""


class VerificationError(ConversionError):
    """`--verify` found the output computing something else than a function-preserving conversion must."""


class PushError(ConversionError):
    """Uploading the finished folder to the Hub failed; the local folder is complete."""


class ConversionInterrupted(_common.Interrupted):
    """SIGTERM/SIGHUP arrived while the output was being written (raised like KeyboardInterrupt)."""


class ConversionWarning(UserWarning):
    """Something was skipped (e.g. an unreadable tokenizer); the conversion itself went on."""


def _warn(message: str):
    warnings.warn(message, ConversionWarning, stacklevel=3)


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load reports (our own checks report), restoring the caller's verbosity."""
    from transformers.utils import logging as transformers_logging

    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(level)


@contextlib.contextmanager
def _transformers_progress(enabled: bool):
    from transformers.utils import logging as transformers_logging

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    was = transformers_logging.is_progress_bar_enabled()
    (transformers_logging.enable_progress_bar if enabled else transformers_logging.disable_progress_bar)()
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    if not enabled and gguf_tqdm is not None:  # the GGUF dequantization bar ignores transformers' switch
        gguf_utils.tqdm = lambda *args, **kwargs: gguf_tqdm(*args, **{**kwargs, "disable": True})
    try:
        yield
    finally:
        (transformers_logging.enable_progress_bar if was else transformers_logging.disable_progress_bar)()
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm


def _natural_key(name: str):
    """transformers' state-dict sort key (numbers numerically), which save_pretrained shards by."""
    try:
        from transformers.core_model_loading import dot_natural_key
    except ImportError:  # pragma: no cover - older transformers
        return tuple((0, int(p)) if p.isdigit() else (1, p) for p in name.split("."))
    return dot_natural_key(name)


_first_line = _common.first_line


def _names(names, limit: int = 4) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... {len(names) - limit} more" if len(names) > limit else "") if names else "none"


def _count(items, noun):
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _human_bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
