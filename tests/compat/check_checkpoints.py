"""Run inside a plain venv (torch + one transformers release, *without* hf_attn_variants): load each saved checkpoint
as remote code and compare it with the reference outputs the development venv saved beside it.

    python check_checkpoints.py CHECKPOINT_DIR [CHECKPOINT_DIR ...]

Prints one JSON line per checkpoint: {"variant", "transformers", "checks": {name: bool}, "max_logit_diff"}. For the
softmax and stick-breaking checkpoints `generate_batch` (continuous batching) must equal `generate`, or refuse clearly
(stick-breaking on a release whose paged cache it cannot use).
Exits 1 if any check fails. Uses only torch and transformers.
"""

import importlib.util
import json
import sys

sys.modules["hf_attn_variants"] = None  # the package must not be importable: this is what a Hub user runs

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, GenerationConfig  # noqa: E402
from transformers.generation.configuration_utils import ContinuousBatchingConfig  # noqa: E402

BATCHED_VARIANTS = ("softmax", "stickbreaking")  # continuous batching (`generate_batch`) is checked on these


def continuous_batching_runs_here() -> bool:
    """transformers before 5.21 (5.4 at least) sizes even a fixed-size CPU paged cache from psutil's memory figures,
    which this bare venv lacks; stick-breaking's refusal there needs no cache, so it is checked anyway."""
    release = tuple(int(part) for part in transformers.__version__.split(".")[:2])
    return torch.cuda.is_available() or importlib.util.find_spec("psutil") is not None or release >= (5, 21)


def generate_batch_equals_generate(model, prompt: list[int], max_new_tokens: int) -> bool:
    """Continuous batching gives generate()'s greedy tokens, or (stick-breaking on a release whose paged cache it
    cannot use) refuses once with the release to upgrade to."""
    greedy = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), generation_config=greedy)[0, len(prompt) :].tolist()
    try:  # a small cache: the default sizes it from the machine's memory
        cache_config = ContinuousBatchingConfig(num_blocks=16, max_batch_tokens=64)
        results = model.generate_batch([prompt], generation_config=greedy, continuous_batching_config=cache_config)
    except ValueError as error:
        return model.config.attention_variant == "stickbreaking" and "needs transformers >=" in str(error)
    result = next(iter(results.values()))
    return result.error is None and result.generated_tokens == expected


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
    batched = reference["variant"] == "stickbreaking" or continuous_batching_runs_here()
    if reference["variant"] in BATCHED_VARIANTS and batched:
        checks["generate_batch_equals_generate"] = generate_batch_equals_generate(
            model, ids[0, 2:].tolist(), reference["max_new_tokens"]
        )
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
