"""Experiment 3: what the layerwise attention shortcut buys. The byte-level softmax + RoPE baseline of experiment 2
(smaller, so that 12 runs fit), with and without a `depth` and a `depth_context` shortcut, and a parameter-matched
baseline whose MLP is widened by the shortcut's parameter count; equal tokens, 3 seeds each (a seed sets the
initialisation and the data order, shared by the four variants). Validation loss on the held-out novel (Persuasion)
at the training context, and the depth-attention heatmap of the trained shortcut models on a sample sentence
(`hf_attn_variants.plotting.plot_shortcut_attention` with a byte tokenizer).

    python experiments/shortcut_gains.py            # defaults (280 steps x 12 runs): ~29 min of training on 2 CPU cores
    python experiments/shortcut_gains.py --smoke    # seconds: what CI runs

Writes results/shortcut_gains.json, shortcut_gains_loss.png, shortcut_gains_attention_depth.png and
shortcut_gains_attention_depth_context.png; rerunning resumes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import exp_common as C  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

NAME = "shortcut_gains"
DEFAULT_VARIANTS = ["softmax_rope", "softmax_rope_depth", "softmax_rope_depth_context", "softmax_rope_wide"]
TRAIN_ARGS = ("steps", "batch_size", "lr", "warmup", "context", "held_out")
SAMPLE = "Sir Walter Elliot, of Kellynch Hall, in Somersetshire"  # the held-out novel's first words
SHORT_LABELS = {"softmax_rope": "baseline", "softmax_rope_depth": "+ depth", "softmax_rope_depth_context":
                "+ depth_context", "softmax_rope_wide": "wider MLP\n(param-matched)"}
SMOKE = dict(  # --smoke: a tiny config that runs in seconds (CI)
    steps=3, batch_size=2, context=32, save_steps=2, seeds=[0, 1], eval_windows=4,
    hidden_size=16, layers=3, heads=2, intermediate_size=32, throughput_rounds=1, sample=SAMPLE[:12],
)


@torch.no_grad()
def validation_loss(model, windows: np.ndarray, tokens_per_batch: int) -> float:
    """Mean loss (nats / byte) of windows[:, 1:] given windows[:, :-1], one piece per window."""
    model.eval()
    inputs, targets = torch.from_numpy(windows[:, :-1]), torch.from_numpy(windows[:, 1:])
    batch = max(1, tokens_per_batch // inputs.shape[1])
    losses = [C.token_losses(model, inputs[i:i + batch], targets[i:i + batch]) for i in range(0, len(inputs), batch)]
    return float(torch.cat(losses).mean())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser, steps=280, batch_size=8, lr=3e-3)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-windows", type=int, default=128, help="held-out windows of --context bytes")
    parser.add_argument("--eval-tokens-per-batch", type=int, default=8192)
    C.add_model_args(parser, hidden_size=64, layers=4, heads=2, intermediate_size=192)
    parser.add_argument("--held-out", default=C.HELD_OUT_NOVEL)
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                        choices=sorted(C.VARIANTS) + ["softmax_rope_wide"])
    parser.add_argument("--sample", default=SAMPLE, help="sentence of the depth-attention heatmaps")
    return C.parse_args_with_smoke(parser, argv, SMOKE)


def main(argv=None) -> dict:
    args = parse_args(argv)
    C.setup_torch(args.threads)
    train_bytes, test_bytes, train_files = C.read_austen(args.held_out)
    from hf_attn_variants.plotting import plot_shortcut_attention

    starts = np.linspace(0, len(test_bytes) - args.context - 1, args.eval_windows).astype(np.int64)
    windows = np.stack([test_bytes[s:s + args.context + 1] for s in starts]).astype(np.int64)
    base = C.base_config(args, 256, pad_token_id=None, bos_token_id=None)
    shortcut_params = C.num_params(C.make_config(base, "softmax_rope_depth"))
    configs = {}
    for variant in args.variants:
        if variant == "softmax_rope_wide":  # parameter-matched: the MLP widened by the shortcut's parameter count
            width = C.matched_intermediate_size(base, "softmax_rope", shortcut_params)
            configs[variant] = C.make_config(base, "softmax_rope", intermediate_size=width)
        else:
            configs[variant] = C.make_config(base, variant)

    throughput = None
    if args.throughput_rounds:
        throughput = C.cached_throughput(args.work_dir / NAME, configs, args.batch_size, args.context, 256,
                                         args.throughput_rounds)

    runs = {variant: {} for variant in configs}
    heatmaps = {}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:  # seed-major: an interrupted run has whole seeds of every variant
        for variant, config in configs.items():
            dataset = C.RandomCrops(train_bytes, args.context + 1, args.steps * args.batch_size, seed)
            model, stats, _ = C.train_run(NAME, variant, config, dataset, args, TRAIN_ARGS, seed,
                                          tokens_per_example=args.context + 1)
            start = time.perf_counter()
            loss = validation_loss(model, windows, args.eval_tokens_per_batch)
            C.log(f"  validation loss {loss:.4f} ({time.perf_counter() - start:.0f} s)")
            runs[variant][seed] = {"validation_loss": loss, "train": stats}
            if config.layer_shortcut and seed == args.seeds[0]:
                path = args.results_dir / f"{NAME}_attention_{config.shortcut_mode}.png"
                model.set_attn_implementation("eager")  # eager returns attention weights without a warning
                attention = plot_shortcut_attention(model, C.ByteTokenizer(), args.sample, path)
                heatmaps[config.shortcut_mode] = {
                    "png": path.name, "seed": seed, "sample": args.sample, "sources": config.shortcut_sources,
                    "mean_attention_per_source": [float(x) for x in attention.mean(axis=1)],
                }

    baseline = "softmax_rope" if "softmax_rope" in runs else None
    table = {}
    for variant, by_seed in runs.items():
        losses = [by_seed[s]["validation_loss"] for s in args.seeds]
        row = {
            "label": C.LABELS[variant],
            "parameters": C.num_params(configs[variant]),
            "intermediate_size": configs[variant].intermediate_size,
            "validation_loss_by_seed": dict(zip(map(str, args.seeds), losses)),
            "validation_loss_mean": statistics.fmean(losses),
            "validation_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            "train_tokens": by_seed[args.seeds[0]]["train"]["train_tokens"],
            "train_seconds_mean": statistics.fmean(by_seed[s]["train"]["train_seconds"] for s in args.seeds),
            "tokens_per_s_median_step_mean": statistics.fmean(
                by_seed[s]["train"]["tokens_per_s_median_step"] for s in args.seeds),
            "final_train_loss_mean": statistics.fmean(by_seed[s]["train"]["final_train_loss"] for s in args.seeds),
        }
        if baseline:  # paired by seed: same initialisation seed and the same data order as the baseline
            diffs = [by_seed[s]["validation_loss"] - runs[baseline][s]["validation_loss"] for s in args.seeds]
            row["delta_vs_baseline_by_seed"] = dict(zip(map(str, args.seeds), diffs))
            row["delta_vs_baseline_mean"] = statistics.fmean(diffs)
            row["delta_vs_baseline_std"] = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        table[variant] = row
    payload = {
        "experiment": NAME,
        "args": C.json_args(args),
        "data": {"train_files": train_files, "held_out": args.held_out,
                 "validation_bytes": int(windows.shape[0] * args.context)},
        "throughput": throughput,
        "variants": table,
        "heatmaps": heatmaps,
        "loss_histories": {v: {str(s): runs[v][s]["train"]["loss_history"] for s in args.seeds} for v in runs},
    }
    C.write_json(args.results_dir / f"{NAME}.json", payload)
    plot(payload, args.results_dir)
    C.log(f"wrote {args.results_dir / (NAME + '.json')}")
    return payload


def plot(payload: dict, out_dir: Path) -> None:
    table = payload["variants"]
    fig, axes = C.figure(1, 2, figsize=(11, 4))
    ax = axes[0, 0]
    names = list(table)
    for i, variant in enumerate(names):
        row = table[variant]
        values = list(row["validation_loss_by_seed"].values())
        ax.bar(i, row["validation_loss_mean"], yerr=row["validation_loss_std"], capsize=4, alpha=0.6)
        ax.scatter([i] * len(values), values, color="black", s=12, zorder=3)
    ax.set_xticks(range(len(names)), [SHORT_LABELS.get(v, v) for v in names], fontsize=8)
    low = min(min(r["validation_loss_by_seed"].values()) for r in table.values())
    high = max(max(r["validation_loss_by_seed"].values()) for r in table.values())
    ax.set_ylim(low - 0.5 * (high - low + 1e-3), high + 0.5 * (high - low + 1e-3))
    ax.set_ylabel("held-out loss (nats / byte)")
    ax.set_title("validation loss: mean ± std over seeds (dots: seeds)", fontsize=9)
    ax = axes[0, 1]
    for variant, by_seed in payload["loss_histories"].items():
        steps = [s for s, _ in next(iter(by_seed.values()))]
        mean = np.mean([[l for _, l in h] for h in by_seed.values()], axis=0)
        ax.plot(steps, mean, label=table[variant]["label"])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / f"{NAME}_loss.png", dpi=110)


if __name__ == "__main__":
    main()
