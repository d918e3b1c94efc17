"""Overhead of the layerwise attention shortcut (each mode) over the same Llama without it, measured in one run.

Model: Llama-shaped, hidden 256, 8 layers, 8 heads, intermediate 688, vocab 4096, SDPA token attention, float32.
Timed: prefill of a T-token prompt (logits of the last token only, as `generate` does) and greedy decoding of N
tokens with the cache after that prefill. Every number is the median of `--repeats` runs, the variants interleaved
round-robin so that machine drift hits them alike; ratios compare numbers from this run only.

    python benchmarks/bench_shortcut.py [--T 512] [--decode 32] [--repeats 15] [--device cpu] [--threads 1]
"""

import argparse
import statistics
import time

import torch

from hf_attn_variants import AttnVariantLlamaConfig, AttnVariantLlamaForCausalLM

MODEL = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)

# name -> extra config fields; sources default to every layer before the final one (|S| = 7).
VARIANTS = {
    "no shortcut": {},
    "depth, |S|=7": dict(layer_shortcut=True, shortcut_mode="depth"),
    "depth_context, |S|=7": dict(layer_shortcut=True, shortcut_mode="depth_context"),
    "depth_context, |S|=2 (layers 3, 6)": dict(
        layer_shortcut=True, shortcut_mode="depth_context", shortcut_source_layers=[3, 6]
    ),
}


def build(extra, device):
    torch.manual_seed(0)
    config = AttnVariantLlamaConfig(**MODEL, **extra, attn_implementation="sdpa")
    model = AttnVariantLlamaForCausalLM(config).to(device).eval()
    if model.model.shortcut is not None:  # a trained-looking shortcut; zeros would not change the cost anyway
        torch.nn.init.normal_(model.model.shortcut.o_proj.weight, std=0.02)
    return model


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def prefill(model, ids):
    return model(ids, use_cache=True, logits_to_keep=1)


@torch.no_grad()
def decode(model, cache, next_token, steps):
    for _ in range(steps):
        out = model(next_token, past_key_values=cache, use_cache=True)
        next_token = out.logits[:, -1:].argmax(-1)
    return next_token


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=512, help="prompt length")
    parser.add_argument("--decode", type=int, default=32, help="tokens decoded with the cache")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    models = {name: build(extra, args.device) for name, extra in VARIANTS.items()}
    ids = torch.randint(3, MODEL["vocab_size"], (args.batch, args.T), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    times = {name: {"prefill": [], "decode": []} for name in models}
    for repeat in range(args.repeats + 1):  # repeat 0 warms up and is discarded
        for name, model in models.items():
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
            if repeat > 0:
                times[name]["prefill"].append(prefill_time)
                times[name]["decode"].append(decode_time)

    threads = torch.get_num_threads() if args.device == "cpu" else None
    where = f"{args.device} ({threads} threads)" if threads else torch.cuda.get_device_name()
    print(
        f"\nLayer-shortcut overhead on {where}: batch {args.batch}, prefill T={args.T}, decode {args.decode} tokens, "
        f"median of {args.repeats}; torch {torch.__version__}\n"
    )
    print("| variant | prefill ms | prefill vs base | decode ms/token | decode vs base |")
    print("|---|---:|---:|---:|---:|")
    base = {phase: statistics.median(times["no shortcut"][phase]) for phase in ("prefill", "decode")}
    for name in models:
        prefill_ms = statistics.median(times[name]["prefill"]) * 1e3
        decode_ms = statistics.median(times[name]["decode"]) * 1e3 / args.decode
        print(
            f"| {name} | {prefill_ms:.2f} | {prefill_ms / 1e3 / base['prefill'] - 1:+.1%} "
            f"| {decode_ms:.3f} | {decode_ms * args.decode / 1e3 / base['decode'] - 1:+.1%} |"
        )


if __name__ == "__main__":
    main()
