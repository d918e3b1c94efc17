"""Shared pieces of the experiments: the family's config for each variant, parameter matching, a seeded and
resumable transformers `Trainer` run, interleaved throughput measurement, byte-level data, JSON and plot helpers.

Every model is an `AttnVariantLlamaForCausalLM` built from an `AttnVariantLlamaConfig`; the variants differ only in
config fields (`attention_variant`, `layer_shortcut`, `shortcut_mode`, and `intermediate_size` where sizes are matched).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "src") not in sys.path:  # run from a clone without `pip install -e .`
    sys.path.insert(0, str(REPO / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

RESULTS_DIR = REPO / "experiments" / "results"
WORK_DIR = REPO / "out" / "experiments"  # checkpoints and per-run files (ignored by git)
AUSTEN_DIR = REPO / "data" / "austen"
HELD_OUT_NOVEL = "austen_persuasion.txt"

# Config fields of each variant (on top of the experiment's base config).
VARIANTS = {
    "softmax_rope": dict(attention_variant="softmax"),
    "stickbreaking": dict(attention_variant="stickbreaking"),  # use_rope=None: NoPE
    "stickbreaking_depth": dict(attention_variant="stickbreaking", layer_shortcut=True, shortcut_mode="depth"),
    "softmax_rope_depth": dict(attention_variant="softmax", layer_shortcut=True, shortcut_mode="depth"),
    "softmax_rope_depth_context": dict(attention_variant="softmax", layer_shortcut=True, shortcut_mode="depth_context"),
}
LABELS = {
    "softmax_rope": "softmax + RoPE",
    "stickbreaking": "stick-breaking (NoPE)",
    "stickbreaking_depth": "stick-breaking + depth shortcut",
    "softmax_rope_depth": "softmax + RoPE + depth shortcut",
    "softmax_rope_depth_context": "softmax + RoPE + depth_context shortcut",
    "softmax_rope_wide": "softmax + RoPE, wider MLP (param-matched)",
}


def log(*parts) -> None:
    print(time.strftime("[%H:%M:%S]"), *parts, flush=True)


def setup_torch(threads: int) -> None:
    """float32 everywhere; one intra-op thread by default: on a shared 2-core machine two threads were 3-10x slower
    per step for these tiny models (each small op waits for the busier core)."""
    torch.set_num_threads(threads)
    torch.set_default_dtype(torch.float32)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ----------------------------------------------------------------------------------------------------------- models


def make_config(base: dict, variant: str, **overrides):
    """An `AttnVariantLlamaConfig` of `variant` on top of `base` (plain `LlamaConfig` fields)."""
    from hf_attn_variants import AttnVariantLlamaConfig

    fields = dict(base)
    fields.update(VARIANTS[variant.removesuffix("_wide")] if variant.endswith("_wide") else VARIANTS[variant])
    fields.update(overrides)
    return AttnVariantLlamaConfig(**fields)


def build_model(config):
    from hf_attn_variants import AttnVariantLlamaForCausalLM

    # sdpa: PyTorch's fused softmax kernel, and for stick-breaking the blockwise O(T)-memory op.
    return AttnVariantLlamaForCausalLM._from_config(config, attn_implementation="sdpa").float()


def num_params(config) -> int:
    with torch.device("meta"):
        model = build_model(config)
    seen, total = set(), 0
    for parameter in model.parameters():  # tied weights counted once
        if id(parameter) not in seen:
            seen.add(id(parameter))
            total += parameter.numel()
    return total


def matched_intermediate_size(base: dict, variant: str, target_params: int) -> int:
    """The MLP width of `variant` whose parameter count is closest to `target_params` (the count is linear in it)."""
    p0 = num_params(make_config(base, variant, intermediate_size=base["intermediate_size"]))
    p1 = num_params(make_config(base, variant, intermediate_size=base["intermediate_size"] + 1))
    per_unit = p1 - p0
    return max(1, base["intermediate_size"] + round((target_params - p0) / per_unit))


# -------------------------------------------------------------------------------------------------------- training


def config_fingerprint(config) -> dict:
    """The config's fields as a run key sees them. Building a model writes `auto_map` into its config, so build one
    (on the meta device) first: the key is then the same whether or not a model was built from the config before."""
    num_params(config)
    return config.to_dict()


def run_key(*parts) -> str:
    """Short hash of everything that defines a run: a changed setting gets a fresh directory, the same one resumes."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def step_timer(path: Path):
    """Trainer callback: wall time of every optimizer step (forward, backward, step; not checkpoint saving), appended to
    a file so that the times survive a resume."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        t0 = None

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.t0 is not None:
                with open(path, "a") as f:
                    f.write(json.dumps({"step": state.global_step, "s": time.perf_counter() - self.t0}) + "\n")

    return StepTimer()


def train_model(model, dataset, run_dir: Path, *, steps: int, batch_size: int, lr: float, warmup: int, seed: int,
                tokens_per_example: int, save_steps: int = 100, log_steps: int = 10, weight_decay: float = 0.1):
    """Train with transformers' `Trainer`, resuming from the last checkpoint in `run_dir`; a finished run (final model
    and stats present) is loaded instead of retrained. Returns (model, stats)."""
    from transformers import Trainer, TrainingArguments, default_data_collator
    from transformers.trainer_utils import get_last_checkpoint

    final_dir, stats_path = run_dir / "final", run_dir / "train_stats.json"
    if stats_path.exists() and (final_dir / "config.json").exists():
        from hf_attn_variants import AttnVariantLlamaForCausalLM

        log(f"  {run_dir.name}: finished before, loading {final_dir}")
        model = AttnVariantLlamaForCausalLM.from_pretrained(final_dir, dtype=torch.float32, attn_implementation="sdpa")
        return model, json.loads(stats_path.read_text())

    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = run_dir / "checkpoints"
    args = TrainingArguments(
        output_dir=str(checkpoints),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=warmup,
        weight_decay=weight_decay,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        logging_steps=log_steps,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=2,
        seed=seed,
        data_seed=seed,
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        disable_tqdm=True,
        log_level="warning",
        # Examples are random functions of their index already; sequential order lets a dataset follow the step
        # (experiment 1's length curriculum) and keeps a resumed run on exactly the same batches.
        train_sampling_strategy="sequential",
    )
    timer_path = run_dir / "step_times.jsonl"
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator,
                      callbacks=[step_timer(timer_path)])
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.exists() else None
    if last:
        log(f"  {run_dir.name}: resuming from {last}")
    wall = time.perf_counter()
    trainer.train(resume_from_checkpoint=last)
    wall = time.perf_counter() - wall

    step_seconds = {}
    for line in timer_path.read_text().splitlines():
        entry = json.loads(line)
        step_seconds[entry["step"]] = entry["s"]  # a step redone after a resume counts once
    times = [step_seconds[s] for s in sorted(step_seconds) if s <= steps]
    losses = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    tokens_per_step = batch_size * tokens_per_example
    stats = {
        "steps": steps,
        "batch_size": batch_size,
        "tokens_per_step": tokens_per_step,
        "train_tokens": steps * tokens_per_step,
        "train_seconds": sum(times),  # optimizer steps only, summed over resumes
        "wall_seconds_this_session": wall,
        "tokens_per_s_median_step": tokens_per_step / statistics.median(times[1:] or times),
        "loss_history": losses,
        "final_train_loss": statistics.fmean(l for _, l in losses[-3:]) if losses else None,
    }
    model = trainer.model
    model.save_pretrained(final_dir)
    stats_path.write_text(json.dumps(stats, indent=1))
    return model, stats


def measure_throughput(configs: dict, batch_size: int, seq_len: int, vocab_size: int, rounds: int = 5,
                       seed: int = 0) -> dict:
    """Training tokens/s of each config (forward + backward + AdamW step), measured round-robin in one process so every
    variant sees the same machine load; median over `rounds` (after one warm-up step each)."""
    generator = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    models = {}
    for name, config in configs.items():
        torch.manual_seed(seed)
        model = build_model(config).train()
        models[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    times = {name: [] for name in configs}

    def step(model, optimizer):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for name, (model, optimizer) in models.items():
        step(model, optimizer)  # warm-up
    for _ in range(rounds):
        for name, (model, optimizer) in models.items():
            t0 = time.perf_counter()
            step(model, optimizer)
            times[name].append(time.perf_counter() - t0)
    tokens = batch_size * seq_len
    reference = next(iter(configs))
    out = {}
    for name in configs:
        median = statistics.median(times[name])
        out[name] = {
            "tokens_per_s": tokens / median,
            "ms_per_step": 1000 * median,
            # ratio to the first config, per round then median: steadier than the ratio of medians on a noisy machine
            "step_time_vs_first": statistics.median(a / b for a, b in zip(times[name], times[reference])),
        }
    return {"batch_size": batch_size, "seq_len": seq_len, "rounds": rounds, "threads": torch.get_num_threads(),
            "variants": out}


def cached_throughput(work_dir: Path, configs: dict, batch_size: int, seq_len: int, vocab_size: int, rounds: int,
                      seed: int = 0) -> dict:
    """`measure_throughput`, kept in `work_dir` so that a resumed run reports the numbers of its first measurement."""
    key = run_key({n: config_fingerprint(c) for n, c in configs.items()}, batch_size, seq_len, rounds, seed)
    path = work_dir / f"throughput-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    log("throughput (interleaved training steps, same batch, one process)")
    result = measure_throughput(configs, batch_size, seq_len, vocab_size, rounds=rounds, seed=seed)
    for name, t in result["variants"].items():
        log(f"  {name}: {t['tokens_per_s']:.0f} tokens/s, step time {t['step_time_vs_first']:.2f}x the first")
    write_json(path, result)
    return result


# ------------------------------------------------------------------------------------------------------------ data


def read_austen(held_out: str = HELD_OUT_NOVEL) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(training bytes of five novels joined by blank lines, held-out novel's bytes, training file names)."""
    files = sorted(AUSTEN_DIR.glob("*.txt"))
    train_files = [f for f in files if f.name != held_out]
    if len(train_files) == len(files):
        raise FileNotFoundError(f"held-out novel {held_out} not in {AUSTEN_DIR}")
    train = b"\n\n\n".join(f.read_bytes() for f in train_files)
    test = (AUSTEN_DIR / held_out).read_bytes()
    return np.frombuffer(train, dtype=np.uint8), np.frombuffer(test, dtype=np.uint8), [f.name for f in train_files]


class RandomCrops(torch.utils.data.Dataset):
    """Map-style dataset of `length` random crops of `seq_len` bytes; crop i is a function of (seed, i) only, so a
    resumed run sees exactly the data it would have seen."""

    def __init__(self, data: np.ndarray, seq_len: int, length: int, seed: int):
        self.data, self.seq_len, self.length, self.seed = data, seq_len, length, seed

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        start = int(np.random.default_rng([self.seed, index]).integers(0, len(self.data) - self.seq_len))
        ids = torch.from_numpy(self.data[start:start + self.seq_len].astype(np.int64))
        return {"input_ids": ids, "labels": ids.clone()}


class ByteTokenizer:
    """The smallest tokenizer `plotting.plot_shortcut_attention` needs: bytes in, readable byte labels out."""

    def __call__(self, text: str, return_tensors=None):
        ids = list(text.encode("utf-8"))
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def convert_ids_to_tokens(self, ids):
        return ["␣" if i == 32 else repr(chr(i))[1:-1] if i < 128 else f"<{i}>" for i in ids]


@torch.no_grad()
def token_losses(model, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy (nats) of `targets` given `input_ids` (both (B, T)); float32 logits."""
    logits = model(input_ids=input_ids, use_cache=False).logits.float()
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")


# --------------------------------------------------------------------------------------------------------- outputs


def json_args(args) -> dict:
    """The parsed CLI arguments as JSON values; paths inside the repository relative to it (no machine paths)."""
    def value(v):
        if not isinstance(v, Path):
            return v
        try:
            return str(v.resolve().relative_to(REPO))
        except ValueError:
            return str(v)
    return {k: value(v) for k, v in vars(args).items()}


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=float))
    tmp.replace(path)


def figure(nrows=1, ncols=1, sharey=False, **kwargs):
    """A matplotlib Figure (no pyplot, no display backend) and its 2-D array of axes."""
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=sharey)
    return fig, axes


def add_common_args(parser, *, steps: int, batch_size: int, lr: float):
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps per model")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 5%% of --steps)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see setup_torch)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON and PNGs go")
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR, help="checkpoints; rerunning resumes from them")
    parser.add_argument("--save-steps", type=int, default=100, help="checkpoint every N steps")
    parser.add_argument("--throughput-rounds", type=int, default=5, help="rounds of the interleaved speed test (0: skip)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 3 steps, short contexts: for CI")


def add_model_args(parser, *, hidden_size: int, layers: int, heads: int, intermediate_size: int):
    parser.add_argument("--hidden-size", type=int, default=hidden_size)
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--heads", type=int, default=heads)
    parser.add_argument("--intermediate-size", type=int, default=intermediate_size)


def parse_args_with_smoke(parser, argv, smoke: dict):
    """`parser.parse_args(argv)`; with `--smoke` the tiny defaults `smoke` first (flags given explicitly still win)."""
    if argv is None:
        argv = sys.argv[1:]
    if "--smoke" in argv:
        parser.set_defaults(**smoke)
    return parser.parse_args(argv)


def base_config(args, vocab_size: int, **fields) -> dict:
    """The `LlamaConfig` fields every variant of an experiment shares (model size from `add_model_args`)."""
    return dict(
        vocab_size=vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=args.context, tie_word_embeddings=True, eos_token_id=None, **fields,
    )


def equal_size_configs(base: dict, variants) -> dict:
    """A config per variant with the parameter count of softmax + RoPE: a shortcut's MLP is narrowed to pay for it."""
    target = num_params(make_config(base, "softmax_rope"))
    configs = {}
    for variant in variants:
        config = make_config(base, variant)
        if num_params(config) != target:
            config = make_config(base, variant, intermediate_size=matched_intermediate_size(base, variant, target))
        configs[variant] = config
    return configs


def train_run(name: str, variant: str, config, dataset, args, train_args, seed: int, tokens_per_example: int):
    """Train (or resume, or load) one model of `variant` in its run directory, keyed by everything that defines it.
    Returns (model, stats, run_dir)."""
    from transformers import set_seed

    key = run_key(name, config_fingerprint(config), {k: getattr(args, k) for k in train_args})
    run_dir = args.work_dir / name / f"{variant}-seed{seed}-{key}"
    log(f"{variant} seed {seed}: {num_params(config):,} parameters, run dir {run_dir}")
    set_seed(seed)
    model = build_model(config)
    model, stats = train_model(
        model, dataset, run_dir, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        warmup=warmup_steps(args), seed=seed, tokens_per_example=tokens_per_example,
        save_steps=args.save_steps, log_steps=max(1, min(10, args.steps // 10)),
    )
    log(f"  trained: {stats['train_seconds']:.0f} s, final train loss {stats['final_train_loss']:.3f}")
    return model, stats, run_dir


def warmup_steps(args) -> int:
    return args.warmup if args.warmup is not None else max(1, math.ceil(0.05 * args.steps))
