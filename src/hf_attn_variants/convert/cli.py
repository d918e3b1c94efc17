"""The `hf-attn-variants convert` command line (also `hf-attn-variants-convert`, `python -m hf_attn_variants.convert`)."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from .. import cli_common as _common
from .common import (
    _count,
    _dtype_name,
    _first_line,
    ConversionError,
    ConversionWarning,
    DTYPES,
    VERIFY_TEXT_LABEL,
    VERIFY_TOKENS,
)
from .plan import _variant_summary


_OneLineParser = _common.OneLineParser


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="python -m hf_attn_variants.convert",
        description=sys.modules[__package__].__doc__.split("\n\n")[0],
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
    from . import convert_checkpoint  # at call time: the package's (patchable) name

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
