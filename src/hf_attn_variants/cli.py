"""The `hf-attn-variants` command: `serve`, `convert` and `train`.

Each subcommand's own parser reads its flags (transformers' `serve` command for `serve`, `hf_attn_variants.convert` and
`hf_attn_variants.train` for the others), so `hf-attn-variants COMMAND --help` lists them; this parser only picks the
subcommand and `--debug`. Exit status: 0 done, 2 bad input or a failure (one line on stderr), 130 interrupted.
"""

import argparse
import sys
import traceback


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage + error
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hf-attn-variants", description="Serve, convert and train AttnVariantLlama models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", help="print the traceback of an error")
    # add_help=False: `COMMAND --help` reaches the subcommand's own parser, which knows its flags.
    commands.add_parser(
        "serve", parents=[debug], add_help=False, allow_abbrev=False,
        help="OpenAI-compatible server (transformers serve) for MODEL, a folder or Hub id; flags: serve --help",
    )
    # convert and train read their own flags, --debug included (shared layer: hf_attn_variants.cli_common).
    commands.add_parser("convert", add_help=False, help="convert a Llama/Qwen2/Qwen3 checkpoint; flags: convert --help")
    commands.add_parser("train", add_help=False, help="fine-tune or uptrain a model (resumable); flags: train --help")
    return parser


def main(argv=None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if args.command == "convert":  # handles its own errors and --debug, and returns the exit status
        from . import convert

        return convert.main(rest)
    if args.command == "train":  # likewise
        from .train import cli_main

        return cli_main(rest)
    try:
        from . import serve

        return serve.main(rest)
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        if args.debug:
            traceback.print_exc()
        from .serve import ServeError

        line = (str(error).strip().splitlines() or [""])[0]
        if isinstance(error, ServeError):  # bad input: the line says it all
            print(f"error: {line}", file=sys.stderr)
        else:
            hint = "" if args.debug else " (--debug shows the traceback)"
            print(f"error: {type(error).__name__}: {line}{hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
