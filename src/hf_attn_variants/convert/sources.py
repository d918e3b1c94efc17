"""The source checkpoint: where it is and what it holds, read from file headers only (safetensors, GGUF, Hub)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import re
from collections import Counter

import torch
from tqdm import tqdm
from transformers import AutoConfig

from .common import (
    _first_line,
    _GGUF_FLOAT_DTYPES,
    _IGNORABLE_SOURCE_TENSOR,
    _names,
    _quiet_transformers,
    _SAFETENSORS_DTYPES,
    ConversionError,
    DTYPES,
    SUPPORTED_GGUF_ARCHITECTURES,
    SUPPORTED_MODEL_TYPES,
    TOKENIZER_FILES,
)


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
