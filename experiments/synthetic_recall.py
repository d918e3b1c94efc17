"""Experiment 1: length generalisation on associative recall (key-value retrieval), trained at context 256.

A sequence is BOS followed by 2-token slots, most of them noise. `--pairs` slots store a record r(k, v) (one token per
(key, value): 16 keys x 8 values); later, a query slot holds the key's query token q_k followed by the record, which
is scored: the model must find the record of key k among everything before it, `distance` tokens back, and copy it
(chance: 1/8 once the key is known). Each key is stored once per sequence; noise, query and record tokens are disjoint.
Distances are drawn uniformly over everything the context allows, so at test time they grow with the context: trained
at 256 (distances 2..252), tested at 256 / 1k / 4k / 16k (distances up to the context), with the same number of
records per sequence. `--layout pair` is the two-token (k, v) variant (an induction-head task).

Training uses a short length curriculum (`--curriculum`, default: episodes of 16 tokens for the first 25 % of the
steps, of 64 until 50 %, then 256 for the second half), packed into rows of 256 with restarting position_ids. Without
it no model left the loss plateau within the step budget (stick-breaking at init gives nearly all of its weight to the
nearest few keys, so a distant record gets no gradient), and the two-token layout stayed near chance at 256 for
every model even with it.

Three models of equal size, all `AttnVariantLlamaForCausalLM`: softmax + RoPE, stick-breaking (NoPE) and stick-breaking
+ `depth` shortcut (its MLP is narrowed so that the shortcut's parameters keep the total equal).

    python experiments/synthetic_recall.py            # defaults
    python experiments/synthetic_recall.py --smoke    # seconds: what CI runs

Writes results/synthetic_recall.json, synthetic_recall_length.png, synthetic_recall_distance.png. Rerunning resumes
from the last checkpoint of each model (and skips finished models and evaluations).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import exp_common as C  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

NAME = "synthetic_recall"
DEFAULT_VARIANTS = ["softmax_rope", "stickbreaking", "stickbreaking_depth"]
PAD, BOS = 0, 1
# The arguments that define a trained model (its run directory); the others only change the evaluation or outputs.
TRAIN_ARGS = ("steps", "batch_size", "lr", "warmup", "context", "pairs", "n_keys", "n_values", "n_noise", "seed",
              "curriculum", "layout")
SMOKE = dict(  # --smoke: a tiny config that runs in seconds (CI)
    steps=3, batch_size=4, context=32, save_steps=2, eval_contexts=[32, 64], eval_queries=8, eval_max_tokens=128,
    curriculum="16:0.4", pairs=2, n_keys=4, n_values=4, n_noise=4, hidden_size=16, layers=2, heads=2, intermediate_size=32,
    throughput_rounds=1,
)


class Task:
    """Token layout and sequence generator of the recall task.

    Tokens: PAD, BOS, `n_noise` noise tokens, `n_keys` query tokens q_k, and the answers. `layout="record"` (default):
    a stored item is one record token r(k, v) (n_keys * n_values of them) and the query slot is (q_k, r(k, v)): the
    model must find the record of key k and copy it. `layout="pair"`: the stored item is the two tokens (k, v) and the
    query slot repeats them, (k, v): the classic two-hop induction task (find the earlier k, output the token after it).
    """

    def __init__(self, n_noise: int, n_keys: int, n_values: int, pairs: int, layout: str = "record"):
        if layout not in ("record", "pair"):
            raise ValueError(f"unknown layout {layout!r}")
        self.n_noise, self.n_keys, self.n_values, self.pairs, self.layout = n_noise, n_keys, n_values, pairs, layout
        self.noise0 = 2
        self.key0 = self.noise0 + n_noise
        self.answer0 = self.key0 + n_keys
        self.vocab_size = self.answer0 + (n_keys * n_values if layout == "record" else n_values)
        if pairs > n_keys:
            raise ValueError(f"--pairs {pairs} needs at least as many keys (--n-keys {n_keys}): keys are unique")

    def sequence(self, rng: np.random.Generator, length: int, pairs: int | None = None):
        """(input_ids, labels, [(label position, distance in tokens)]) of one sequence of `length` tokens; the
        distance is from the stored item to the query token."""
        pairs = self.pairs if pairs is None else pairs
        slots = (length - 1) // 2
        if slots < 2 * pairs:
            raise ValueError(f"context {length} too short for {pairs} pairs")
        ids = np.empty(length, dtype=np.int64)
        ids[0] = BOS
        ids[1:] = rng.integers(self.noise0, self.key0, size=length - 1)
        labels = np.full(length, -100, dtype=np.int64)
        used = np.zeros(slots, dtype=bool)
        keys = rng.choice(self.n_keys, size=pairs, replace=False)
        values = rng.integers(0, self.n_values, size=pairs)
        queries = []
        for key, value in zip(keys, values):
            while True:  # rejection sampling of a free (item slot, query slot) at a uniform slot distance
                gap = int(rng.integers(1, slots))
                first = int(rng.integers(0, slots - gap))
                if not used[first] and not used[first + gap]:
                    break
            used[first] = used[first + gap] = True
            item, query = 1 + 2 * first, 1 + 2 * (first + gap)
            if self.layout == "record":
                answer = self.answer0 + key * self.n_values + value
                ids[item] = answer  # the record; the slot's second token stays noise
                ids[query], ids[query + 1] = self.key0 + key, answer
            else:
                answer = self.answer0 + value
                ids[item], ids[item + 1] = self.key0 + key, answer
                ids[query], ids[query + 1] = self.key0 + key, answer
            labels[query + 1] = answer
            queries.append((query + 1, query - item))
        return ids, labels, queries


class RecallDataset(torch.utils.data.Dataset):
    """Map-style: example i is a function of (seed, i), so a resumed run sees exactly the same data.

    Length curriculum: while step i // batch_size is in an early phase of `curriculum` [(episode length, fraction of
    the steps)], a row of `length` tokens packs independent episodes of that length, each with its own BOS, keys and
    restarting `position_ids` (transformers turns the restarts into a block-diagonal causal mask, so an episode sees
    only itself: exactly a batch of shorter sequences). After the last phase every row is one full-length episode.
    """

    def __init__(self, task: Task, length: int, size: int, seed: int, batch_size: int = 1, steps: int = 1,
                 curriculum=()):
        self.task, self.length, self.size, self.seed = task, length, size, seed
        self.batch_size, self.steps, self.curriculum = batch_size, steps, sorted(curriculum, key=lambda c: c[1])

    def __len__(self):
        return self.size

    def episode_length(self, index: int) -> int:
        progress = (index // self.batch_size) / self.steps
        for episode, until in self.curriculum:
            if progress < until:
                return episode
        return self.length

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, index])
        episode = self.episode_length(index)
        if episode == self.length:
            ids, labels, _ = self.task.sequence(rng, self.length)
            positions = np.arange(self.length)
        else:
            pairs = max(1, round(self.task.pairs * episode / self.length))
            parts = [self.task.sequence(rng, episode, pairs) for _ in range(self.length // episode)]
            ids = np.concatenate([p[0] for p in parts])
            labels = np.concatenate([p[1] for p in parts])
            positions = np.tile(np.arange(episode), len(parts))
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
                "position_ids": torch.from_numpy(positions)}


def parse_curriculum(text: str) -> list[tuple[int, float]]:
    """'64:0.25,128:0.5' -> [(64, 0.25), (128, 0.5)]: episodes of 64 tokens for the first 25 % of the steps, ..."""
    if not text:
        return []
    phases = []
    for part in text.split(","):
        length, until = part.split(":")
        phases.append((int(length), float(until)))
    return phases


@torch.no_grad()
def evaluate(model, task: Task, context: int, sequences: int, batch_size: int, seed: int) -> dict:
    """Accuracy (argmax over the whole vocabulary) of every query in `sequences` fresh sequences of `context` tokens."""
    model.eval()
    rng = np.random.default_rng([seed, 10_000_019, context])
    records, start = [], time.perf_counter()
    for begin in range(0, sequences, batch_size):
        batch = [task.sequence(rng, context) for _ in range(min(batch_size, sequences - begin))]
        input_ids = torch.from_numpy(np.stack([b[0] for b in batch]))
        logits = model(input_ids=input_ids, use_cache=False).logits
        for row, (_, labels, queries) in enumerate(batch):
            for position, distance in queries:
                predicted = int(logits[row, position - 1].argmax())
                records.append((distance, int(predicted == labels[position])))
    correct = [c for _, c in records]
    return {
        "context": context,
        "sequences": sequences,
        "queries": len(records),
        "accuracy": float(np.mean(correct)),
        "seconds": time.perf_counter() - start,
        "records": records,  # (distance, correct) per query
    }


def distance_bins(max_distance: int) -> list[int]:
    edges = [1]
    while edges[-1] < max_distance:
        edges.append(edges[-1] * 2)
    return edges


def accuracy_by_distance(records, edges) -> list[dict]:
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        hits = [c for d, c in records if lo < d <= hi]
        if hits:
            out.append({"distance_lo": lo, "distance_hi": hi, "queries": len(hits), "accuracy": float(np.mean(hits))})
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser, steps=400, batch_size=16, lr=3e-3)
    parser.add_argument("--context", type=int, default=256, help="training context")
    parser.add_argument("--eval-contexts", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--eval-queries", type=int, default=512,
                        help="queries per test context (at least one sequence, at most --eval-max-tokens in all)")
    parser.add_argument("--eval-max-tokens", type=int, default=65536, help="tokens per test context at most")
    parser.add_argument("--eval-tokens-per-batch", type=int, default=8192, help="test batch = this // context (>= 1)")
    parser.add_argument("--curriculum", default="16:0.25,64:0.5",
                        help="LENGTH:UNTIL,...: pack episodes of LENGTH tokens until that fraction of the steps "
                             "(then full-length episodes); '' for none")
    parser.add_argument("--pairs", type=int, default=16, help="key-value pairs (and queries) per sequence")
    parser.add_argument("--layout", choices=["record", "pair"], default="record", help="see Task")
    parser.add_argument("--n-keys", type=int, default=16)
    parser.add_argument("--n-values", type=int, default=8)
    parser.add_argument("--n-noise", type=int, default=32)
    C.add_model_args(parser, hidden_size=64, layers=3, heads=2, intermediate_size=128)
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=sorted(C.VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    return C.parse_args_with_smoke(parser, argv, SMOKE)


def main(argv=None) -> dict:
    args = parse_args(argv)
    C.setup_torch(args.threads)
    task = Task(args.n_noise, args.n_keys, args.n_values, args.pairs, args.layout)
    base = C.base_config(args, task.vocab_size, pad_token_id=PAD, bos_token_id=BOS,
                         use_cache=False)  # no cache: packed position_ids become a block-diagonal mask
    configs = C.equal_size_configs(base, args.variants)

    throughput = None
    if args.throughput_rounds:
        throughput = C.cached_throughput(args.work_dir / NAME, configs, args.batch_size, args.context,
                                         task.vocab_size, args.throughput_rounds, args.seed)

    results = {"variants": {}}
    for variant, config in configs.items():
        dataset = RecallDataset(task, args.context, args.steps * args.batch_size, args.seed, args.batch_size,
                                args.steps, parse_curriculum(args.curriculum))
        model, stats, run_dir = C.train_run(NAME, variant, config, dataset, args, TRAIN_ARGS, args.seed,
                                            tokens_per_example=args.context)
        evals = {}
        for context in args.eval_contexts:
            path = run_dir / f"eval_{context}_{C.run_key(args.eval_queries, args.eval_max_tokens)}.json"
            if path.exists():
                evals[context] = json.loads(path.read_text())
                continue
            sequences = max(1, min(args.eval_max_tokens // context, math.ceil(args.eval_queries / args.pairs)))
            result = evaluate(model, task, context, sequences, max(1, args.eval_tokens_per_batch // context), args.seed)
            C.write_json(path, result)
            evals[context] = result
            C.log(f"  context {context}: accuracy {result['accuracy']:.3f} over {result['queries']} queries "
                  f"({result['seconds']:.0f} s)")
        edges = distance_bins(max(args.eval_contexts))
        all_records = [r for e in evals.values() for r in e["records"]]
        results["variants"][variant] = {
            "label": C.LABELS[variant],
            "parameters": C.num_params(config),
            "intermediate_size": config.intermediate_size,
            "train": {k: v for k, v in stats.items()},
            "accuracy_by_context": {str(c): e["accuracy"] for c, e in evals.items()},
            "queries_by_context": {str(c): e["queries"] for c, e in evals.items()},
            "eval_seconds_by_context": {str(c): e["seconds"] for c, e in evals.items()},
            "accuracy_by_distance": {str(c): accuracy_by_distance(e["records"], edges) for c, e in evals.items()},
            "accuracy_by_distance_pooled": accuracy_by_distance(all_records, edges),
        }
    payload = {
        "experiment": NAME,
        "args": C.json_args(args),
        "task": {"vocab_size": task.vocab_size, "pairs": args.pairs, "n_keys": args.n_keys, "n_values": args.n_values,
                 "n_noise": args.n_noise, "layout": args.layout, "train_max_distance": 2 * ((args.context - 1) // 2 - 1)},
        "throughput": throughput,
        **results,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    C.write_json(args.results_dir / f"{NAME}.json", payload)
    plot(payload, args.results_dir, args.context, 1 / args.n_values)
    C.log(f"wrote {args.results_dir / (NAME + '.json')}")
    return payload


def plot(payload: dict, out_dir: Path, train_context: int, chance: float) -> None:
    variants = payload["variants"]
    fig, axes = C.figure(1, 2, figsize=(11, 4))
    ax = axes[0, 0]
    for variant, r in variants.items():
        contexts = [int(c) for c in r["accuracy_by_context"]]
        acc = [r["accuracy_by_context"][str(c)] for c in contexts]
        err = [math.sqrt(max(a * (1 - a), 1e-9) / r["queries_by_context"][str(c)]) for a, c in zip(acc, contexts)]
        ax.errorbar(contexts, acc, yerr=err, marker="o", capsize=3, label=r["label"])
    ax.axvline(train_context, color="grey", ls=":", lw=1)
    ax.axhline(chance, color="grey", ls="--", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("test context (tokens); dotted: training context, dashed: chance")
    ax.set_ylabel("recall accuracy")
    ax.set_title("associative recall vs context length")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    for variant, r in variants.items():
        history = r["train"]["loss_history"]
        ax.plot([s for s, _ in history], [l for _, l in history], label=r["label"])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (scored answers, nats)")
    ax.set_yscale("log")
    ax.set_title("training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / f"{NAME}_length.png", dpi=110)

    fig, axes = C.figure(1, len(variants), figsize=(4.2 * len(variants), 3.8), sharey=True)
    for ax, (variant, r) in zip(axes[0], variants.items()):
        for context, bins in r["accuracy_by_distance"].items():
            ax.plot([b["distance_hi"] for b in bins], [b["accuracy"] for b in bins], marker="o", label=f"context {context}")
        ax.axvline(train_context, color="grey", ls=":", lw=1)
        ax.axhline(chance, color="grey", ls="--", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(r["label"], fontsize=9)
        ax.set_xlabel("retrieval distance (tokens, bin upper edge)")
    axes[0, 0].set_ylabel("recall accuracy")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / f"{NAME}_distance.png", dpi=110)


if __name__ == "__main__":
    main()
