"""How good is a stick-breaking retrofit, judged as a user would: against its softmax source, on what it never trained on.

Three measures, for the source (SmolLM2-135M-Instruct, softmax) and the retrofit (its stick-breaking conversion plus
an uptraining adapter), on the same tokens:

1. Held-out perplexity at 512 tokens on three texts the recipe never trains on (data/heldout/README.md): Austen's
   *Persuasion* (the recipe's own held-out novel), the King James *Luke* and *Acts* (another kind and period of
   English) and CPython's language reference (modern technical prose).
2. A chat probe: the questions of data/chat/probe.json, greedy answers, scored by their accepted answers, with the
   count of empty answers.
3. Length: per-position loss on 16k-token windows of *Persuasion* with the whole window as context, against the same
   tokens scored with 512 tokens of context (sliding), in position buckets up to 16k; plotted for both models.

Results are cached per model (a hash of the adapter's files and the settings), so re-evaluating a new adapter does not re-run the source.

    python experiments/retrofit_eval.py --adapter adapters/smollm2-135m-stickbreaking-rope-lora \
        [--arm LABEL=ADAPTER ...] [--out experiments/results/retrofit_eval] [--windows 2] [--window-length 16384]

`--arm` adds recipe variants (other adapters) as more columns of the table and curves of the plot.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
HELD_OUT = {
    "persuasion": REPO / "data" / "austen" / "austen_persuasion.txt",
    "kjv_luke_acts": REPO / "data" / "heldout" / "kjv_luke_acts.txt",
    "python_reference": REPO / "data" / "heldout" / "python_reference.txt",
}
PROBE = REPO / "data" / "chat" / "probe.json"
BUCKETS = [(512, 1024), (1024, 2048), (2048, 4096), (4096, 8192), (8192, 12288), (12288, 16384)]


def log(*parts) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


def load_models(adapter: str | None, variant_json: str | None):
    """The source (softmax, as the GGUF holds it) or, with `adapter`/`variant_json`, the retrofit built the way the
    demo builds it: the GGUF converted with the adapter's `base_variant.json`, the adapter merged."""
    from transformers import AutoTokenizer

    from hf_attn_variants import AttnVariantLlamaForCausalLM
    from hf_attn_variants.testing import require_smollm2_gguf

    folder, name = require_smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    variant = {}
    if variant_json or adapter:
        with open(variant_json or os.path.join(adapter, "base_variant.json"), encoding="utf-8") as f:
            variant = json.load(f)
    model = AttnVariantLlamaForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, **variant)
    model.hf_quantizer, model.is_quantized = None, False
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval(), tokenizer


def tokens_of(tokenizer, path: Path) -> torch.Tensor:
    return torch.tensor(tokenizer(path.read_text(encoding="utf-8")).input_ids)


@torch.no_grad()
def token_nll(model, ids: torch.Tensor, logits_chunk: int = 2048) -> torch.Tensor:
    """Per-token NLL (nats) of ids[:, 1:] given everything before; the LM head runs in chunks (16k x 49k logits
    would need 3 GB)."""
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
    losses = []
    for start in range(0, ids.shape[1] - 1, logits_chunk):
        stop = min(start + logits_chunk, ids.shape[1] - 1)
        logits = model.lm_head(hidden[:, start:stop]).float()
        losses.append(F.cross_entropy(logits.transpose(1, 2), ids[:, start + 1 : stop + 1], reduction="none"))
    return torch.cat(losses, dim=1)


def held_out_perplexity(model, ids: torch.Tensor, length: int, chunks: int, batch: int = 4) -> float:
    """Perplexity over `chunks` non-overlapping `length`-token chunks spread evenly over the text."""
    count = (len(ids) - 1) // length
    starts = [i * length for i in sorted({k * count // chunks for k in range(chunks)})]
    rows = torch.stack([ids[s : s + length] for s in starts])
    total = torch.cat([token_nll(model, rows[i : i + batch]).flatten() for i in range(0, len(rows), batch)])
    return math.exp(total.double().mean().item())


def answer_is_correct(answer: str, accepted: list[str]) -> bool:
    return any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", answer, re.IGNORECASE) for a in accepted)


@torch.no_grad()
def chat_probe(model, tokenizer, max_new_tokens: int = 40) -> dict:
    questions = json.loads(PROBE.read_text(encoding="utf-8"))["questions"]
    rows = []
    for item in questions:
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": item["q"]}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        rows.append({"q": item["q"], "answer": answer, "correct": answer_is_correct(answer, item["answers"])})
    return {"correct": sum(r["correct"] for r in rows), "empty": sum(not r["answer"] for r in rows),
            "questions": len(rows), "answers": rows}


@torch.no_grad()
def short_context_nll(model, window: torch.Tensor, context: int, stride: int = 256, batch: int = 4) -> torch.Tensor:
    """Per-token NLL like `token_nll(window)`, but every token from position `context` on is scored with between
    `context` and `context + stride` tokens before it (pieces of context + stride tokens, the last `stride` scored);
    the first `context` positions, which have less context in both measures, are NaN."""
    out = torch.full((len(window) - 1,), float("nan"))
    pieces = [(s, window[s : s + context + stride + 1]) for s in range(0, len(window) - context, stride)]
    for i in range(0, len(pieces), batch):
        group = pieces[i : i + batch]
        same_length = len({len(p) for _, p in group}) == 1
        rows = [torch.stack([p for _, p in group])] if same_length else [p[None] for _, p in group]
        nll = [row for r in rows for row in token_nll(model, r)]
        for (s, piece), row in zip(group, nll):
            # row j predicts token s + j + 1 from j + 1 tokens: from j = context - 1 on, at least `context` of them
            out[s + context - 1 : s + len(piece) - 1] = row[context - 1 :]
    return out


def length_eval(model, ids: torch.Tensor, windows: int, window_length: int, context: int) -> dict:
    """Full-window vs 512-context NLL per position (averaged over windows) and per bucket."""
    space = len(ids) - window_length - 1
    starts = [k * space // max(windows - 1, 1) for k in range(windows)]
    full, short = [], []
    for n, s in enumerate(starts):
        window = ids[s : s + window_length + 1]
        t0 = time.time()
        full.append(token_nll(model, window[None])[0])
        short.append(short_context_nll(model, window, context))
        short[-1][: context - 1] = full[-1][: context - 1]  # fewer than `context` tokens before: the same measure
        log(f"  window {n + 1}/{windows} ({time.time() - t0:.0f} s)")
    full, short = torch.stack(full).mean(0), torch.stack(short).mean(0)
    buckets = []
    for lo, hi in BUCKETS:
        if hi > window_length:
            break
        # index i predicts token i + 1 from i + 1 tokens of context
        f, s = full[lo - 1 : hi - 1].double().mean().item(), short[lo - 1 : hi - 1].double().mean().item()
        buckets.append({"from": lo, "to": hi, "full_context": f, "context_512": s, "excess": f - s})
    # the curve at 256-token resolution (position of the predicted token)
    step = 256
    curve = [{"position": p + step, "full_context": full[p : p + step].double().mean().item(),
              "context_512": short[p : p + step].double().mean().item()}
             for p in range(0, window_length - 1, step) if p + step <= window_length - 1]
    return {"window_starts": starts, "buckets": buckets, "curve": curve}


def evaluate(label: str, adapter, variant_json, args) -> dict:
    settings = {"adapter": adapter and _digest(Path(adapter)), "variant": variant_json and Path(variant_json).read_text(),
                "chunks": args.chunks, "length": args.length, "windows": args.windows,
                "window_length": args.window_length, "probe": PROBE.read_text(), "version": 1}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(args.cache) / f"{key}.json"  # by what was measured, not by the label (an arm may become the retrofit)
    if cache.exists():
        log(f"{label}: cached ({cache})")
        return {**json.loads(cache.read_text()), "label": label}
    model, tokenizer = load_models(adapter, variant_json)
    result = {"label": label, "adapter": adapter, "perplexity": {}}
    t0 = time.time()
    for name, path in HELD_OUT.items():
        result["perplexity"][name] = held_out_perplexity(model, tokens_of(tokenizer, path), args.length, args.chunks)
        log(f"{label}: {name} perplexity {result['perplexity'][name]:.2f}")
    result["chat"] = chat_probe(model, tokenizer)
    log(f"{label}: chat {result['chat']['correct']}/{result['chat']['questions']} correct, "
        f"{result['chat']['empty']} empty")
    if args.windows:
        result["length"] = length_eval(model, tokens_of(tokenizer, HELD_OUT["persuasion"]), args.windows,
                                       args.window_length, args.length)
        log(f"{label}: length buckets " + ", ".join(f"{b['from']}-{b['to']}: {b['excess']:+.3f}"
                                                    for b in result["length"]["buckets"]))
    result["seconds"] = time.time() - t0
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result, indent=1))
    return result


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.glob("*")):
        if path.suffix in (".json", ".safetensors"):
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def table(source: dict, *retrofits: dict) -> str:
    """Markdown: one column per model; the retrofits' perplexities with their ratio to the source's."""
    lines = ["| measure | source (softmax) | " + " | ".join(r["label"] for r in retrofits) + " | target |",
             "|---|---:|" + "---:|" * len(retrofits) + "---|"]

    def row(measure, source_cell, cells, target=""):
        lines.append(f"| {measure} | {source_cell} | " + " | ".join(cells) + f" | {target} |")

    for name in HELD_OUT:
        s = source["perplexity"][name]
        row(f"perplexity @512, {name}", f"{s:.2f}", [f"{r['perplexity'][name]:.2f} ({r['perplexity'][name] / s:.2f}×)"
                                                    for r in retrofits], "≤ 1.25×")
    sc = source["chat"]
    row(f"chat probe correct (of {sc['questions']})", str(sc["correct"]),
        [f"{r['chat']['correct']} ({r['chat']['correct'] - sc['correct']:+d})" for r in retrofits], "≥ source − 1")
    row("chat probe empty answers", str(sc["empty"]), [str(r["chat"]["empty"]) for r in retrofits], "0")
    if "length" in source and all("length" in r for r in retrofits):
        for i, sb in enumerate(source["length"]["buckets"]):
            row(f"loss at positions {sb['from']}–{sb['to']} − same tokens @512 context (nats)", f"{sb['excess']:+.3f}",
                [f"{r['length']['buckets'][i]['excess']:+.3f}" for r in retrofits],
                "≤ +0.02 (retrofit)" if sb["from"] >= 12288 else "")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        log("matplotlib missing: no plot")
        return
    fig = Figure(figsize=(13, 4.8))
    ax, excess = fig.subplots(1, 2)
    colors = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange")
    for result, color in zip(results, colors):
        if "length" not in result:
            continue
        curve = result["length"]["curve"]
        x = [c["position"] for c in curve]
        ax.plot(x, [c["full_context"] for c in curve], color=color, label=f"{result['label']}: whole window as context")
        ax.plot(x, [c["context_512"] for c in curve], color=color, linestyle=":", label=f"{result['label']}: 512-token context")
        excess.plot(x, [c["full_context"] - c["context_512"] for c in curve], color=color, label=result["label"])
    for panel in (ax, excess):
        panel.axvline(8192, color="grey", linewidth=0.8)
        panel.text(8300, panel.get_ylim()[1], "source's window (8192)", va="top", fontsize=8, color="grey")
        panel.set_xlabel("token position in the 16k window (mean of 256 positions)")
    excess.axhline(0, color="black", linewidth=0.6)
    ax.set_ylabel("loss (nats)")
    ax.set_title("Held-out Persuasion: loss against position")
    ax.legend(fontsize=7)
    excess.set_ylabel("nats")
    excess.set_title("whole window minus 512-token context (same tokens)")
    excess.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", default=str(REPO / "adapters" / "smollm2-135m-stickbreaking-rope-lora"),
                        help="the retrofit's adapter folder (with base_variant.json)")
    parser.add_argument("--variant-json", default=None, help="a bare conversion instead of an adapter")
    parser.add_argument("--label", default="retrofit")
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "retrofit_eval"))
    parser.add_argument("--cache", default=str(REPO / "out" / "retrofit_eval"))
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=24, help="512-token chunks per held-out text")
    parser.add_argument("--windows", type=int, default=2, help="16k windows for the length measure (0: skip)")
    parser.add_argument("--window-length", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-source", action="store_true", help="evaluate the retrofit only")
    parser.add_argument("--arm", action="append", default=[], metavar="LABEL=ADAPTER",
                        help="another adapter to evaluate beside the retrofit (a recipe variant), repeatable")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    arms = []
    for spec in args.arm:
        label, sep, folder = spec.partition("=")
        if not sep or not label or not os.path.isfile(os.path.join(folder, "base_variant.json")):
            parser.error(f"--arm {spec!r}: expected LABEL=ADAPTER_FOLDER with a base_variant.json in the folder")
        arms.append((label, folder))
    results = [] if args.skip_source else [evaluate("source", None, None, args)]
    results.append(evaluate(args.label, None if args.variant_json else args.adapter, args.variant_json, args))
    results += [evaluate(label, folder, None, args) for label, folder in arms]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"settings": {k: v for k, v in vars(args).items() if k not in ("out", "cache")}, "results": results}
    payload["settings"]["adapter"] = os.path.relpath(args.adapter, REPO) if args.adapter else None
    if not args.skip_source:
        payload["table"] = table(*results)
        print(payload["table"])
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    plot(results, out.with_suffix(".png"))
    log(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
