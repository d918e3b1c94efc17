"""Convert a Llama, Mistral, Qwen2 or Qwen3 checkpoint into the AttnVariantLlama family, as a self-contained folder.

    python -m hf_attn_variants.convert SOURCE OUTPUT [--gguf-file F] [--attention-variant stickbreaking]
        [--layer-shortcut --shortcut-mode depth_context] [--dtype auto|float32|bfloat16|float16]
        [--max-shard-size 2GB] [--verify [--verify-text FILE]] [--dry-run] [--push-to-hub REPO [--private]]

SOURCE is a folder with `config.json` and safetensors weights (one file or shards with an index), a Hub model id, or a
GGUF file (`--gguf-file NAME` inside the folder, or the .gguf path itself). Before anything slow happens the source
files' tensor names and shapes are checked against the target model: a missing, extra or reshaped tensor is an error
(pickled `.bin` weights are refused; they can run code when loaded).

The output folder holds `config.json` (with `auto_map` and the variant), the safetensors weights, the tokenizer, the
flat remote-code files and a Hub model card (`README.md`), so `AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)` works with only torch and transformers. It appears atomically: everything is written to a
hidden `.partial-*` sibling that is renamed at the end; an error, Ctrl-C or SIGTERM removes it, so a failed conversion
leaves nothing behind.

`--verify` runs the source (loaded by transformers' own class) and the written output on a text and reports the largest
logit difference and both perplexities; a function-preserving conversion (softmax, with or without the layer
shortcut) fails if they differ beyond float rounding.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import re
import sys
import warnings
from collections import Counter
from importlib import resources

import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from . import cli_common as _common
from .models import AttnVariantLlamaConfig, AttnVariantLlamaForCausalLM

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
# The opening of data/austen/austen_prideprejudice.txt, shipped inside the package so `--verify` works anywhere.
AUSTEN_EXCERPT = """\
It is a truth universally acknowledged, that a single man in possession
of a good fortune, must be in want of a wife.

However little known the feelings or views of such a man may be on his
first entering a neighbourhood, this truth is so well fixed in the minds
of the surrounding families, that he is considered the rightful property
of some one or other of their daughters.

"My dear Mr. Bennet," said his lady to him one day, "have you heard that
Netherfield Park is let at last?"

Mr. Bennet replied that he had not.

"But it is," returned she; "for Mrs. Long has just been here, and she
told me all about it."

Mr. Bennet made no answer.

"Do you not want to know who has taken it?" cried his wife impatiently.

"_You_ want to tell me, and I have no objection to hearing it."

This was invitation enough.

"Why, my dear, you must know, Mrs. Long says that Netherfield is taken
by a young man of large fortune from the north of England; that he came
down on Monday in a chaise and four to see the place, and was so much
delighted with it, that he agreed with Mr. Morris immediately; that he
is to take possession before Michaelmas, and some of his servants are to
be in the house by the end of next week."

"What is his name?"

"Bingley."

"Is he married or single?"

"Oh! Single, my dear, to be sure! A single man of large fortune; four or
five thousand a year. What a fine thing for our girls!"

"How so? How can it affect them?"

"My dear Mr. Bennet," replied his wife, "how can you be so tiresome! You
must know that I am thinking of his marrying one of them."

"Is that his design in settling here?"

"Design! Nonsense, how can you talk so! But it is very likely that he
_may_ fall in love with one of them, and therefore you must visit him as
soon as he comes."

"I see no occasion for that. You and the girls may go, or you may send
them by themselves, which perhaps will be still better, for as you are
as handsome as any of them, Mr. Bingley may like you the best of the
party."

"My dear, you flatter me. I certainly _have_ had my share of beauty, but
I do not pretend to be anything extraordinary now. When a woman has five
grown-up daughters, she ought to give over thinking of her own beauty."

"In such cases, a woman has not often much beauty to think of."

"But, my dear, you must indeed go and see Mr. Bingley when he comes into
the neighbourhood."

"It is more than I engage for, I assure you."

"But consider your daughters. Only think what an establishment it would
be for one of them. Sir William and Lady Lucas are determined to
go, merely on that account, for in general, you know, they visit no
newcomers. Indeed you must go, for it will be impossible for _us_ to
visit him if you do not."

"You are over-scrupulous, surely. I dare say Mr. Bingley will be very
glad to see you; and I will send a few lines by you to assure him of my
hearty consent to his marrying whichever he chooses of the girls; though
I must throw in a good word for my little Lizzy."

"I desire you will do no such thing. Lizzy is not a bit better than the
others; and I am sure she is not half so handsome as Jane, nor half so
good-humoured as Lydia. But you are always giving _her_ the preference."
"""


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


# --------------------------------------------------------------------------------------------------------------------
# Source: where it is, what it holds (read from the file headers only)
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SourceCheckpoint:
    """A source checkpoint as read from its files' headers, before any weight is loaded."""

    spec: str  # what the caller passed
    folder: str  # local folder holding the files
    gguf_file: str | None  # file name inside `folder`, for a GGUF source
    hub_id: str | None  # Hub id when the source came from the Hub
    model_type: str  # llama | mistral | qwen2 | qwen3 (for a GGUF: its architecture)
    config: object  # the source architecture's transformers config
    raw_config: dict  # what the files say about sliding windows etc. (config.json, or GGUF metadata)
    tensors: dict  # transformers name -> shape
    dtype_numel: Counter  # float dtype name -> number of elements stored in it
    weight_files: list
    label: str  # how the output names its source (Hub id or folder name; never an absolute local path)
    card_metadata: dict  # license / license_name / license_link / language carried over from the source
    has_tokenizer: bool
    tokenizer_files: list
    ignored_tensors: list = dataclasses.field(default_factory=list)
    unmapped_tensors: list = dataclasses.field(default_factory=list)  # GGUF tensors with no transformers name

    @property
    def format(self) -> str:
        return "gguf" if self.gguf_file else "safetensors"

    @property
    def path(self) -> str:
        return os.path.join(self.folder, self.gguf_file) if self.gguf_file else self.folder

    @property
    def auto_dtype(self) -> torch.dtype:
        """The dtype the source stores its weights in (the most elements); float32 for quantized GGUF tensors."""
        if not self.dtype_numel:
            return torch.float32
        return DTYPES[self.dtype_numel.most_common(1)[0][0]]


def inspect_source(source, gguf_file: str | None = None, progress: bool = False) -> SourceCheckpoint:
    """Locate `source` and read its config and tensor list (names, shapes, dtypes) without loading any weight."""
    folder, gguf_file, hub_id = _resolve_source(os.fspath(source), gguf_file)
    if gguf_file is not None:
        return _inspect_gguf(os.fspath(source), folder, gguf_file, hub_id, progress)
    return _inspect_safetensors(os.fspath(source), folder, hub_id, progress)


def _resolve_source(source: str, gguf_file: str | None):
    if gguf_file is None and source.endswith(".gguf") and os.path.isfile(source):
        folder, name = os.path.split(os.path.abspath(source))
        return folder, name, None
    if gguf_file is not None and os.path.isabs(gguf_file):
        if not os.path.isfile(gguf_file):
            raise ConversionError(f"GGUF file {gguf_file!r} does not exist")
        folder, name = os.path.split(gguf_file)
        return folder, name, None
    if os.path.isdir(source):
        if gguf_file is not None and not os.path.isfile(os.path.join(source, gguf_file)):
            raise ConversionError(f"GGUF file {gguf_file!r} not found in {source!r}")
        return os.path.abspath(source), gguf_file, None
    if os.path.exists(source):
        raise ConversionError(
            f"source {source!r} is a file, not a checkpoint folder (pass a .gguf file, or a folder with config.json)"
        )
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source) and not source.startswith("."):
        return _download_from_hub(source, gguf_file)
    raise ConversionError(
        f"source {source!r} does not exist (expected a checkpoint folder, a .gguf file or a Hub model id)"
    )


def _download_from_hub(repo_id: str, gguf_file: str | None):
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        if gguf_file is not None:
            folder = os.path.dirname(hf_hub_download(repo_id, gguf_file))
            with contextlib.suppress(Exception):  # the card only supplies the license
                hf_hub_download(repo_id, "README.md")
        else:
            patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "README.md"]
            folder = snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as error:
        raise ConversionError(
            f"source {repo_id!r} is not a local folder and could not be fetched from the Hub "
            f"({type(error).__name__}: {_first_line(error)})"
        ) from error
    return folder, gguf_file, repo_id


def _source_label(folder: str, gguf_file: str | None, hub_id: str | None) -> str:
    """Hub id, or the folder name (`folder/file.gguf` for a GGUF): never an absolute path of this machine."""
    if hub_id:
        return hub_id
    folder = os.path.normpath(os.path.abspath(folder))
    cached = re.search(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots[/\\][^/\\]+$", folder)
    if cached:  # a Hugging Face cache snapshot: name it by its repo
        return f"{cached.group(1)}/{cached.group(2)}"
    name = os.path.basename(folder) or "source"
    return f"{name}/{gguf_file}" if gguf_file else name


def _inspect_safetensors(spec: str, folder: str, hub_id: str | None, progress: bool) -> SourceCheckpoint:
    from safetensors import safe_open

    label = _source_label(folder, None, hub_id)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
        hint = f" (it holds {ggufs[0]}: pass --gguf-file {ggufs[0]})" if ggufs else ""
        raise ConversionError(f"{label} has no config.json{hint}")
    try:
        with open(config_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as error:
        raise ConversionError(f"{label}/config.json is unreadable: {_first_line(error)}") from error
    model_type = raw.get("model_type")
    _require_supported(model_type, label)
    if raw.get("quantization_config"):
        method = raw["quantization_config"].get("quant_method", "?")
        raise ConversionError(
            f"{label} is a quantized checkpoint (quantization_config: {method}); convert the unquantized weights"
        )
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)

    index_path = os.path.join(folder, "model.safetensors.index.json")
    weight_map = None
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as error:
            raise ConversionError(
                f"{label}/model.safetensors.index.json is unreadable: {_first_line(error)}"
            ) from error
        files = sorted(set(weight_map.values()))
        absent = [name for name in files if not os.path.isfile(os.path.join(folder, name))]
        if absent:
            raise ConversionError(f"{label}: shard {absent[0]} listed in model.safetensors.index.json is missing")
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        pickled = sorted(f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
        if pickled:
            raise ConversionError(
                f"{label} has only pickled weights ({pickled[0]}); they are refused because unpickling can run code: "
                "convert them to safetensors first"
            )
        raise ConversionError(f"{label} has no model.safetensors or model.safetensors.index.json")

    tensors, dtype_numel, ignored = {}, Counter(), []
    for name in tqdm(files, desc="check: read safetensors headers", unit="file", disable=not progress, leave=False):
        try:
            with safe_open(os.path.join(folder, name), framework="pt") as handle:
                for key in handle.keys():
                    piece = handle.get_slice(key)
                    shape, dtype = tuple(int(d) for d in piece.get_shape()), piece.get_dtype()
                    if key in tensors:
                        raise ConversionError(f"{label}: tensor {key} is stored twice (second time in {name})")
                    if weight_map is not None and weight_map.get(key) != name:
                        raise ConversionError(
                            f"{label}: {name} holds {key}, which model.safetensors.index.json places in "
                            f"{weight_map.get(key)!r}"
                        )
                    if _IGNORABLE_SOURCE_TENSOR.search(key):
                        ignored.append(key)
                        continue
                    tensors[key] = shape
                    if dtype in _SAFETENSORS_DTYPES:
                        dtype_numel[_SAFETENSORS_DTYPES[dtype]] += math.prod(shape)
        except ConversionError:
            raise
        except Exception as error:
            raise ConversionError(f"{label}/{name} is not a readable safetensors file: {_first_line(error)}") from error
    if weight_map is not None:
        unlisted = sorted(set(weight_map) - set(tensors) - set(ignored))
        if unlisted:
            raise ConversionError(
                f"{label}: model.safetensors.index.json lists {len(unlisted)} tensor(s) no shard holds "
                f"({_names(unlisted)})"
            )
    tokenizer_files = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, f))]
    return SourceCheckpoint(
        spec=spec, folder=folder, gguf_file=None, hub_id=hub_id, model_type=model_type, config=config,
        raw_config=raw, tensors=tensors, dtype_numel=dtype_numel, weight_files=files, label=label,
        card_metadata=_source_card_metadata(folder), has_tokenizer=bool(tokenizer_files),
        tokenizer_files=tokenizer_files, ignored_tensors=ignored,
    )


def _gguf_stock_class(architecture: str):
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

    return {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "qwen3": Qwen3ForCausalLM}[architecture]


def _inspect_gguf(spec: str, folder: str, gguf_file: str, hub_id: str | None, progress: bool) -> SourceCheckpoint:
    from gguf import GGUFReader

    path = os.path.join(folder, gguf_file)
    label = _source_label(folder, gguf_file, hub_id)
    try:
        reader = GGUFReader(path)
    except Exception as error:
        raise ConversionError(f"{label} is not a readable GGUF file: {_first_line(error)}") from error

    def field(key):
        entry = reader.fields.get(key)
        return None if entry is None else entry.contents()

    architecture = field("general.architecture")
    if architecture not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ConversionError(
            f"{label} is a GGUF of architecture {architecture!r}; supported GGUF architectures: "
            f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)} (Mistral GGUFs use llama); safetensors sources may be "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    repository = field("general.source.huggingface.repository")
    if not hub_id and isinstance(repository, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", repository):
        label = repository  # the Hub checkpoint the GGUF was made from
    stock_class = _gguf_stock_class(architecture)
    with _quiet_transformers():
        config = stock_class.config_class.from_pretrained(folder, gguf_file=gguf_file)
    window = field(f"{architecture}.attention.sliding_window")
    raw = {
        "model_type": architecture,
        "max_position_embeddings": config.max_position_embeddings,
        "sliding_window": window,
        "use_sliding_window": window is not None,
    }
    # GGUF stores no window for these architectures unless the key above is there; transformers' class defaults
    # (e.g. Mistral's 4096) do not describe the file.
    if hasattr(config, "sliding_window"):
        config.sliding_window = window

    name_map = _gguf_to_transformers_names(architecture, stock_class, config)
    # Quantized blocks dequantize to float32: `auto` keeps float16/bfloat16 only when the matrices are stored so.
    tensors, unmapped, dtype_numel = {}, [], Counter()
    bar = dict(desc="check: read GGUF tensor list", unit="tensor", disable=not progress, leave=False)
    for tensor in tqdm(reader.tensors, **bar):
        shape = tuple(int(d) for d in reversed(list(tensor.shape)))  # ggml lists dimensions innermost first
        hf_name = name_map.get(tensor.name)
        if hf_name is None:
            unmapped.append(tensor.name)
            continue
        tensors[hf_name] = shape
        type_name = tensor.tensor_type.name
        if len(shape) >= 2:
            dtype_numel[_GGUF_FLOAT_DTYPES.get(type_name, "float32")] += math.prod(shape)
    card_metadata = {
        key: value
        for key, value in (
            ("license", field("general.license")),
            ("license_name", field("general.license.name")),
            ("license_link", field("general.license.link")),
            ("language", field("general.languages")),
        )
        if value
    }
    if not card_metadata.get("license"):
        card_metadata.update(_source_card_metadata(folder))
    has_tokenizer = field("tokenizer.ggml.model") is not None
    return SourceCheckpoint(
        spec=spec, folder=folder, gguf_file=gguf_file, hub_id=hub_id, model_type=architecture, config=config,
        raw_config=raw, tensors=tensors, dtype_numel=dtype_numel, weight_files=[gguf_file], label=label,
        card_metadata=card_metadata, has_tokenizer=has_tokenizer,
        tokenizer_files=["GGUF tokenizer metadata (tokenizer.ggml.*)"] if has_tokenizer else [],
        unmapped_tensors=unmapped,
    )


def _gguf_to_transformers_names(architecture: str, stock_class, config) -> dict:
    """GGUF tensor name -> transformers name, as transformers' GGUF loader maps them (gguf-py's tensor name map).

    The same lookup as `transformers.modeling_gguf_pytorch_utils.get_gguf_hf_weights_map` for these architectures
    (whose tensor processors keep names), done once instead of once per submodule.
    """
    import gguf

    arch = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == architecture)
    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    with torch.device("meta"), _quiet_transformers():
        names = list(stock_class(copy.deepcopy(config)).state_dict())
    mapping = {}
    for hf_name in names:
        base, suffix = hf_name, ""
        if hf_name.endswith((".weight", ".bias")):
            base, suffix = hf_name.rsplit(".", 1)
            suffix = "." + suffix
        gguf_name = name_map.get_name(base)
        if gguf_name is not None:
            mapping.setdefault(gguf_name + suffix, hf_name)
    return mapping


def _source_card_metadata(folder: str) -> dict:
    """license / license_name / license_link / language from the source's README.md card, when it has one."""
    path = os.path.join(folder, "README.md")
    if not os.path.isfile(path):
        return {}
    try:
        from huggingface_hub import ModelCard

        data = ModelCard.load(path).data.to_dict()
    except Exception:
        return {}
    return {key: data[key] for key in ("license", "license_name", "license_link", "language") if data.get(key)}


def _require_supported(model_type, label):
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(
            f"{label} holds a {model_type!r} model; supported source types: {', '.join(SUPPORTED_MODEL_TYPES)} "
            f"(safetensors), or GGUF files of architecture {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )


# --------------------------------------------------------------------------------------------------------------------
# Target: the AttnVariantLlama config and the tensors it expects
# --------------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------------
# Plan (what `--dry-run` prints)
# --------------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------------
# Load and convert
# --------------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Verification:
    text_label: str
    num_tokens: int
    tokenized: bool  # False: no tokenizer, seeded random token ids were used (perplexities then mean little)
    max_abs_logit_diff: float
    tolerance: float
    source_perplexity: float
    output_perplexity: float
    function_preserving: bool
    weights_dtype: str

    @property
    def passed(self) -> bool:
        finite = math.isfinite(self.max_abs_logit_diff) and math.isfinite(self.output_perplexity)
        return finite and (not self.function_preserving or self.max_abs_logit_diff <= self.tolerance)

    def summary(self) -> str:
        outcome = (
            ("passed" if self.passed else "FAILED") + f" (function-preserving: tolerance {self.tolerance:.2g})"
            if self.function_preserving
            else "reported only (stick-breaking or NoPE changes the function; fine-tune before use)"
        )
        return (
            f"max |Δlogit| = {self.max_abs_logit_diff:.3g}, perplexity source {self.source_perplexity:.4g} -> output "
            f"{self.output_perplexity:.4g} on {self.num_tokens} tokens of {self.text_label}; {outcome}"
        )


def verify_conversion(source: SourceCheckpoint, output_folder: str, text: str | None = None,
                      text_label: str | None = None, max_tokens: int = VERIFY_TOKENS, progress: bool = False,
                      source_model=None) -> Verification:
    """Run the source (transformers' own class) and the saved output on `text`; compare logits and perplexities.

    Both load the saved weights' dtype (the source is cast the way the output was) and compute in float32, so a
    function-preserving conversion must agree to float rounding. `source_model`: transformers' model of the source
    already loaded in that dtype (used instead of loading it again).
    """
    with open(os.path.join(output_folder, "config.json"), encoding="utf-8") as f:
        saved = json.load(f)
    dtype = DTYPES.get(saved.get("dtype") or "float32", torch.float32)
    config = AttnVariantLlamaConfig.from_pretrained(output_folder)
    text = AUSTEN_EXCERPT if text is None else text
    text_label = text_label or (VERIFY_TEXT_LABEL if text is AUSTEN_EXCERPT else "the given text")
    limit = max(2, min(max_tokens, config.max_position_embeddings))
    tokenizer = None
    if any(os.path.isfile(os.path.join(output_folder, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(output_folder)
    if tokenizer is not None:
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=limit).input_ids
    else:  # no tokenizer: the logits comparison still means something, the perplexities little
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, config.vocab_size, (1, min(256, limit)), generator=generator)
        text_label = "seeded random token ids (no tokenizer)"
    if ids.shape[1] < 2:
        raise ConversionError(f"the verification text gives {ids.shape[1]} token(s); at least 2 are needed")

    results = {}
    steps = [("output", None), ("source", None)]
    for which, _ in tqdm(steps, desc="verify", unit="model", disable=not progress, leave=False):
        with _quiet_transformers():
            if which == "output":
                model = AttnVariantLlamaForCausalLM.from_pretrained(output_folder, dtype=dtype)
            elif source_model is not None:
                model, source_model = source_model, None
            elif source.gguf_file:
                model = _dequantized(_gguf_stock_class(source.model_type).from_pretrained(
                    source.folder, gguf_file=source.gguf_file, dtype=dtype
                ))
            else:
                model = AutoModelForCausalLM.from_pretrained(
                    source.folder, dtype=dtype, use_safetensors=True, trust_remote_code=False
                )
        model = model.float().eval()
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
        results[which] = (logits, math.exp(min(loss.item(), 700.0)))
        del model
    diff = (results["output"][0] - results["source"][0]).abs().max().item()
    scale = max(1.0, results["source"][0].abs().max().item())
    return Verification(
        text_label=text_label, num_tokens=int(ids.shape[1]), tokenized=tokenizer is not None,
        max_abs_logit_diff=diff, tolerance=8 * torch.finfo(torch.float32).eps * scale,
        source_perplexity=results["source"][1], output_perplexity=results["output"][1],
        function_preserving=_function_preserving(config), weights_dtype=_dtype_name(dtype),
    )


# --------------------------------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------------
# Writing the folder: staging, publishing, signals, permissions
# --------------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------------
# Publishing to the Hub
# --------------------------------------------------------------------------------------------------------------------


def push_folder(folder: str, repo_id: str, private: bool = False, commit_message: str | None = None) -> str:
    """Upload a finished converted folder (card included) to the Hub; PushError in one line if it cannot."""
    from huggingface_hub import HfApi, constants, get_token

    hint = f"the converted folder {folder} is complete; upload it later with `hf upload {repo_id} {folder}`"
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise PushError(f"cannot push to {repo_id}: offline mode is on (HF_HUB_OFFLINE=1); {hint}")
    token = get_token()
    if not token:
        raise PushError(
            f"cannot push to {repo_id}: no Hugging Face token (run `hf auth login` or set HF_TOKEN); {hint}"
        )
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            folder_path=folder, repo_id=url.repo_id, repo_type="model",
            commit_message=commit_message or "Upload AttnVariantLlama conversion (hf-attn-variants)",
        )
    except Exception as error:
        raise PushError(f"cannot push to {repo_id}: {type(error).__name__}: {_first_line(error)}; {hint}") from error
    return str(url)


# --------------------------------------------------------------------------------------------------------------------
# The whole conversion
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ConversionResult:
    output_dir: str
    plan: ConversionPlan
    model: AttnVariantLlamaForCausalLM | None = None
    verification: Verification | None = None
    pushed_to: str | None = None
    dry_run: bool = False


def plan_conversion(source, output_dir, *, gguf_file=None, dtype="auto", overwrite=False, max_shard_size=None,
                    verify=False, verify_label=None, push_to_hub=None, private=False, progress=False,
                    **variant_options) -> ConversionPlan:
    """Everything `convert_checkpoint` checks before loading weights; what `--dry-run` prints."""
    output = check_output_path(output_dir, overwrite=overwrite)  # before anything slow
    info = inspect_source(source, gguf_file, progress=progress)
    output = check_output_path(output_dir, overwrite=overwrite, protect=[info.folder])
    if dtype is None or dtype == "auto":
        torch_dtype, reason = info.auto_dtype, "auto: the source's"
    elif isinstance(dtype, torch.dtype):
        torch_dtype, reason = dtype, "requested"
    elif dtype in DTYPES:
        torch_dtype, reason = DTYPES[dtype], "requested"
    else:
        raise ConversionError(f"dtype {dtype!r} is not supported; expected auto or one of {sorted(DTYPES)}")
    config = build_target_config(info.config, dtype=torch_dtype, raw_config=info.raw_config, label=info.label,
                                 **variant_options)
    expected = expected_tensors(config)
    check_tensors(info.tensors, expected, config.tie_word_embeddings, info.label, info.model_type,
                  unmapped=info.unmapped_tensors, progress=progress)
    files, weight_bytes = _planned_files(config, expected, torch_dtype, max_shard_size)
    counted = {n: s for n, s in expected.items() if not (config.tie_word_embeddings and n == "lm_head.weight")}
    return ConversionPlan(
        source=info, config=config, dtype=torch_dtype, dtype_reason=reason, output_dir=output,
        replaces=os.path.lexists(output), files=files, weight_bytes=weight_bytes,
        num_parameters=sum(math.prod(s) for s in counted.values()), new_parameters=new_parameter_names(expected),
        verify=verify, verify_label=verify_label or VERIFY_TEXT_LABEL, push_to_hub=push_to_hub, private=private,
    )


def convert_checkpoint(
    source,
    output_dir,
    *,
    gguf_file: str | None = None,
    dtype="auto",
    overwrite: bool = False,
    max_shard_size=None,
    verify: bool = False,
    verify_text: str | None = None,
    verify_text_label: str | None = None,
    verify_tokens: int = VERIFY_TOKENS,
    dry_run: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
    base_model: str | None = None,
    seed: int = 0,
    keep_model: bool = True,
    progress: bool = False,
    **variant_options,
) -> ConversionResult:
    """Check, load, convert, save (atomically), optionally verify and push. See the module docstring.

    `variant_options` are AttnVariantLlamaConfig fields (`attention_variant`, `layer_shortcut`, `shortcut_mode`, ...).
    `verify_text` is the text itself (default: the shipped Austen excerpt). Nothing is written when `dry_run`.
    """
    if verify_text is not None and not verify_text.strip():
        raise ConversionError("the verification text is empty")
    with _transformers_progress(progress):
        stages = tqdm(total=6, desc="convert", unit="stage", disable=not progress, leave=False)
        try:
            stages.set_postfix_str("check")
            plan = plan_conversion(
                source, output_dir, gguf_file=gguf_file, dtype=dtype, overwrite=overwrite,
                max_shard_size=max_shard_size, verify=verify, verify_label=verify_text_label, push_to_hub=push_to_hub,
                private=private, progress=progress, **variant_options,
            )
            stages.update(1)
            if dry_run:
                return ConversionResult(output_dir=plan.output_dir, plan=plan, dry_run=True)
            info = plan.source
            stages.set_postfix_str("tokenizer")
            tokenizer = load_tokenizer(info)
            stages.update(1)
            stages.set_postfix_str("load + convert")
            model, source_model = load_converted_model(info, plan.config, plan.dtype, seed=seed,
                                                       return_source_model=True)
            if not verify:
                source_model = None
            stages.update(1)
            verification = None
            with staging_folder(plan.output_dir, overwrite=overwrite) as staging:
                stages.set_postfix_str("save")
                _save_into(staging, model, tokenizer, max_shard_size, progress=progress)
                stages.update(1)
                if verify:
                    stages.set_postfix_str("verify")
                    verification = verify_conversion(info, staging, text=verify_text, text_label=verify_text_label,
                                                     max_tokens=verify_tokens, progress=progress,
                                                     source_model=source_model)
                    if not verification.passed:
                        raise VerificationError(
                            f"verification failed: {verification.summary()}; nothing was written"
                        )
                source_model = None
                stages.update(1)
                card = render_model_card(model, info.spec, base_model=base_model, verification=verification,
                                         repo_id=push_to_hub, source_info=info)
                _write_text(os.path.join(staging, "README.md"), card)
            result = ConversionResult(output_dir=plan.output_dir, plan=plan, model=model if keep_model else None,
                                      verification=verification)
            if not keep_model:
                del model
            if push_to_hub:
                stages.set_postfix_str("push")
                result.pushed_to = push_folder(plan.output_dir, push_to_hub, private=private)
            stages.update(1)
            return result
        finally:
            stages.close()


def convert_llama_checkpoint(source, output_dir, gguf_file=None, dtype="auto", overwrite=False, **variant_options):
    """Back-compatible entry point: convert and return the converted model."""
    return convert_checkpoint(source, output_dir, gguf_file=gguf_file, dtype=dtype, overwrite=overwrite,
                              **variant_options).model


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


_OneLineParser = _common.OneLineParser


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="python -m hf_attn_variants.convert",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source",
                        help="checkpoint folder (safetensors), Hub id, .gguf file, or the folder of --gguf-file")
    parser.add_argument("output_dir", help="the folder to create")
    parser.add_argument("--gguf-file", default=None, help="GGUF file name inside SOURCE")
    parser.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto",
                        help="weights dtype of the output; auto (default) keeps the source's")
    variant = parser.add_argument_group("variant")
    variant.add_argument("--attention-variant", choices=["softmax", "stickbreaking"], default="softmax")
    variant.add_argument("--use-rope", choices=["auto", "yes", "no"], default="auto",
                         help="auto: RoPE for softmax, none for stick-breaking")
    variant.add_argument("--rope-max-wavelength", type=float, default=None, metavar="POSITIONS",
                         help="leave rotary frequencies of a longer wavelength unrotated (p-RoPE), e.g. the source's "
                              "training window")
    variant.add_argument("--stickbreaking-remainder", choices=["none", "value", "bias"], default="none")
    variant.add_argument("--stickbreaking-attend-current", action="store_true")
    variant.add_argument("--layer-shortcut", action="store_true")
    variant.add_argument("--shortcut-mode", choices=["depth", "depth_context"], default="depth")
    variant.add_argument("--shortcut-source-layers", type=int, nargs="+", default=None)
    output = parser.add_argument_group("output")
    output.add_argument("--overwrite", action="store_true",
                        help="replace an existing OUTPUT folder (once the new one is complete)")
    output.add_argument("--max-shard-size", default=None,
                        help="e.g. 2GB: shard the safetensors weights (save_pretrained)")
    output.add_argument("--base-model", default=None, help="the card's base_model (default: the Hub id or folder name)")
    output.add_argument("--seed", type=int, default=0, help="seed of the variant's new parameters")
    checks = parser.add_argument_group("checks and publishing")
    checks.add_argument("--verify", action="store_true",
                        help="compare source and output logits and perplexities on a text (fails a function-preserving "
                             "conversion that differs beyond float rounding)")
    checks.add_argument("--verify-text", metavar="FILE", default=None,
                        help=f"text for --verify (default: {VERIFY_TEXT_LABEL}, shipped with the package)")
    checks.add_argument("--verify-tokens", type=int, default=VERIFY_TOKENS,
                        help="at most this many tokens (default 512)")
    checks.add_argument("--dry-run", action="store_true", help="check everything and print what would be written")
    checks.add_argument("--push-to-hub", metavar="REPO", default=None,
                        help="upload the finished folder to this Hub repo")
    checks.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    return parser


def _variant_options(args) -> dict:
    return dict(
        attention_variant=args.attention_variant,
        use_rope={"auto": None, "yes": True, "no": False}[args.use_rope],
        rope_max_wavelength=args.rope_max_wavelength,
        stickbreaking_remainder=args.stickbreaking_remainder,
        stickbreaking_attend_current=args.stickbreaking_attend_current,
        layer_shortcut=args.layer_shortcut,
        shortcut_mode=args.shortcut_mode,
        shortcut_source_layers=args.shortcut_source_layers,
    )


def _cli_showwarning(message, category, filename, lineno, file=None, line=None):
    text = str(message) if issubclass(category, ConversionWarning) else f"{category.__name__}: {message}"
    print(f"warning: {text}", file=sys.stderr)


def main(argv=None) -> int:
    """The command line; returns the exit status (0 done, 2 refused/failed, 128+N killed by signal N)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_request:  # --help, or a usage error already printed in one line
        return exit_request.code if isinstance(exit_request.code, int) else 2
    return _common.run_command(lambda: _run(args), debug=args.debug, quiet_ranks=False,
                               interrupted_suffix="; removed the partial output, nothing was written")


def _run(args) -> int:
    verify_text = verify_label = None
    if args.verify_text is not None:
        try:
            with open(args.verify_text, encoding="utf-8") as f:
                verify_text = f.read()
        except (OSError, UnicodeDecodeError) as error:
            raise ConversionError(f"--verify-text {args.verify_text!r} is unreadable: {_first_line(error)}") from error
        verify_label = os.path.basename(args.verify_text)
    with warnings.catch_warnings():
        warnings.simplefilter("always", ConversionWarning)
        warnings.showwarning = _cli_showwarning
        result = convert_checkpoint(
            args.source, args.output_dir, gguf_file=args.gguf_file, dtype=args.dtype, overwrite=args.overwrite,
            max_shard_size=args.max_shard_size, verify=args.verify or args.verify_text is not None,
            verify_text=verify_text, verify_text_label=verify_label, verify_tokens=args.verify_tokens,
            dry_run=args.dry_run, push_to_hub=args.push_to_hub, private=args.private, base_model=args.base_model,
            seed=args.seed, keep_model=False, progress=not args.no_progress, **_variant_options(args),
        )
    plan = result.plan
    if result.dry_run:
        print("dry run: nothing written")
        print(plan.describe())
        return 0
    weights = [f for f in os.listdir(plan.output_dir) if f.endswith(".safetensors")]
    print(f"wrote {plan.output_dir}: AttnVariantLlamaForCausalLM ({_variant_summary(plan.config)}), "
          f"{plan.num_parameters:,} parameters, {_dtype_name(plan.dtype)}, {_count(weights, 'weight file')}")
    if result.verification is not None:
        print(f"verify: {result.verification.summary()}")
    if result.pushed_to:
        print(f"pushed to {result.pushed_to}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
