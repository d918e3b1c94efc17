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

The code lives in modules of this package (`sources`: reading the source's headers, `plan`: the target config and
the tensor checks, `load`: loading and converting, `write`: the staging folder, `verify`, `card`, `hub`, `cli`); every
public name is importable from `hf_attn_variants.convert` itself.

`--verify` runs the source (loaded by transformers' own class) and the written output on a text and reports the largest
logit difference and both perplexities; a function-preserving conversion (softmax, with or without the layer
shortcut) fails if they differ beyond float rounding.
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch
from tqdm import tqdm

from ..models import AttnVariantLlamaForCausalLM
from .common import (  # noqa: F401  (re-exported: the public names of hf_attn_variants.convert)
    _CONFIG_FIELDS_NOT_CARRIED,
    _count,
    _dtype_name,
    _first_line,
    _GGUF_FLOAT_DTYPES,
    _human_bytes,
    _IGNORABLE_SOURCE_TENSOR,
    _names,
    _natural_key,
    _NO_MODEL_MAX_LENGTH,
    _quiet_transformers,
    _SAFETENSORS_DTYPES,
    _TOKENIZER_LOADING_LEFTOVERS,
    _transformers_progress,
    _warn,
    ConversionError,
    ConversionInterrupted,
    ConversionWarning,
    DTYPES,
    NEW_PARAMETER_MARKERS,
    OutputExistsError,
    PushError,
    SUPPORTED_GGUF_ARCHITECTURES,
    SUPPORTED_MODEL_TYPES,
    TOKENIZER_FILES,
    VARIANT_OPTIONS,
    VerificationError,
    VERIFY_TEXT_LABEL,
    VERIFY_TOKENS,
)
from .sources import (  # noqa: F401  (re-exported: the public names of hf_attn_variants.convert)
    _download_from_hub,
    _gguf_stock_class,
    _gguf_to_transformers_names,
    _inspect_gguf,
    _inspect_safetensors,
    _require_supported,
    _resolve_source,
    _source_card_metadata,
    _source_label,
    inspect_source,
    SourceCheckpoint,
)
from .plan import (  # noqa: F401  (re-exported: the public names of hf_attn_variants.convert)
    _function_preserving,
    _planned_files,
    _refuse_sliding_window,
    _variant_summary,
    build_target_config,
    check_tensors,
    ConversionPlan,
    expected_tensors,
    new_parameter_names,
)
from .load import (  # noqa: F401  (re-exported: the public names of hf_attn_variants.convert)
    _check_loading_info,
    _dequantized,
    _family_from_state_dict,
    clean_tokenizer_config,
    convert_llama_model,
    convert_model,
    load_converted_model,
    load_tokenizer,
)
from .verify import (  # noqa: F401  (re-exported: the public names of hf_attn_variants.convert)
    AUSTEN_EXCERPT,
    Verification,
    verify_conversion,
)
from .card import (  # noqa: F401  (re-exported: the public names of hf_attn_variants.convert)
    _card_metadata_from_spec,
    _function_note,
    _label_from_spec,
    _verification_markdown,
    render_model_card,
)
from .write import (  # noqa: F401  (re-exported: the public names of hf_attn_variants.convert)
    _normal_permissions,
    _publish,
    _save_into,
    _signals_raise,
    _umask,
    _write_text,
    check_output_path,
    save_atomically,
    staging_folder,
)
from .hub import (  # noqa: F401  (re-exported: the public names of hf_attn_variants.convert)
    push_folder,
)


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


from .cli import _cli_showwarning, _OneLineParser, _run, _variant_options, build_parser, main  # noqa: E402,F401
