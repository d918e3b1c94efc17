"""Run inside a plain venv (torch + one transformers release, *without* hf_attn_variants): load each saved checkpoint
as remote code and compare it with the reference outputs the development venv saved beside it.

    python check_checkpoints.py CHECKPOINT_DIR [CHECKPOINT_DIR ...]

Prints one JSON line per checkpoint: {"variant", "transformers", "checks": {name: bool}, "max_logit_diff"}.
Exits 1 if any check fails. Uses only torch and transformers.
"""

import json
import sys

sys.modules["hf_attn_variants"] = None  # the package must not be importable: this is what a Hub user runs

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def check(checkpoint: str) -> dict:
    reference = torch.load(f"{checkpoint}/reference.pt")
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True, dtype=torch.float32).eval()
    ids, mask = reference["input_ids"], reference["attention_mask"]
    greedy = dict(max_new_tokens=reference["max_new_tokens"], do_sample=False, pad_token_id=0)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        cached = model.generate(ids[:1, 2:], **greedy)
        uncached = model.generate(ids[:1, 2:], use_cache=False, **greedy)
        beams = model.generate(ids[:1, 2:], num_beams=3, **greedy)
        padded = model.generate(ids, attention_mask=mask, **greedy)
    max_diff = (logits - reference["logits"]).abs().max().item()
    checks = {
        "model_class": type(model).__name__ == "AttnVariantLlamaForCausalLM",
        "logits": max_diff <= 1e-5,
        "greedy_cache_equals_no_cache": torch.equal(cached, uncached),
        "greedy_equals_reference": torch.equal(cached, reference["greedy"]),
        "beam3_equals_reference": torch.equal(beams, reference["beam3"]),
        "left_padded_batch_equals_reference": torch.equal(padded, reference["left_padded"]),
    }
    return {
        "variant": reference["variant"],
        "transformers": transformers.__version__,
        "checks": checks,
        "max_logit_diff": max_diff,
    }


def main() -> int:
    failed = False
    for checkpoint in sys.argv[1:]:
        result = check(checkpoint)
        failed |= not all(result["checks"].values())
        print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
