"""`train(TrainConfig)`: one training run, from checked inputs to the published output folder.

The run writes into a staging folder next to the output (`.NAME.partial`, Trainer's checkpoints inside it) that is
renamed to the output when everything is written. Ctrl-C or SIGTERM during training saves a checkpoint there (every
rank at the same step) and stops; `resume=True` continues from the last checkpoint. A failure with no checkpoint to
continue from removes the staging folder.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict

import torch
from transformers import AutoTokenizer, TrainingArguments

from ..cli_common import Interrupted, SignalCatcher, first_line, normal_permissions, publish, signal_name
from .card import adapter_card, base_source, plot_curves
from .checks import RunPlan, TrainError, check_config, comparable, last_checkpoint
from .config import BASE_SOURCE_FILE, BASE_VARIANT_FILE, RUN_CONFIG_FILE, TrainConfig
from .data import build_datasets
from .distributed import save_trained, sharded_module_classes
from .loading import apply_lora, load_student, load_teacher, select_parameters, variant_fields
from .losses import held_out_loss
from .trainer import StopOnSignal, TimeBudgetCallback, UptrainingTrainer, agreed_signal

PICKLES = ("training_args.bin",)  # what Trainer's save_model leaves that the published folder must not hold


class TrainingInterrupted(Interrupted):
    """Ctrl-C/SIGTERM stopped training; the message says where the checkpoint is and how to continue."""


def train(config: TrainConfig) -> dict:
    """Run the recipe described by `config`; returns the metrics written to `OUTPUT_DIR/metrics.json`.

    Raises `TrainError` (one line) for bad input before anything is written, `TrainingInterrupted` after a signal
    (the checkpoint is kept for `resume=True`)."""
    wall_start = time.time()
    if config.threads is not None and isinstance(config.threads, int) and config.threads > 0:
        torch.set_num_threads(config.threads)
    plan = check_config(config)
    if plan.complete:
        print(f"{config.output_dir} is complete: nothing to resume")
        with open(os.path.join(plan.output, "metrics.json"), encoding="utf-8") as f:
            return json.load(f)
    with SignalCatcher() as catcher:
        return _run(config, plan, catcher, wall_start)


def _datasets(config: TrainConfig, plan: RunPlan):
    tokenizer_source = dict(gguf_file=config.gguf_file) if config.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(config.model, **tokenizer_source)
    train_dataset, eval_dataset, train_paths = build_datasets(tokenizer, config)
    if len(train_dataset) == 0:
        tokens = sum(len(tokenizer(open(p, encoding="utf-8").read()).input_ids) for p in train_paths)
        raise TrainError(f"--max-length {config.max_length}: the training texts hold {tokens} tokens, not one chunk "
                         "of that length; lower --max-length or add text")
    if eval_dataset is not None and len(eval_dataset) == 0:
        length = config.eval_length or config.max_length
        raise TrainError(f"--eval-file {config.eval_file!r} is shorter than one chunk of {length} tokens; lower "
                         "--eval-length or pass another file")
    return tokenizer, train_dataset, eval_dataset, train_paths


def _training_arguments(config: TrainConfig, plan: RunPlan, has_eval: bool) -> TrainingArguments:
    return TrainingArguments(
        output_dir=plan.checkpoints,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type=config.lr_scheduler,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        eval_strategy="steps" if (has_eval and config.eval_steps) else "no",
        eval_steps=config.eval_steps,
        eval_on_start=has_eval and plan.resume_from is None,  # a resumed run has it in its history already
        prediction_loss_only=True,
        save_strategy="steps" if config.save_steps else "no",  # a signal saves a checkpoint either way
        save_steps=config.save_steps or 500,
        save_total_limit=2,  # the last one and the one before, in case the last was cut short
        report_to="none",
        seed=config.seed,
        data_seed=config.seed,
        dataloader_num_workers=0,
        train_sampling_strategy="random" if config.shuffle else "sequential",
        gradient_checkpointing=config.gradient_checkpointing,
        disable_tqdm=config.disable_tqdm,
        bf16=config.dtype == "bfloat16",
        use_cpu=not torch.cuda.is_available(),  # on CPU this is what makes a multi-process launch use gloo
        ddp_find_unused_parameters=config.attention_transfer_steps > 0,
    )


def _wait_for_everyone():
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def _run(config: TrainConfig, plan: RunPlan, catcher: SignalCatcher, wall_start: float) -> dict:
    from transformers import set_seed

    set_seed(config.seed)
    tokenizer, train_dataset, eval_dataset, train_paths = _datasets(config, plan)
    args = _training_arguments(config, plan, eval_dataset is not None)
    is_main = args.process_index == 0
    _wait_for_everyone()  # every rank has checked the output before rank 0 makes the staging folder
    if is_main:
        if plan.resume_from is None and os.path.lexists(plan.staging):  # --overwrite, or --resume with no checkpoint
            shutil.rmtree(plan.staging)
        os.makedirs(plan.checkpoints, exist_ok=True)
        with open(os.path.join(plan.staging, RUN_CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(comparable(config), f, indent=1, default=str)
    _wait_for_everyone()
    try:
        return _train_in_staging(config, plan, catcher, wall_start, tokenizer, train_dataset, eval_dataset,
                                 train_paths, args, is_main)
    except BaseException as error:
        if is_main:
            checkpoint = last_checkpoint(plan.checkpoints)
            finished = os.path.exists(os.path.join(plan.staging, "metrics.json"))  # only the rename failed
            if checkpoint is None and not finished:
                shutil.rmtree(plan.staging, ignore_errors=True)
            elif not isinstance(error, (Interrupted, KeyboardInterrupt)):
                print(f"note: {os.path.basename(checkpoint)} is kept in {plan.staging}: continue the run with --resume",
                      file=sys.stderr)
        if isinstance(error, KeyboardInterrupt) and last_checkpoint(plan.checkpoints):
            raise _interrupted(config, plan, 2) from None
        raise


def _interrupted(config, plan, signum, step=None) -> TrainingInterrupted:
    checkpoint = last_checkpoint(plan.checkpoints)
    at = f" at step {step}" if step is not None else ""
    kept = (f"; {os.path.basename(checkpoint)} saved in {plan.staging}: continue with --resume" if checkpoint
            else "; nothing was kept")
    return TrainingInterrupted(signum, f"interrupted by {signal_name(signum)}{at}{kept}")


def _base_record(config, plan, model, changed, tokenizer, is_main) -> str | None:
    """What the adapter names as its base (written into `adapter_config.json`), saving a converted base if needed."""
    if config.method != "lora" or config.base_name is not None:
        return config.base_name
    if not changed:
        return os.path.abspath(config.model) if os.path.isdir(config.model) else config.model
    # The adapter needs the converted base it was trained on: save it once, next to the adapter.
    staged = os.path.join(plan.staging, "base")
    if is_main and config.save and not os.path.isdir(staged):
        from ..convert import save_atomically

        save_atomically(model, staged, tokenizer, overwrite=True)
    return os.path.join(plan.output, "base")


def _train_in_staging(config, plan, catcher, wall_start, tokenizer, train_dataset, eval_dataset, train_paths, args,
                      is_main) -> dict:
    model, changed = load_student(config)
    teacher = load_teacher(config) if config.teacher else None

    # Held-out perplexity of the teacher (the target) and where the adapter's base will live.
    teacher_loss = held_out_loss(teacher, eval_dataset, config.eval_batch_size) if (teacher is not None and eval_dataset is not None) else None
    if teacher_loss is not None and is_main:
        print(f"teacher held-out loss {teacher_loss:.4f}, perplexity {math.exp(teacher_loss):.2f}")
    base_record = _base_record(config, plan, model, changed, tokenizer, is_main)

    if config.method == "lora":
        model = apply_lora(model, config)
        # Until the output is published its base is in the staging folder (peft reads its config when saving).
        staged_base = os.path.join(plan.staging, "base")
        model.peft_config["default"].base_model_name_or_path = staged_base if os.path.isdir(staged_base) else base_record
        trained = [n for n, p in model.named_parameters() if p.requires_grad]
    else:
        trained = select_parameters(model, config.train)
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    if is_main:
        print(f"{config.method}: training {n_trained:,} of {n_total:,} parameters ({len(trained)} tensors); "
              f"{len(train_dataset)} train chunks of {config.max_length} tokens from {len(train_paths)} files, "
              f"{len(eval_dataset) if eval_dataset is not None else 0} held-out chunks"
              + (f"; resuming from {os.path.basename(plan.resume_from)}" if plan.resume_from else ""))

    stop = StopOnSignal(catcher)
    trainer = UptrainingTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset.with_format("torch"),
        eval_dataset=eval_dataset.with_format("torch") if eval_dataset is not None else None,
        teacher=teacher,
        kl_weight=config.kl_weight,
        temperature=config.temperature,
        curriculum=plan.curriculum,
        attention_transfer_steps=config.attention_transfer_steps,
        callbacks=[TimeBudgetCallback(config.time_budget_minutes), stop],
    )
    train_start = time.time()
    with catcher.deferred():
        result = trainer.train(resume_from_checkpoint=plan.resume_from)
        signum = stop.signum or agreed_signal(catcher, args.device)
        if signum:
            if stop.signum is None:  # it came after the last step's end: save that step's checkpoint now
                trainer._save_checkpoint(trainer.model, None)
            raise _interrupted(config, plan, signum, trainer.state.global_step)
    train_seconds = time.time() - train_start
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    if eval_dataset is not None and (not evals or evals[-1]["step"] != trainer.state.global_step):
        trainer.evaluate()
        evals = [h for h in trainer.state.log_history if "eval_loss" in h]

    metrics = dict(
        distributed_type=str(trainer.accelerator.distributed_type.value),
        sharded_modules=sharded_module_classes(trainer.model_wrapped),
        steps=trainer.state.global_step,
        resumed_from_step=int(plan.resume_from.rsplit("-", 1)[1]) if plan.resume_from else None,
        train_seconds=train_seconds,
        wall_seconds=time.time() - wall_start,
        train_loss=result.training_loss,
        trained_parameters=n_trained,
        total_parameters=n_total,
        tokens_per_step=config.batch_size * config.grad_accum * args.world_size * config.max_length,
        world_size=args.world_size,
        teacher_eval_loss=teacher_loss,
        teacher_eval_perplexity=math.exp(teacher_loss) if teacher_loss is not None else None,
        initial_eval_loss=evals[0]["eval_loss"] if evals else None,
        final_eval_loss=evals[-1]["eval_loss"] if evals else None,
        initial_eval_perplexity=evals[0]["eval_perplexity"] if evals else None,
        final_eval_perplexity=evals[-1]["eval_perplexity"] if evals else None,
        base_model_name_or_path=base_record,
        train_files=train_paths,
        eval_file=config.eval_file,
        config=asdict(config),
        log_history=trainer.state.log_history,
    )
    _write_outputs(config, plan, trainer, model, tokenizer, metrics, is_main)
    _wait_for_everyone()
    return metrics


def _record_base(folder: str, base: str | None) -> None:
    path = os.path.join(folder, "adapter_config.json")
    with open(path, encoding="utf-8") as f:
        adapter_config = json.load(f)
    adapter_config["base_model_name_or_path"] = base
    with open(path, "w", encoding="utf-8") as f:
        json.dump(adapter_config, f, indent=2, sort_keys=True)


def _write_outputs(config, plan, trainer, model, tokenizer, metrics, is_main) -> None:
    """The finished run into the staging folder, then the staging folder renamed to the output."""
    staging = plan.staging
    if config.save:
        save_trained(trainer, staging)
        if is_main and config.method == "full":
            tokenizer.save_pretrained(staging)
        if is_main and config.method == "lora":
            _record_base(staging, metrics["base_model_name_or_path"])
            # What the base must be, for a user who rebuilds it (e.g. converts the same source) instead of loading it.
            variant = variant_fields(model.get_base_model().config)
            with open(os.path.join(staging, BASE_VARIANT_FILE), "w") as f:
                json.dump(variant, f, indent=1)
            source = base_source(config, variant, metrics["base_model_name_or_path"])
            if source is not None:
                with open(os.path.join(staging, BASE_SOURCE_FILE), "w") as f:
                    json.dump(source, f, indent=1)
            # peft's save writes a template card full of placeholders: replace it with what this adapter is.
            with open(os.path.join(staging, "README.md"), "w") as f:
                f.write(adapter_card(metrics, variant, source))
    if not is_main:
        return
    with open(os.path.join(staging, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1, default=str)
    if config.plot:
        plot_curves(metrics, os.path.join(staging, "curves.png"))
    # The published folder holds no pickles and no run bookkeeping (checkpoints carry Trainer's own files).
    shutil.rmtree(plan.checkpoints, ignore_errors=True)
    for name in (*PICKLES, RUN_CONFIG_FILE):
        if os.path.lexists(os.path.join(staging, name)):
            os.remove(os.path.join(staging, name))
    normal_permissions(staging)
    replace = config.overwrite or config.resume  # a resumed `--overwrite` run replaces what it was started to
    try:
        publish(staging, plan.output, overwrite=replace)
    except OSError as error:
        raise TrainError(f"cannot publish {plan.output!r}: {first_line(error)}; the finished run is in {staging}") from error
    summary = {k: metrics[k] for k in ("steps", "train_seconds", "teacher_eval_perplexity",
                                       "initial_eval_perplexity", "final_eval_perplexity")}
    print("summary:", json.dumps(summary))
