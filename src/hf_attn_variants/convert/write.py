"""Writing the folder: output checks, staging folder renamed when complete, signals, permissions (the shared layer
is `hf_attn_variants.cli_common`)."""

from __future__ import annotations

import os

from tqdm import tqdm

from .. import cli_common as _common
from .common import _natural_key, ConversionError, ConversionInterrupted, OutputExistsError
from .load import clean_tokenizer_config


def check_output_path(output_dir, overwrite: bool = False, protect=()) -> str:
    """The absolute output path; refuses an empty path, the current folder, the source and their ancestors, and an
    existing folder unless `overwrite` (checked before anything slow happens)."""
    return _common.check_output_path(output_dir, overwrite, protect, error=ConversionError,
                                     exists_error=OutputExistsError)


_umask = _common.umask


_normal_permissions = _common.normal_permissions


def _signals_raise():
    """While active (main thread only), SIGTERM/SIGHUP raise ConversionInterrupted so cleanup code runs."""
    return _common.signals_raise(ConversionInterrupted)


def staging_folder(output_dir: str, overwrite: bool = False):
    """Yield a hidden `.partial-*` sibling of `output_dir`; rename it to `output_dir` when the block succeeds.

    Any exception, Ctrl-C, SIGTERM or SIGHUP removes it. The folder and its files get the permissions the umask gives
    new ones (tempfile makes the folder 0700; safetensors writes its files 0600). An existing output (with
    `overwrite`) is replaced only once the new one is done.
    """
    return _common.staging_folder(output_dir, overwrite, exists_error=OutputExistsError,
                                  interrupted=ConversionInterrupted)


def _publish(staging: str, output: str, overwrite: bool):
    _common.publish(staging, output, overwrite, exists_error=OutputExistsError)


def save_atomically(model, output_dir: str, tokenizer=None, model_card: str | None = None, overwrite: bool = False,
                    max_shard_size=None, protect=()):
    """Write the model (and tokenizer, card) to `output_dir` via a `.partial-*` sibling renamed at the end."""
    output = check_output_path(output_dir, overwrite=overwrite, protect=protect)
    with staging_folder(output, overwrite=overwrite) as staging:
        _save_into(staging, model, tokenizer, max_shard_size)
        if model_card is not None:
            _write_text(os.path.join(staging, "README.md"), model_card)
    return output


def _save_into(staging, model, tokenizer, max_shard_size, progress: bool = False):
    steps = ["weights"] + (["tokenizer"] if tokenizer is not None else [])
    for step in tqdm(steps, desc="save", unit="part", disable=not progress, leave=False):
        if step == "weights":
            # An explicit, name-sorted state dict: the shards are then the ones `--dry-run` predicts, whichever way
            # the model was built (transformers sorts only models it loaded with weight conversions).
            state = dict(sorted(model.state_dict().items(), key=lambda item: _natural_key(item[0])))
            model.save_pretrained(staging, state_dict=state, max_shard_size=max_shard_size or "50GB")
        else:
            tokenizer.save_pretrained(staging)
            clean_tokenizer_config(staging, getattr(model.config, "max_position_embeddings", None))


def _write_text(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
