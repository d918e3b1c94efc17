"""Retrofit a Llama-style checkpoint into the AttnVariantLlama family and save it as a self-contained folder.

The saved folder holds `config.json` (with `auto_map` and the chosen variant), `model.safetensors`, the tokenizer, the
flat remote-code files and a model card, so `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`
works on a machine with only torch and transformers. The folder appears atomically: everything is written to a
temporary sibling folder that is renamed at the end, so a failed conversion leaves nothing half-written.

    python -m hf_attn_variants.convert SOURCE OUTPUT [--gguf-file F] [--attention-variant stickbreaking]
        [--layer-shortcut --shortcut-mode depth_context] [--dtype bfloat16]
"""

import argparse
import json
import os
import shutil
import tempfile
from importlib import resources

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from .models import AttnVariantLlamaConfig, AttnVariantLlamaForCausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_llama(source: str, gguf_file: str | None = None, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """Load a Llama-architecture checkpoint: a folder/Hub id with safetensors weights, or a GGUF file in `source`."""
    if gguf_file is None:
        config = LlamaConfig.from_pretrained(source)
        if config.model_type != "llama":
            raise ValueError(f"`source`={source!r} holds a {config.model_type!r} model; expected a Llama checkpoint.")
        # Weights only from safetensors: pickled .bin files can execute code on load.
        return LlamaForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=True)
    model = LlamaForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=dtype)
    # GGUF weights arrive dequantized into plain nn.Linear; drop the quantizer so the model can be saved.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def convert_llama_model(llama: LlamaForCausalLM, **variant_options) -> AttnVariantLlamaForCausalLM:
    """Build the family model holding `llama`'s weights; `variant_options` are AttnVariantLlamaConfig fields.

    Every source weight must be consumed with its shape unchanged; the only parameters left to initialise are the
    variant's new ones (shortcut, remainder bias), which start function-preserving (zero output projections).
    """
    config_dict = {k: v for k, v in llama.config.to_dict().items() if k not in ("architectures", "auto_map")}
    config = AttnVariantLlamaConfig(**{**config_dict, **variant_options})
    model = AttnVariantLlamaForCausalLM(config).to(llama.dtype)
    source_state = llama.state_dict()
    target_state = model.state_dict()
    unexpected = sorted(set(source_state) - set(target_state))
    if unexpected:
        raise ValueError(f"Source weights with no place in {type(model).__name__}: {unexpected[:8]}")
    for name, tensor in source_state.items():
        if tensor.shape != target_state[name].shape:
            raise ValueError(f"Shape mismatch for `{name}`: source {tuple(tensor.shape)}, target {tuple(target_state[name].shape)}.")
    missing, _ = model.load_state_dict(source_state, strict=False)
    new_parameters = ("shortcut.", "stickbreaking_remainder_bias")
    not_new = [name for name in missing if not any(marker in name for marker in new_parameters)]
    if not_new:
        raise ValueError(f"Target weights missing from the source checkpoint: {not_new[:8]}")
    return model.eval()


def render_model_card(model: AttnVariantLlamaForCausalLM, source: str) -> str:
    config = model.config
    variant = config.attention_variant + (f" + layer shortcut ({config.shortcut_mode})" if config.layer_shortcut else "")
    template = resources.files("hf_attn_variants").joinpath("templates/model_card.md").read_text(encoding="utf-8")
    return template.format(
        source=source,
        variant=variant,
        num_parameters=f"{model.num_parameters():,}",
        rope="yes" if config.rope_enabled else "no (NoPE)",
        config_json=json.dumps(
            {k: v for k, v in config.to_dict().items() if k.startswith(("attention_variant", "stickbreaking", "shortcut", "layer_shortcut", "use_rope"))},
            indent=2,
        ),
    )


def save_atomically(model, output_dir: str, tokenizer=None, model_card: str | None = None, overwrite: bool = False):
    """Write the model (and tokenizer, card) to `output_dir` via a temporary sibling folder renamed at the end."""
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir) and not overwrite:
        raise FileExistsError(f"`output_dir`={output_dir!r} already exists; pass overwrite=True to replace it.")
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".partial-", dir=parent)
    try:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if model_card is not None:
            with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as f:
                f.write(model_card)
        if os.path.exists(output_dir):
            shutil.rmtree(output_dir)
        os.rename(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def convert_llama_checkpoint(
    source: str,
    output_dir: str,
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    **variant_options,
) -> AttnVariantLlamaForCausalLM:
    """Load `source`, convert it with `variant_options`, save it with tokenizer and model card; return the model."""
    llama = load_llama(source, gguf_file=gguf_file, dtype=dtype)
    model = convert_llama_model(llama, **variant_options)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file) if gguf_file else _maybe_tokenizer(source)
    label = os.path.join(source, gguf_file) if gguf_file else source
    save_atomically(model, output_dir, tokenizer, render_model_card(model, label), overwrite=overwrite)
    return model


def _maybe_tokenizer(source):
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        return None  # a weights-only checkpoint: the converted folder then has no tokenizer either


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="Llama checkpoint folder (safetensors) or the folder holding --gguf-file")
    parser.add_argument("output_dir")
    parser.add_argument("--gguf-file", default=None)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--attention-variant", choices=["softmax", "stickbreaking"], default="softmax")
    parser.add_argument("--use-rope", choices=["auto", "yes", "no"], default="auto",
                        help="auto: RoPE for softmax, none for stick-breaking")
    parser.add_argument("--stickbreaking-remainder", choices=["none", "value", "bias"], default="none")
    parser.add_argument("--stickbreaking-attend-current", action="store_true")
    parser.add_argument("--layer-shortcut", action="store_true")
    parser.add_argument("--shortcut-mode", choices=["depth", "depth_context"], default="depth")
    parser.add_argument("--shortcut-source-layers", type=int, nargs="+", default=None)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    model = convert_llama_checkpoint(
        args.source,
        args.output_dir,
        gguf_file=args.gguf_file,
        dtype=DTYPES[args.dtype],
        overwrite=args.overwrite,
        attention_variant=args.attention_variant,
        use_rope={"auto": None, "yes": True, "no": False}[args.use_rope],
        stickbreaking_remainder=args.stickbreaking_remainder,
        stickbreaking_attend_current=args.stickbreaking_attend_current,
        layer_shortcut=args.layer_shortcut,
        shortcut_mode=args.shortcut_mode,
        shortcut_source_layers=args.shortcut_source_layers,
    )
    print(f"wrote {args.output_dir}: {type(model).__name__}, {model.num_parameters():,} parameters")


if __name__ == "__main__":
    main()
