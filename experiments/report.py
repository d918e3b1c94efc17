"""Print the README's result tables (markdown) from the JSON files the three experiments wrote.

    python experiments/report.py [--results-dir experiments/results]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def load(results_dir: Path, name: str):
    path = results_dir / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def speed(payload, variant):
    t = (payload.get("throughput") or {}).get("variants", {}).get(variant)
    return f"{t['tokens_per_s']:,.0f} ({t['step_time_vs_first']:.2f}×)" if t else "–"


def synthetic(payload) -> list[str]:
    variants = payload["variants"]
    contexts = list(next(iter(variants.values()))["accuracy_by_context"])
    lines = ["| model | params | " + " | ".join(f"acc @ {c}" for c in contexts)
             + " | train s | tokens/s (step time vs first) |",
             "|---|---:|" + "---:|" * len(contexts) + "---:|---:|"]
    for variant, r in variants.items():
        accs = " | ".join(f"{r['accuracy_by_context'][c]:.3f} (n={r['queries_by_context'][c]})" for c in contexts)
        lines.append(f"| {r['label']} | {r['parameters']:,} | {accs} | {r['train']['train_seconds']:.0f} | "
                     f"{speed(payload, variant)} |")
    lines.append("")
    # accuracy by distance, pooled over test contexts
    bins = [(b["distance_lo"], b["distance_hi"]) for b in next(iter(variants.values()))["accuracy_by_distance_pooled"]]
    lines.append("| distance | " + " | ".join(r["label"] for r in variants.values()) + " |")
    lines.append("|---|" + "---:|" * len(variants))
    for lo, hi in bins:
        cells = []
        for r in variants.values():
            hit = [b for b in r["accuracy_by_distance_pooled"] if b["distance_lo"] == lo]
            cells.append(f"{hit[0]['accuracy']:.2f} (n={hit[0]['queries']})" if hit else "–")
        lines.append(f"| {lo + 1}–{hi} | " + " | ".join(cells) + " |")
    return lines


def austen(payload) -> list[str]:
    variants = payload["variants"]
    contexts = [c for c in next(iter(variants.values()))["loss_by_bucket"]]
    last, train = contexts[-1], payload["args"]["context"]
    lines = ["| model | params | " + " | ".join(f"mean loss @ {c}" for c in contexts)
             + f" | last quarter @ {last} | same bytes @ {train} (sliding) | Δ | tokens/s (step time vs first) |",
             "|---|---:|" + "---:|" * len(contexts) + "---:|---:|---:|---:|"]
    for variant, r in variants.items():
        means = " | ".join(f"{r['mean_loss_by_context'][c]:.4f}" for c in contexts)
        q = r["last_quarter"][last]
        lines.append(f"| {r['label']} | {r['parameters']:,} | {means} | {q['loss']:.4f} | "
                     f"{q['same_bytes_sliding_256']:.4f} | {q['delta_vs_sliding_256']:+.4f} | "
                     f"{speed(payload, variant)} |")
    lines.append("")
    # loss per position bucket at the longest context
    buckets = next(iter(variants.values()))["loss_by_bucket"][last]
    lines.append(f"| positions (context {last}) | " + " | ".join(r["label"] for r in variants.values()) + " |")
    lines.append("|---|" + "---:|" * len(variants))
    for i, b in enumerate(buckets):
        cells = [f"{r['loss_by_bucket'][last][i]['loss']:.3f}" for r in variants.values()]
        lines.append(f"| {b['lo']}–{b['hi'] - 1} | " + " | ".join(cells) + " |")
    return lines


def shortcut(payload) -> list[str]:
    table = payload["variants"]
    seeds = list(next(iter(table.values()))["validation_loss_by_seed"])
    lines = ["| model | params | validation loss, mean ± std | per seed (" + ", ".join(seeds) + ") | "
             "Δ vs baseline (paired), mean ± std | train s (mean) | tokens/s (step time vs first) |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for variant, r in table.items():
        per_seed = ", ".join(f"{v:.4f}" for v in r["validation_loss_by_seed"].values())
        delta = (f"{r['delta_vs_baseline_mean']:+.4f} ± {r['delta_vs_baseline_std']:.4f}"
                 if variant != "softmax_rope" and "delta_vs_baseline_mean" in r else "–")
        lines.append(f"| {r['label']} | {r['parameters']:,} | {r['validation_loss_mean']:.4f} ± "
                     f"{r['validation_loss_std']:.4f} | {per_seed} | {delta} | {r['train_seconds_mean']:.0f} | "
                     f"{speed(payload, variant)} |")
    for mode, h in payload.get("heatmaps", {}).items():
        weights = ", ".join(f"layer {s}: {w:.2f}" for s, w in zip(h["sources"], h["mean_attention_per_source"]))
        lines.append("")
        lines.append(f"`{mode}` shortcut (seed {h['seed']}), mean attention per source layer on {h['sample']!r}: "
                     f"{weights}")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    for name, fn in [("synthetic_recall", synthetic), ("austen_length", austen), ("shortcut_gains", shortcut)]:
        payload = load(args.results_dir, name)
        print(f"### {name}\n")
        print("\n".join(fn(payload)) if payload else "(no results yet)")
        print()


if __name__ == "__main__":
    sys.exit(main())
