"""LoRA uptraining of SmolLM2-135M converted to stick-breaking attention: the recipe of the committed adapter, as one
command (a thin call of `hf-attn-variants train`, `hf_attn_variants.train.main`).

    .venv/bin/python examples/lora_finetune.py [--out out/lora] [any hf-attn-variants train flag ...]

1. The teacher (the SmolLM2 GGUF as it is: softmax) answers the prompts of experiments/retrofit_chat_data.py and
   continues the document openings of experiments/retrofit_text_data.py (sampled: encyclopedia, news, letters,
   manuals, stories, code, ...); both are written once to OUT.chats.txt and OUT.text.txt (reused when present). No
   outside chat data or text beyond one Austen novel.
2. The student is the same GGUF converted on load: stick-breaking, RoPE kept only for wavelengths up to the recipe's
   1024-token training length (p-RoPE: the longer ones unrotated, so no distance past it turns a rotated dimension to
   an angle training never showed; keeping the source's 8192 window instead degrades past ~2k tokens). It is trained
   with LoRA on q/k/v/o + the norms: first layer-local attention transfer (60 steps on 128-token pieces), then KL
   distillation on the teacher's token distributions, on those conversations and documents mixed with *Northanger
   Abbey*, on 256-, then 512-, then 1024-token pieces (every step sees the same 1024 tokens, cut differently).
   *Persuasion*, the chat probe and the other held-out texts of experiments/retrofit_eval.py are never trained on.

Flags given here are appended to the recipe's, so they override it (`--max-steps 20` for a quick look). The adapter
records its base (the conversion, saved to OUT/base) and `base_variant.json`.
"""

import argparse
import os
import sys

from hf_attn_variants.testing import require_smollm2_gguf
from hf_attn_variants.train import main

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import retrofit_chat_data  # noqa: E402
import retrofit_text_data  # noqa: E402

AUSTEN = os.path.join(ROOT, "data", "austen")
ROPE_MAX_WAVELENGTH = 1024  # the longest sequences the recipe trains on

# The uptraining recipe of adapters/smollm2-135m-stickbreaking-rope-lora (its README has the exact command and metrics).
RECIPE = [
    "--attention-variant", "stickbreaking", "--use-rope", "yes", "--rope-max-wavelength", str(ROPE_MAX_WAVELENGTH),
    "--lora-targets", "q_proj", "k_proj", "v_proj", "o_proj", "--train", "norms",
    "--attention-transfer-steps", "60", "--max-steps", "260", "--max-length", "1024",
    "--curriculum", "128:60,256:40,512:60", "--batch-size", "1", "--lr", "3e-3", "--warmup-steps", "5",
    "--time-budget-minutes", "88", "--eval-chunks", "8", "--eval-length", "512", "--eval-steps", "60",
    "--threads", "2", "--logging-steps", "5", "--base-name", "./smollm2-135m-stickbreaking-prope",
]


def recipe_argv(argv=None) -> list[str]:
    """The `hf-attn-variants train` arguments of the recipe (the teacher's data written first, when missing)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--out", default="out/lora")
    known, rest = parser.parse_known_args(argv)
    folder, name = require_smollm2_gguf()
    chats = known.out.rstrip("/") + ".chats.txt"
    documents = known.out.rstrip("/") + ".text.txt"
    if not os.path.exists(chats):
        retrofit_chat_data.main(["--out", chats, "--max-new-tokens", "128"])
    if not os.path.exists(documents):
        retrofit_text_data.main(["--out", documents, "--max-new-tokens", "384"])
    return [
        folder, known.out, "--gguf-file", name, "--teacher", folder, "--teacher-gguf-file", name,
        "--train-files", chats, documents, os.path.join(AUSTEN, "austen_northangerabbey.txt"),
        "--eval-file", os.path.join(AUSTEN, "austen_persuasion.txt"),
        *RECIPE, *rest,
    ]


if __name__ == "__main__":
    main(recipe_argv())
