"""Overhead of the layerwise attention shortcut (each mode) over the same model without it, measured in one run.

Model (default): the SmolLM2-135M architecture from `configs/smollm2-135m-softmax.json` (30 layers, hidden 576,
9 heads / 3 key-value heads, vocab 49152), randomly initialised, float32, SDPA token attention; `--config` takes any
other AttnVariantLlama / Llama config.json. Variants: no shortcut; `depth` over all L-1 sources; `depth_context` over
all L-1 sources and over every 4th layer (`--sparse-every`). The shortcut's o_proj gets random non-zero weights so no
branch could be skipped. The shortcut uses its default key/value heads (the model's GQA ratio).

Timed: prefill of a T-token prompt (logits of the last token only, as `generate` does) and greedy decoding of N
tokens with the cache after that prefill. The variants run interleaved round-robin (the order rotated every round) so
that machine drift hits them alike. Times are medians of `--repeats` rounds; a ratio is the median over rounds of
(variant time / baseline time of the same round), with its interquartile range, so a slow round (shared machine)
cancels out; ratios compare numbers from this run only. On a noisy machine the whole-model ratios can hide a few
percent, so the shortcut module alone is also timed on the prefill's own inputs (without the cache update) and
reported against the baseline prefill ("module / base"). CPU runs use 1 thread by default (`--threads`):
multi-threaded timings on a shared machine are much noisier.

    python benchmarks/bench_shortcut.py [--config configs/smollm2-135m-softmax.json] [--T 512] [--decode 32]
        [--repeats 11] [--device cpu] [--threads 1] [--sparse-every 4]
"""

import argparse
import os
import statistics
import time

import torch

from hf_attn_variants import AttnVariantLlamaConfig, AttnVariantLlamaForCausalLM

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "smollm2-135m-softmax.json")


def variants(num_layers, sparse_every):
    """name -> extra config fields; sources default to every layer before the final one (|S| = L - 1)."""
    all_sources = num_layers - 1
    sparse = list(range(sparse_every - 1, num_layers - 1, sparse_every)) or [num_layers - 2]
    shown = ", ".join(map(str, sparse)) if len(sparse) <= 3 else f"{sparse[0]}, {sparse[1]}, …, {sparse[-1]}"
    return {
        "no shortcut": dict(layer_shortcut=False),
        f"depth, \\|S\\|={all_sources}": dict(layer_shortcut=True, shortcut_mode="depth"),
        f"depth_context, \\|S\\|={all_sources}": dict(layer_shortcut=True, shortcut_mode="depth_context"),
        f"depth_context, \\|S\\|={len(sparse)} (layers {shown})": dict(
            layer_shortcut=True, shortcut_mode="depth_context", shortcut_source_layers=sparse
        ),
    }


def build(config_path, extra, device):
    torch.manual_seed(0)
    config = AttnVariantLlamaConfig.from_pretrained(config_path, **extra, attn_implementation="sdpa")
    model = AttnVariantLlamaForCausalLM(config).to(device=device, dtype=torch.float32).eval()
    if model.model.shortcut is not None:  # a trained-looking shortcut, so no branch could be skipped
        torch.nn.init.normal_(model.model.shortcut.o_proj.weight, std=0.02)
    return model


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def prefill(model, ids):
    return model(ids, use_cache=True, logits_to_keep=1)


def capture_shortcut_inputs(model, ids):
    """The positional inputs and kwargs of the shortcut module during a prefill (None without a shortcut)."""
    shortcut, captured = model.model.shortcut, {}
    if shortcut is None:
        return None

    def hook(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, {**kwargs, "past_key_values": None}

    handle = shortcut.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(ids, use_cache=False, logits_to_keep=1)
    handle.remove()
    return captured


@torch.no_grad()
def decode(model, cache, next_token, steps):
    for _ in range(steps):
        out = model(next_token, past_key_values=cache, use_cache=True)
        next_token = out.logits[:, -1:].argmax(-1)
    return next_token


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="config.json of the model shape")
    parser.add_argument("--T", type=int, default=512, help="prompt length")
    parser.add_argument("--decode", type=int, default=32, help="tokens decoded with the cache")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--sparse-every", type=int, default=4, help="the sparse depth_context reads every k-th layer")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1, for stable timings)")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)

    num_layers = AttnVariantLlamaConfig.from_pretrained(args.config).num_hidden_layers
    variant_fields = variants(num_layers, args.sparse_every)
    models = {name: build(args.config, extra, args.device) for name, extra in variant_fields.items()}
    base_config = models["no shortcut"].config
    ids = torch.randint(3, base_config.vocab_size, (args.batch, args.T), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    times = {name: {"prefill": [], "decode": [], "module": []} for name in models}
    shortcut_inputs = {name: capture_shortcut_inputs(model, ids) for name, model in models.items()}
    names = list(models)
    for repeat in range(args.repeats + 1):  # repeat 0 warms up and is discarded
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:  # rotate the order every round
            model = models[name]
            synchronize(args.device)
            start = time.perf_counter()
            out = prefill(model, ids)
            synchronize(args.device)
            prefill_time = time.perf_counter() - start

            next_token = out.logits[:, -1:].argmax(-1)
            synchronize(args.device)
            start = time.perf_counter()
            decode(model, out.past_key_values, next_token, args.decode)
            synchronize(args.device)
            decode_time = time.perf_counter() - start
            if shortcut_inputs[name] is not None:
                synchronize(args.device)
                start = time.perf_counter()
                with torch.no_grad():
                    model.model.shortcut(*shortcut_inputs[name]["args"], **shortcut_inputs[name]["kwargs"])
                synchronize(args.device)
                if repeat > 0:
                    times[name]["module"].append(time.perf_counter() - start)
            if repeat > 0:
                times[name]["prefill"].append(prefill_time)
                times[name]["decode"].append(decode_time)

    threads = torch.get_num_threads()
    where = f"{args.device} ({threads} thread(s))" if args.device == "cpu" else torch.cuda.get_device_name()
    shape = (
        f"{os.path.basename(args.config)}: {base_config.num_hidden_layers} layers, hidden {base_config.hidden_size}, "
        f"{base_config.num_attention_heads} heads / {base_config.num_key_value_heads} kv heads, float32"
    )
    print(
        f"\nLayer-shortcut overhead, {shape}, on {where}: batch {args.batch}, prefill T={args.T}, "
        f"decode {args.decode} tokens, median of {args.repeats}; torch {torch.__version__}\n"
    )
    print(
        "| variant | prefill ms | prefill vs base (IQR) | module ms | module / base | decode ms/token "
        "| decode vs base (IQR) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = times["no shortcut"]

    def overhead(name, phase):
        ratios = [t / b for t, b in zip(times[name][phase], base[phase])]
        low, median, high = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        return f"{median - 1:+.1%} ({low - 1:+.1%} … {high - 1:+.1%})"

    for name in models:
        prefill_ms = statistics.median(times[name]["prefill"]) * 1e3
        decode_ms = statistics.median(times[name]["decode"]) * 1e3 / args.decode
        module_cells = "– | –"
        if times[name]["module"]:
            module_s = statistics.median(times[name]["module"])
            module_cells = f"{module_s * 1e3:.1f} | {module_s / statistics.median(base['prefill']):+.1%}"
        print(
            f"| {name} | {prefill_ms:.1f} | {overhead(name, 'prefill')} | {module_cells} "
            f"| {decode_ms:.2f} | {overhead(name, 'decode')} |"
        )


if __name__ == "__main__":
    main()
