"""`UptrainingTrainer` (transformers' Trainer with distillation, attention transfer and a curriculum) and its
callbacks."""

from __future__ import annotations

import math
import os
import time

import torch
from transformers import Trainer, TrainerCallback

from .distributed import cpu_fsdp_requested, enable_cpu_fsdp, wrap_present_no_split_modules
from .losses import AttentionTransfer, distillation_loss, lm_loss

class UptrainingTrainer(Trainer):
    """`Trainer` whose training loss is `kl_weight * KL(teacher || student) + (1 - kl_weight) * LM` (LM only without a
    teacher), optionally after `attention_transfer_steps` of layer-local attention transfer, with a sequence-length
    curriculum; evaluation is always the LM loss (held-out perplexity = exp)."""

    loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean; Trainer divides by the accumulation steps

    def __init__(self, *args, teacher=None, kl_weight=1.0, temperature=1.0, curriculum=(), attention_transfer_steps=0,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device) if teacher is not None else None
        self.kl_weight = kl_weight if teacher is not None else 0.0
        self.temperature = temperature
        self.curriculum = list(curriculum)
        self.attention_transfer_steps = attention_transfer_steps
        if attention_transfer_steps and teacher is None:
            raise ValueError("`attention_transfer_steps` needs a teacher")
        self.attention_transfer = AttentionTransfer(self.model, self.teacher) if attention_transfer_steps else None
        self._components = {}

    def create_accelerator_and_postprocess(self):
        cpu_fsdp = cpu_fsdp_requested()
        if cpu_fsdp:
            # Every rank loads the full weights, so there is nothing to broadcast (and broadcasting needs a GPU here).
            os.environ["FSDP_SYNC_MODULE_STATES"] = "false"
            os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
        super().create_accelerator_and_postprocess()
        if cpu_fsdp and self.accelerator.state.distributed_type.value != "FSDP":  # train() may build it again
            enable_cpu_fsdp(self.accelerator)
            self.is_fsdp_enabled = True
        if self.is_fsdp_enabled:
            wrap_present_no_split_modules(self.accelerator.state.fsdp_plugin, self.model)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Held-out LM loss only (the chunks carry no `labels` column: the inputs are the labels)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _add_components(self, **components):
        for name, value in components.items():
            total, count = self._components.get(name, (0.0, 0))
            self._components[name] = (total + value, count + 1)

    def sequence_length(self, step: int, max_length: int) -> int:
        for length, end in self.curriculum:
            if step < end:
                return length
        return max_length

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        input_ids = inputs["input_ids"]
        if not model.training:
            outputs = model(input_ids=input_ids, labels=input_ids)
            return (outputs.loss, outputs) if return_outputs else outputs.loss
        length = self.sequence_length(self.state.global_step, input_ids.shape[1])
        input_ids = input_ids.reshape(-1, length)  # same tokens, cut into shorter sequences
        self._add_components(seq_len=length)
        if self.state.global_step < self.attention_transfer_steps:
            loss = self.attention_transfer.loss(model, self.teacher, input_ids)
            self._add_components(attention_transfer_loss=loss.detach())
            return (loss, None) if return_outputs else loss
        outputs = model(input_ids=input_ids)
        lm = lm_loss(outputs.logits, input_ids)
        loss = lm
        self._add_components(lm_loss=lm.detach())
        if self.kl_weight > 0:
            with torch.no_grad():
                teacher_logits = self.teacher(input_ids=input_ids).logits
            kl = distillation_loss(outputs.logits, teacher_logits, self.temperature)
            self._add_components(kl_loss=kl.detach())
            loss = self.kl_weight * kl + (1 - self.kl_weight) * lm
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, start_time=None):
        if "loss" in logs and self._components:  # a training log: add the loss components, averaged over ranks
            names = ("seq_len", "attention_transfer_loss", "kl_loss", "lm_loss")
            # Every rank reduces the same names in the same order (NaN where a rank has none: never, with equal steps).
            values = [self._components[n][0] / self._components[n][1] if n in self._components else float("nan")
                      for n in names]
            reduced = self.accelerator.reduce(torch.tensor(values, dtype=torch.float32, device=self.args.device), "mean")
            logs.update({n: v for n, v in zip(names, reduced.tolist()) if not math.isnan(v)})
            self._components = {}
        if "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
        super().log(logs, start_time)


class TimeBudgetCallback(TrainerCallback):
    """Stops training once `minutes` have passed (rank 0 decides; the decision is broadcast so ranks stop together)."""

    def __init__(self, minutes: float | None):
        self.seconds = None if minutes is None else 60 * minutes
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        if self.seconds is None:
            return
        stop = torch.tensor([float(time.time() - self.start > self.seconds)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(stop, src=0)
        if stop.item():
            control.should_training_stop = True
            control.should_evaluate = True



def agreed_signal(catcher, device) -> int:
    """The signal any rank received (0: none); every rank must call this at the same point."""
    received = torch.tensor([float(catcher.received or 0)], device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(received, op=torch.distributed.ReduceOp.MAX)
    return int(received.item())


class StopOnSignal(TrainerCallback):
    """Ctrl-C or SIGTERM during training (recorded by a `cli_common.SignalCatcher` while deferring): at the end of that step
    every rank logs, saves a checkpoint through Trainer's own mechanism and stops, together.

    A checkpoint also always comes with a training log, so the accumulated loss components are never lost with it and
    a resumed run logs what an uninterrupted one would."""

    def __init__(self, catcher):
        self.catcher = catcher
        self.signum = None

    def on_step_end(self, args, state, control, **kwargs):
        signum = agreed_signal(self.catcher, args.device)
        if signum:
            self.signum = signum
            control.should_save = control.should_training_stop = True
        if control.should_save:
            control.should_log = True
