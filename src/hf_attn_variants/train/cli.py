"""The `hf-attn-variants train` command line (also `hf-attn-variants-train`, `python -m hf_attn_variants.train`).

`main(argv)` returns the metrics dict (what `train` returns); bad input or an interruption prints one line and raises
SystemExit (2, or 128 + the signal). `cli_main(argv)` is the console script: it returns the exit status (0 done).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from ..cli_common import CommandError, Interrupted, OneLineParser, first_line, is_main_process, run_command
from .config import DTYPES, LORA_FULL_MODULES, PARAMETER_GROUPS, TrainConfig
from .run import train

_DESCRIPTION = ("Fine-tune or uptrain (distil from a teacher) a model, with LoRA or fully; resumable (--save-steps, "
                "--resume), output written to a staging folder and renamed when complete.")


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "y"):
        return True
    if value.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes/no, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig(model="", output_dir="")
    p = OneLineParser(
        prog="hf-attn-variants train", description=_DESCRIPTION, allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", help="student: family/Llama folder or Hub id (or the folder holding --gguf-file)")
    p.add_argument("output_dir")
    p.add_argument("--gguf-file", default=None)
    g = p.add_argument_group("variant changes on load (default: keep the checkpoint's)")
    g.add_argument("--attention-variant", choices=["softmax", "stickbreaking"], default=None)
    g.add_argument("--use-rope", type=_bool, default=None, metavar="yes|no")
    g.add_argument("--rope-max-wavelength", type=float, default=None, metavar="POSITIONS",
                   help="leave rotary frequencies of a longer wavelength unrotated (p-RoPE), e.g. the source's window")
    g.add_argument("--stickbreaking-remainder", choices=["none", "value", "bias"], default=None)
    g.add_argument("--stickbreaking-attend-current", type=_bool, default=None, metavar="yes|no")
    g.add_argument("--layer-shortcut", type=_bool, default=None, metavar="yes|no")
    g.add_argument("--shortcut-mode", choices=["depth", "depth_context"], default=None)
    g = p.add_argument_group("distillation")
    g.add_argument("--teacher", default=None, help="teacher folder/Hub id (or the folder holding --teacher-gguf-file)")
    g.add_argument("--teacher-gguf-file", default=None)
    g.add_argument("--kl-weight", type=float, default=defaults.kl_weight, help="loss = w * KL + (1 - w) * LM")
    g.add_argument("--temperature", type=float, default=defaults.temperature)
    g.add_argument("--attention-transfer-steps", type=int, default=0,
                   help="first N steps: layer-local attention transfer (match each layer's attention output)")
    g = p.add_argument_group("what to train")
    g.add_argument("--method", choices=["lora", "full"], default=defaults.method)
    g.add_argument("--train", nargs="*", default=[], metavar="GROUP",
                   help=f"full: parameter groups {sorted(PARAMETER_GROUPS)} or regexes (default all); "
                        f"lora: modules trained fully besides the adapters ({sorted(LORA_FULL_MODULES)} or names)")
    g.add_argument("--lora-r", type=int, default=defaults.lora_r)
    g.add_argument("--lora-alpha", type=int, default=None, help="default 2 * r")
    g.add_argument("--lora-targets", nargs="+", default=defaults.lora_targets)
    g = p.add_argument_group("data")
    g.add_argument("--train-files", nargs="+", default=defaults.train_files, help="globs; the eval file is excluded")
    g.add_argument("--eval-file", default=defaults.eval_file, help="held-out text ('' for none)")
    g.add_argument("--max-length", type=int, default=defaults.max_length)
    g.add_argument("--max-train-chunks", type=int, default=None)
    g.add_argument("--eval-length", type=int, default=None, help="default --max-length")
    g.add_argument("--eval-chunks", type=int, default=defaults.eval_chunks)
    g.add_argument("--curriculum", default=None, metavar="LEN:STEPS,...",
                   help="shorter sequences first, e.g. 64:100,128:100 (then --max-length)")
    g.add_argument("--no-shuffle", dest="shuffle", action="store_false")
    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=int, default=defaults.max_steps)
    g.add_argument("--batch-size", type=int, default=defaults.batch_size, help="per process")
    g.add_argument("--grad-accum", type=int, default=defaults.grad_accum)
    g.add_argument("--learning-rate", "--lr", type=float, default=defaults.learning_rate)
    g.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    g.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    g.add_argument("--lr-scheduler", default=defaults.lr_scheduler)
    g.add_argument("--max-grad-norm", type=float, default=defaults.max_grad_norm)
    g.add_argument("--seed", type=int, default=defaults.seed)
    g.add_argument("--dtype", choices=sorted(DTYPES), default=defaults.dtype)
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--time-budget-minutes", type=float, default=None, help="stop training after this long")
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval-steps", type=int, default=None, help="held-out perplexity every N steps (and at 0, end)")
    g.add_argument("--eval-batch-size", type=int, default=defaults.eval_batch_size)
    g.add_argument("--logging-steps", type=int, default=defaults.logging_steps)
    g.add_argument("--base-name", default=None, help="base model path/Hub id recorded in the adapter")
    g.add_argument("--no-save", dest="save", action="store_false")
    g.add_argument("--no-plot", dest="plot", action="store_false")
    g.add_argument("--disable-tqdm", action="store_true")
    g = p.add_argument_group("checkpoints and the output folder")
    g.add_argument("--save-steps", type=int, default=None, metavar="N",
                   help="a checkpoint every N steps (in OUTPUT_DIR's staging folder; Ctrl-C/SIGTERM always saves one)")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its last checkpoint (a finished OUTPUT_DIR is left as it is)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT_DIR once the new one is complete")
    g.add_argument("--debug", action="store_true", help="print the traceback of an error")
    return p


def config_from_args(args, argv=None) -> TrainConfig:
    values = dict(vars(args))
    values.pop("debug", None)
    if values.get("eval_file") == "":
        values["eval_file"] = None
    values["command"] = "hf-attn-variants train " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    return TrainConfig(**values)


def _say(line: str) -> None:
    if is_main_process():
        print(f"error: {line}", file=sys.stderr)


def main(argv=None) -> dict:
    """Parse `argv` (default: sys.argv), train, and return the metrics. Bad input: one line on stderr and
    SystemExit(2), nothing written; Ctrl-C/SIGTERM: one line (where the checkpoint is) and SystemExit(128 + N)."""
    config = config_from_args(build_parser().parse_args(argv), argv)
    try:
        return train(config)
    except CommandError as error:
        _say(first_line(error))
        raise SystemExit(2) from None
    except Interrupted as interrupted:
        _say(str(interrupted))
        raise SystemExit(128 + interrupted.signum) from None
    except KeyboardInterrupt:
        _say("interrupted")
        raise SystemExit(130) from None


def cli_main(argv=None) -> int:
    """The console script: the exit status (0 done, 2 bad input or a failure in one line, 128 + N a signal)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_request:  # --help, or a usage error already printed in one line
        return exit_request.code if isinstance(exit_request.code, int) else 2
    config = config_from_args(args, argv)
    return run_command(lambda: (train(config), 0)[1], debug=args.debug, hint_known=False)


if __name__ == "__main__":
    sys.exit(cli_main())
