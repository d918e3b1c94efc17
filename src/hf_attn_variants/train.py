"""One training entry point: plain fine-tuning and uptraining (distillation from a teacher), LoRA or full.

    hf-attn-variants-train MODEL OUTPUT_DIR [--teacher TEACHER] [--method lora|full] [--max-steps N] ...

* Plain fine-tuning: LM loss on the training texts, any variant (`MODEL` is a converted folder, a Llama folder or
  Hub id, or a GGUF file via `--gguf-file`; `--attention-variant`, `--use-rope`, ... change the variant on load).
* Uptraining: with `--teacher` (typically the softmax source of a stick-breaking conversion) the loss is the KL
  divergence from the teacher's next-token distribution, optionally mixed with the LM loss (`--kl-weight`).
* `--method lora` (peft; `--lora-targets` picks the projections, `--train` adds modules trained fully, e.g. norms)
  or `--method full` (`--train` picks parameter groups: `all`, `attention`, `qk`, `norms`, `mlp`, `embeddings`, or
  any regex over parameter names).
* Data: plain-text files tokenized into fixed-length chunks (`datasets.Dataset.from_dict`); one file is held out
  (`--eval-file`) and its perplexity is measured every `--eval-steps` (and once for the teacher). A sequence-length
  curriculum (`--curriculum 128:200,256:100`) trains on shorter pieces of the same chunks first.
* Runs through transformers' `Trainer`, so `accelerate launch --num_processes 2 -m hf_attn_variants.train ...` works
  unchanged (DDP, or FSDP with the family's `_no_split_modules` as wrap policy).
* Writes to `OUTPUT_DIR`: the adapter (LoRA) or the model (full), `metrics.json` (curves, perplexities, wall time,
  arguments) and `curves.png`. An adapter records a base that `AutoPeftModelForCausalLM.from_pretrained(OUTPUT_DIR,
  trust_remote_code=True)` loads: `MODEL` itself when it is a family folder loaded unchanged, else the converted base
  the command saves to `OUTPUT_DIR/base`; `--base-name` records a Hub id or path of your choice instead.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

from .lora import LORA_TARGET_MODULES, lora_config, target_regex
from .models import AttnVariantLlamaForCausalLM

DEFAULT_TRAIN_FILES = "data/austen/*.txt"
DEFAULT_EVAL_FILE = "data/austen/austen_persuasion.txt"
FAMILY_MODEL_TYPES = ("llama", "attn_variant_llama")
BASE_VARIANT_FILE = "base_variant.json"  # written next to an adapter: the variant fields of its base
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# `--train` aliases for parameter groups (regexes over parameter names; anything else is used as a regex itself).
PARAMETER_GROUPS = {
    "all": r".",
    "attention": r"\.self_attn\.",
    "qk": r"\.self_attn\.(q_proj|k_proj)\.",
    "qkv": r"\.self_attn\.(q_proj|k_proj|v_proj)\.",
    "norms": r"(layernorm|\.norm)\.weight$",
    "mlp": r"\.mlp\.",
    "embeddings": r"(embed_tokens|lm_head)\.",
    "shortcut": r"\.shortcut\.",
    "remainder": r"stickbreaking_remainder_bias$",
}
# `--train` aliases with `--method lora`: module-name suffixes peft trains fully (`modules_to_save`).
LORA_FULL_MODULES = {
    "norms": ["input_layernorm", "post_attention_layernorm", "norm"],
    "shortcut": ["shortcut"],
    "embeddings": ["embed_tokens", "lm_head"],
}


@dataclass
class TrainConfig:
    """Everything `train` needs; the CLI flags are these fields (underscores as dashes)."""

    model: str
    output_dir: str
    gguf_file: str | None = None
    # variant changes applied on load (None: keep what the checkpoint's config says)
    attention_variant: str | None = None
    use_rope: bool | None = None
    rope_max_wavelength: float | None = None
    stickbreaking_remainder: str | None = None
    stickbreaking_attend_current: bool | None = None
    layer_shortcut: bool | None = None
    shortcut_mode: str | None = None
    # teacher (distillation)
    teacher: str | None = None
    teacher_gguf_file: str | None = None
    kl_weight: float = 1.0
    temperature: float = 1.0
    attention_transfer_steps: int = 0
    # what to train
    method: str = "lora"
    train: list[str] = field(default_factory=list)
    lora_r: int = 16
    lora_alpha: int | None = None
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGET_MODULES))
    # data
    train_files: list[str] = field(default_factory=lambda: [DEFAULT_TRAIN_FILES])
    eval_file: str | None = DEFAULT_EVAL_FILE
    max_length: int = 256
    max_train_chunks: int | None = None
    eval_length: int | None = None
    eval_chunks: int = 16
    curriculum: str | None = None
    # optimisation
    max_steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 5
    lr_scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    seed: int = 0
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    time_budget_minutes: float | None = None
    # evaluation, logging, output
    eval_steps: int | None = None
    eval_batch_size: int = 4
    logging_steps: int = 1
    base_name: str | None = None
    save: bool = True
    plot: bool = True
    shuffle: bool = True
    threads: int | None = None
    disable_tqdm: bool = False
    command: str | None = None  # the command line that ran this (recorded in metrics.json and the adapter's card)


# ----------------------------------------------------------------------------------------------------------- data


def read_texts(patterns: list[str], exclude: str | None = None) -> list[str]:
    """Paths matching `patterns` (globs), sorted, without `exclude`; raises if none match."""
    paths = sorted({p for pattern in patterns for p in (glob.glob(pattern) or ([pattern] if os.path.exists(pattern) else []))})
    if exclude is not None:
        paths = [p for p in paths if os.path.abspath(p) != os.path.abspath(exclude)]
    if not paths:
        raise FileNotFoundError(f"No training text matches {patterns} (held out: {exclude}).")
    return paths


def tokenize_chunks(tokenizer, paths: list[str], length: int) -> list[list[int]]:
    """Non-overlapping `length`-token chunks of each file (the tail shorter than `length` is dropped)."""
    rows = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            ids = tokenizer(f.read()).input_ids
        rows += [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)]
    return rows


def evenly_spaced(rows: list, n: int | None) -> list:
    """`n` rows spread evenly over `rows` (all of them when n is None or >= len)."""
    if n is None or n >= len(rows):
        return rows
    return [rows[i * len(rows) // n] for i in range(n)]


def build_datasets(tokenizer, config: TrainConfig):
    from datasets import Dataset

    paths = read_texts(config.train_files, exclude=config.eval_file)
    rows = tokenize_chunks(tokenizer, paths, config.max_length)
    if config.max_train_chunks is not None:
        rows = evenly_spaced(rows, config.max_train_chunks)
    train = Dataset.from_dict({"input_ids": rows})
    evaluation = None
    if config.eval_file:
        eval_rows = evenly_spaced(tokenize_chunks(tokenizer, [config.eval_file], config.eval_length or config.max_length), config.eval_chunks)
        evaluation = Dataset.from_dict({"input_ids": eval_rows})
    return train, evaluation, paths


def parse_curriculum(spec: str | None, max_length: int) -> list[tuple[int, int]]:
    """`"128:200,256:100"` -> [(128, 200), (256, 300)]: length 128 until step 200, 256 until step 300, then
    `max_length`. Each length must divide `max_length` (a chunk is cut into max_length // length pieces, so every
    step sees the same tokens)."""
    if not spec:
        return []
    schedule, end = [], 0
    for item in spec.split(","):
        length, steps = (int(x) for x in item.split(":"))
        if length <= 0 or steps <= 0 or max_length % length:
            raise ValueError(f"curriculum entry {item!r}: length must divide max_length={max_length}, steps > 0")
        end += steps
        schedule.append((length, end))
    return schedule


# ----------------------------------------------------------------------------------------------------------- models


def _load_causal_lm(path: str, gguf_file: str | None, dtype: torch.dtype, **config_overrides):
    kwargs = dict(dtype=dtype, **config_overrides)
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    model_type = AutoConfig.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {})).model_type
    if model_type in FAMILY_MODEL_TYPES:
        model = AttnVariantLlamaForCausalLM.from_pretrained(path, **kwargs)
    else:  # any other causal LM (plain fine-tuning); remote code only when the user trusts it
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if gguf_file:  # GGUF weights arrive dequantized: drop the quantizer so they train and save like any others
        model.hf_quantizer, model.is_quantized = None, False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model, model_type


def variant_fields(model_config) -> dict:
    """The attention-variant fields of a family config (what distinguishes a conversion from its source)."""
    prefixes = ("attention_variant", "use_rope", "rope_max_wavelength", "stickbreaking_", "layer_shortcut", "shortcut_", "attention_qkv_bias",
                "query_key_norm")
    return {k: v for k, v in sorted(model_config.to_dict().items()) if k.startswith(prefixes)}


def variant_overrides(config: TrainConfig) -> dict:
    names = ("attention_variant", "use_rope", "rope_max_wavelength", "stickbreaking_remainder", "stickbreaking_attend_current",
             "layer_shortcut", "shortcut_mode")
    return {name: getattr(config, name) for name in names if getattr(config, name) is not None}


def load_student(config: TrainConfig):
    """The model to train, and whether it differs from what `config.model` holds on disk (then its base is saved)."""
    overrides = variant_overrides(config)
    model, model_type = _load_causal_lm(config.model, config.gguf_file, DTYPES[config.dtype], **overrides)
    changed = bool(overrides) or config.gguf_file is not None or model_type != "attn_variant_llama"
    return model, changed


def load_teacher(config: TrainConfig):
    model, _ = _load_causal_lm(config.teacher, config.teacher_gguf_file, DTYPES[config.dtype])
    model.eval().requires_grad_(False)
    return model


def select_parameters(model, patterns: list[str]) -> list[str]:
    """Freeze every parameter of `model` except those whose name matches one of `patterns` (group aliases or regexes);
    returns the trained names."""
    regexes = [re.compile(PARAMETER_GROUPS.get(p, p)) for p in (patterns or ["all"])]
    trained = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(any(r.search(name) for r in regexes))
        if parameter.requires_grad:
            trained.append(name)
    if not trained:
        raise ValueError(f"`--train {' '.join(patterns)}` matches no parameter of {type(model).__name__}.")
    return trained


def apply_lora(model, config: TrainConfig):
    from peft import get_peft_model

    modules_to_save = []
    for group in config.train:
        modules_to_save += LORA_FULL_MODULES.get(group, [group])
    kwargs = dict(target_modules=target_regex(config.lora_targets))
    if modules_to_save:
        kwargs["modules_to_save"] = sorted(set(modules_to_save) | ({"shortcut"} if getattr(model.config, "layer_shortcut", False) else set()))
    peft_config = lora_config(model, r=config.lora_r, lora_alpha=config.lora_alpha or 2 * config.lora_r, **kwargs)
    return get_peft_model(model, peft_config)


# ----------------------------------------------------------------------------------------------------------- trainer


def distillation_loss(student_logits, teacher_logits, temperature: float = 1.0):
    """Token-mean KL(teacher || student) of the next-token distributions at temperature `temperature` (scaled by
    temperature**2 so its gradients keep their size), in float32."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def lm_loss(logits, input_ids):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


def cpu_fsdp_requested() -> bool:
    """An `accelerate launch --use_fsdp` run with several processes on a machine without an accelerator device."""
    return (
        os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        and int(os.environ.get("WORLD_SIZE", "1")) > 1
        and not torch.cuda.is_available()
    )


def enable_cpu_fsdp(accelerator) -> None:
    """Make `accelerator` shard with FSDP on CPU (gloo).

    accelerate (1.x) turns an FSDP launch into `DistributedType.FSDP` only on accelerator devices; on CPU the state
    stays `MULTI_CPU` and the model would silently be wrapped in DDP instead. torch's FSDP (1 and 2) runs on CPU with
    gloo (FSDP2, `fully_shard`; FSDP1 rejects a CPU device), so the state is switched to FSDP with a plugin read from
    the launcher's `FSDP_*` variables (auto-wrap policy `TRANSFORMER_BASED_WRAP` without class names wraps the model's
    `_no_split_modules`)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:  # pragma: no cover - accelerate changed
        raise RuntimeError(f"expected a MULTI_CPU accelerate state to switch to FSDP, got {state.distributed_type}")
    plugin = FullyShardedDataParallelPlugin(sync_module_states=False, cpu_ram_efficient_loading=False)
    if plugin.fsdp_version != 2:
        # torch's FSDP1 wrapper resolves the CPU `device_id` to cpu:0 and rejects it ("Inconsistent compute device").
        raise ValueError("FSDP on CPU needs FSDP2: launch with `accelerate launch --use_fsdp --fsdp_version 2 ...`.")
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    # Every `AcceleratorState()` made later copies the process state over its own: switch that one too.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def wrap_present_no_split_modules(plugin, model) -> None:
    """FSDP units = the model's `_no_split_modules` that it actually contains.

    accelerate's transformer auto-wrap takes every class named in `_no_split_modules` and raises for one the model
    lacks; the family lists `AttnVariantLlamaLayerShortcut`, which exists only with `layer_shortcut=True`."""
    if plugin is None or plugin.transformer_cls_names_to_wrap is not None:
        return  # the launcher named the classes itself
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    present = {type(m).__name__ for m in base.modules()}
    names = [name for name in (getattr(base, "_no_split_modules", None) or []) if name in present]
    if names:
        plugin.transformer_cls_names_to_wrap = names


def decoder_attention_layers(model) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """(decoder layer, its `self_attn`) pairs of `model` in order, through any peft/DDP/FSDP wrapping."""
    layers = {}
    for name, module in model.named_modules():
        match = re.search(r"(?:^|\.)layers\.(\d+)$", name)
        if match and hasattr(module, "self_attn"):
            layers[int(match.group(1))] = (module, module.self_attn)
    return [layers[i] for i in sorted(layers)]


class AttentionTransfer:
    """Layer-local distillation of the token attention (LoLCATs' "attention transfer"): every student decoder layer
    gets the teacher's residual-stream input to that layer, and the loss is the relative squared error between the
    student's and the teacher's attention outputs, averaged over layers. The layers learn in parallel from one teacher
    and one student forward; gradients reach only the attention (and its input norm), never earlier layers.

    Implemented with forward hooks, so the student still runs through its (DDP/FSDP) wrapper's forward."""

    def __init__(self, student, teacher):
        self.student_layers, self.teacher_layers = decoder_attention_layers(student), decoder_attention_layers(teacher)
        if not self.student_layers or len(self.student_layers) != len(self.teacher_layers):
            raise ValueError("attention transfer needs teacher and student with the same number of decoder layers")
        self.active = False
        self.inputs, self.targets, self.outputs = {}, {}, {}
        for i, ((t_layer, t_attn), (s_layer, s_attn)) in enumerate(zip(self.teacher_layers, self.student_layers)):
            t_layer.register_forward_pre_hook(self._capture_input(i), with_kwargs=True)
            t_attn.register_forward_hook(self._capture(i, self.targets, detach=True))
            s_layer.register_forward_pre_hook(self._replace_input(i), with_kwargs=True)
            s_attn.register_forward_hook(self._capture(i, self.outputs, detach=False))

    @staticmethod
    def _hidden_states(args, kwargs):
        return args[0] if args else kwargs["hidden_states"]

    def _capture_input(self, i):
        def hook(module, args, kwargs):
            if self.active:
                self.inputs[i] = self._hidden_states(args, kwargs).detach()
        return hook

    def _replace_input(self, i):
        def hook(module, args, kwargs):
            if not self.active:
                return None
            if args:
                return (self.inputs[i], *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": self.inputs[i]}
        return hook

    def _capture(self, i, store, detach):
        def hook(module, args, output):
            if self.active:
                out = output[0] if isinstance(output, tuple) else output
                store[i] = out.detach() if detach else out
        return hook

    @staticmethod
    def _skip(*args, **kwargs):
        return torch.zeros_like(args[0] if args else next(iter(kwargs.values())))

    def loss(self, student, teacher, input_ids):
        self.active = True
        # The student's MLPs feed only the next layer, whose input is replaced by the teacher's: skip them.
        mlps = [layer.mlp for layer, _ in self.student_layers if hasattr(layer, "mlp")]
        for mlp in mlps:
            mlp.forward = self._skip
        try:
            with torch.no_grad():
                teacher(input_ids=input_ids, logits_to_keep=1)
            student(input_ids=input_ids, logits_to_keep=1)
            errors = [
                (self.outputs[i].float() - self.targets[i].float()).pow(2).sum()
                / self.targets[i].float().pow(2).sum().clamp_min(1e-12)
                for i in range(len(self.student_layers))
            ]
            return torch.stack(errors).mean()
        finally:
            for mlp in mlps:
                del mlp.forward  # back to the class's forward
            self.active = False
            for store in (self.inputs, self.targets, self.outputs):  # the hooks hold these very dicts
                store.clear()


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


@torch.no_grad()
def held_out_loss(model, dataset, batch_size: int) -> float:
    """Mean LM loss of `model` over `dataset` (equal-length chunks), single process."""
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, len(dataset), batch_size):
        ids = torch.tensor(dataset[start : start + batch_size]["input_ids"], device=device)
        total += model(input_ids=ids, labels=ids).loss.item() * len(ids)
    return total / len(dataset)


# ----------------------------------------------------------------------------------------------------------- main


def train(config: TrainConfig) -> dict:
    """Run the recipe described by `config`; returns the metrics written to `OUTPUT_DIR/metrics.json`."""
    from transformers import set_seed

    wall_start = time.time()
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.method not in ("lora", "full"):
        raise ValueError(f"`method` must be 'lora' or 'full', got {config.method!r}.")
    set_seed(config.seed)
    curriculum = parse_curriculum(config.curriculum, config.max_length)
    tokenizer_source = dict(gguf_file=config.gguf_file) if config.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(config.model, **tokenizer_source)
    train_dataset, eval_dataset, train_paths = build_datasets(tokenizer, config)

    model, changed = load_student(config)
    teacher = load_teacher(config) if config.teacher else None
    if teacher is not None and teacher.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"teacher vocab {teacher.config.vocab_size} != student vocab {model.config.vocab_size}")

    args = TrainingArguments(
        output_dir=config.output_dir,
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
        eval_strategy="steps" if (eval_dataset is not None and config.eval_steps) else "no",
        eval_steps=config.eval_steps,
        eval_on_start=eval_dataset is not None,
        prediction_loss_only=True,
        save_strategy="no",
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
    is_main = args.process_index == 0

    # Held-out perplexity of the teacher (the target) and where the adapter's base will live.
    teacher_loss = held_out_loss(teacher, eval_dataset, config.eval_batch_size) if (teacher is not None and eval_dataset is not None) else None
    if teacher_loss is not None and is_main:
        print(f"teacher held-out loss {teacher_loss:.4f}, perplexity {math.exp(teacher_loss):.2f}")
    base_record = config.base_name
    if config.method == "lora" and base_record is None:
        if changed:  # the adapter needs the converted base it was trained on: save it once, next to the adapter
            base_record = os.path.abspath(os.path.join(config.output_dir, "base"))
            if is_main and config.save:
                from .convert import save_atomically

                save_atomically(model, base_record, tokenizer, overwrite=True)
        else:
            base_record = os.path.abspath(config.model) if os.path.isdir(config.model) else config.model

    if config.method == "lora":
        model = apply_lora(model, config)
        model.peft_config["default"].base_model_name_or_path = base_record
        trained = [n for n, p in model.named_parameters() if p.requires_grad]
    else:
        trained = select_parameters(model, config.train)
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    if is_main:
        print(f"{config.method}: training {n_trained:,} of {n_total:,} parameters ({len(trained)} tensors); "
              f"{len(train_dataset)} train chunks of {config.max_length} tokens from {len(train_paths)} files, "
              f"{len(eval_dataset) if eval_dataset is not None else 0} held-out chunks")

    trainer = UptrainingTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset.with_format("torch"),
        eval_dataset=eval_dataset.with_format("torch") if eval_dataset is not None else None,
        teacher=teacher,
        kl_weight=config.kl_weight,
        temperature=config.temperature,
        curriculum=curriculum,
        attention_transfer_steps=config.attention_transfer_steps,
        callbacks=[TimeBudgetCallback(config.time_budget_minutes)],
    )
    train_start = time.time()
    result = trainer.train()
    train_seconds = time.time() - train_start
    history = trainer.state.log_history
    evals = [h for h in history if "eval_loss" in h]
    if eval_dataset is not None and (not evals or evals[-1]["step"] != trainer.state.global_step):
        trainer.evaluate()
        evals = [h for h in trainer.state.log_history if "eval_loss" in h]

    metrics = dict(
        distributed_type=str(trainer.accelerator.distributed_type.value),
        sharded_modules=sharded_module_classes(trainer.model_wrapped),
        steps=trainer.state.global_step,
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
    if config.save:
        save_trained(trainer, config.output_dir)
        if is_main and config.method == "full":
            tokenizer.save_pretrained(config.output_dir)
        if is_main and config.method == "lora":
            # What the base must be, for a user who rebuilds it (e.g. converts the same source) instead of loading it.
            variant = variant_fields(model.get_base_model().config)
            with open(os.path.join(config.output_dir, BASE_VARIANT_FILE), "w") as f:
                json.dump(variant, f, indent=1)
            # peft's save writes a template card full of placeholders: replace it with what this adapter is.
            with open(os.path.join(config.output_dir, "README.md"), "w") as f:
                f.write(adapter_card(metrics, variant))
    if is_main:
        os.makedirs(config.output_dir, exist_ok=True)
        with open(os.path.join(config.output_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1, default=str)
        if config.plot:
            plot_curves(metrics, os.path.join(config.output_dir, "curves.png"))
        summary = {k: metrics[k] for k in ("steps", "train_seconds", "teacher_eval_perplexity",
                                           "initial_eval_perplexity", "final_eval_perplexity")}
        print("summary:", json.dumps(summary))
    return metrics


def adapter_card(metrics: dict, variant: dict) -> str:
    """A Hub card (YAML metadata that `huggingface_hub.ModelCard` reads) for a LoRA adapter trained by `train`."""
    from huggingface_hub import ModelCard, ModelCardData

    base = metrics["base_model_name_or_path"]
    data = ModelCardData(
        library_name="peft", pipeline_tag="text-generation", base_model=None if not base or os.path.isabs(base) else base,
        tags=["lora", "hf-attn-variants", "attn_variant_llama", f"attention-variant-{variant.get('attention_variant')}"],
    )
    fmt = lambda x: "–" if x is None else f"{x:.2f}"  # noqa: E731
    teacher, final = metrics.get("teacher_eval_perplexity"), metrics.get("final_eval_perplexity")
    ratio = f" ({final / teacher:.2f}x the teacher's)" if teacher and final else ""
    changed = {k: v for k, v in variant.items() if k in ("attention_variant", "use_rope", "rope_max_wavelength", "stickbreaking_remainder",
                                                          "stickbreaking_attend_current", "layer_shortcut", "shortcut_mode")}
    config = metrics["config"]
    lines = [
        "# LoRA adapter for an AttnVariantLlama model",
        "",
        f"Trained with `hf-attn-variants-train` ({config['method']}, {metrics['steps']} steps, "
        f"{metrics['trained_parameters']:,} trained parameters, {metrics['train_seconds'] / 60:.1f} min)"
        + (f" from the teacher `{config['teacher']}`" if config.get("teacher") else "") + ".",
        "",
        f"Base: `{base}`, an `attn_variant_llama` model with {json.dumps(changed)} (all variant fields in "
        f"`{BASE_VARIANT_FILE}`).",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base}", trust_remote_code=True)',
        'model = PeftModel.from_pretrained(base, "path/to/this/adapter").merge_and_unload()',
        "```",
        "",
        f"Held-out perplexity (`{os.path.basename(config['eval_file'] or '') or 'none'}`, "
        f"{config['eval_chunks']} chunks of {config['eval_length'] or config['max_length']} tokens): "
        f"before {fmt(metrics.get('initial_eval_perplexity'))}, after {fmt(final)}{ratio}; "
        f"teacher {fmt(teacher)}.",
    ]
    if config.get("command"):
        lines += ["", "Command:", "", "```bash", config["command"], "```"]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n").content


def save_trained(trainer, output_dir: str) -> None:
    """`trainer.save_model`, except under FSDP2 on CPU, where the full state dict accelerate gathers (with
    `cpu_offload=True`, a no-op on CPU) points at freed all-gather buffers: gather it here without offloading."""
    state = trainer.accelerator.state
    if not (trainer.is_fsdp_enabled and getattr(state, "is_fsdp2", False) and not torch.cuda.is_available()):
        trainer.save_model(output_dir)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state_dict = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    if trainer.args.should_save:
        state_dict = {name: tensor.detach().clone() for name, tensor in state_dict.items()}
        model = trainer.accelerator.unwrap_model(trainer.model)
        sharded_class = type(model)
        # fully_shard swaps the class for FSDP<Name>(FSDPModule, Name), defined in torch: save_pretrained would copy
        # torch's FSDP files as "remote code" and record that name. Save under the model's own class.
        if sharded_class.__name__.startswith("FSDP"):
            model.__class__ = sharded_class.__bases__[-1]
        try:
            model.save_pretrained(output_dir, state_dict=state_dict)
        finally:
            model.__class__ = sharded_class
    trainer.accelerator.wait_for_everyone()


def sharded_module_classes(model) -> list[str]:
    """Class names of the modules FSDP made units of (FSDP1 wrappers or FSDP2 `fully_shard`ed modules)."""
    names = set()
    for module in model.modules():
        cls = type(module).__name__
        if cls == "FullyShardedDataParallel":
            names.add(type(module._fsdp_wrapped_module).__name__)
        elif cls.startswith("FSDP") and len(cls) > 4:  # FSDP2 renames the class of each unit to FSDP<name>
            names.add(cls[4:])
    return sorted(names)


def plot_curves(metrics: dict, path: str) -> str | None:
    """Training losses and held-out perplexity against the step (with the teacher's and 1.5x it) as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install hf-attn-variants[plot]): no curves.png")
        return None
    history = metrics["log_history"]
    train_logs = [h for h in history if "loss" in h and "eval_loss" not in h]
    evals = [h for h in history if "eval_loss" in h]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("loss", "training loss"), ("attention_transfer_loss", "attention transfer (rel. MSE)"),
                       ("kl_loss", "KL(teacher || student)"), ("lm_loss", "LM loss")):
        points = [(h["step"], h[key]) for h in train_logs if key in h]
        if points:
            left.plot(*zip(*points), label=label)
    left.set_xlabel("step")
    left.set_ylabel("loss")
    left.set_yscale("log")
    left.legend()
    left.grid(alpha=0.3)
    if evals:
        right.plot([h["step"] for h in evals], [h["eval_perplexity"] for h in evals], "o-", label="student")
    if metrics.get("teacher_eval_perplexity"):
        ppl = metrics["teacher_eval_perplexity"]
        right.axhline(ppl, color="k", ls="--", label=f"teacher {ppl:.1f}")
        right.axhline(1.5 * ppl, color="gray", ls=":", label=f"1.5 x teacher {1.5 * ppl:.1f}")
    right.set_xlabel("step")
    right.set_ylabel("held-out perplexity")
    right.set_yscale("log")
    right.legend()
    right.grid(alpha=0.3)
    fig.suptitle(os.path.basename(os.path.abspath(metrics["config"]["output_dir"])))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "y"):
        return True
    if value.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes/no, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig(model="", output_dir="")
    p = argparse.ArgumentParser(
        prog="hf-attn-variants-train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", help="student: family/Llama folder or Hub id (or the folder holding --gguf-file)")
    p.add_argument("output_dir")
    p.add_argument("--gguf-file", default=None)
    g = p.add_argument_group("variant changes on load (default: keep the checkpoint's)")
    g.add_argument("--attention-variant", choices=["softmax", "stickbreaking"], default=None)
    g.add_argument("--use-rope", type=_bool, default=None, metavar="yes|no")
    g.add_argument("--rope-max-wavelength", type=float, default=None, metavar="POSITIONS",
                   help="leave rotary frequencies of a longer wavelength unrotated (p-RoPE), e.g. the source's window")
    g.add_argument("--stickbreaking-remainder", choices=["none", "value", "bias"], default=None)
    g.add_argument("--stickbreaking-attend-current", type=_bool, default=None, metavar="yes|no")
    g.add_argument("--layer-shortcut", type=_bool, default=None, metavar="yes|no")
    g.add_argument("--shortcut-mode", choices=["depth", "depth_context"], default=None)
    g = p.add_argument_group("distillation")
    g.add_argument("--teacher", default=None, help="teacher folder/Hub id (or the folder holding --teacher-gguf-file)")
    g.add_argument("--teacher-gguf-file", default=None)
    g.add_argument("--kl-weight", type=float, default=defaults.kl_weight, help="loss = w * KL + (1 - w) * LM")
    g.add_argument("--temperature", type=float, default=defaults.temperature)
    g.add_argument("--attention-transfer-steps", type=int, default=0,
                   help="first N steps: layer-local attention transfer (match each layer's attention output)")
    g = p.add_argument_group("what to train")
    g.add_argument("--method", choices=["lora", "full"], default=defaults.method)
    g.add_argument("--train", nargs="*", default=[], metavar="GROUP",
                   help=f"full: parameter groups {sorted(PARAMETER_GROUPS)} or regexes (default all); "
                        f"lora: modules trained fully besides the adapters ({sorted(LORA_FULL_MODULES)} or names)")
    g.add_argument("--lora-r", type=int, default=defaults.lora_r)
    g.add_argument("--lora-alpha", type=int, default=None, help="default 2 * r")
    g.add_argument("--lora-targets", nargs="+", default=defaults.lora_targets)
    g = p.add_argument_group("data")
    g.add_argument("--train-files", nargs="+", default=defaults.train_files, help="globs; the eval file is excluded")
    g.add_argument("--eval-file", default=defaults.eval_file, help="held-out text ('' for none)")
    g.add_argument("--max-length", type=int, default=defaults.max_length)
    g.add_argument("--max-train-chunks", type=int, default=None)
    g.add_argument("--eval-length", type=int, default=None, help="default --max-length")
    g.add_argument("--eval-chunks", type=int, default=defaults.eval_chunks)
    g.add_argument("--curriculum", default=None, metavar="LEN:STEPS,...",
                   help="shorter sequences first, e.g. 64:100,128:100 (then --max-length)")
    g.add_argument("--no-shuffle", dest="shuffle", action="store_false")
    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=int, default=defaults.max_steps)
    g.add_argument("--batch-size", type=int, default=defaults.batch_size, help="per process")
    g.add_argument("--grad-accum", type=int, default=defaults.grad_accum)
    g.add_argument("--learning-rate", "--lr", type=float, default=defaults.learning_rate)
    g.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    g.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    g.add_argument("--lr-scheduler", default=defaults.lr_scheduler)
    g.add_argument("--max-grad-norm", type=float, default=defaults.max_grad_norm)
    g.add_argument("--seed", type=int, default=defaults.seed)
    g.add_argument("--dtype", choices=sorted(DTYPES), default=defaults.dtype)
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--time-budget-minutes", type=float, default=None, help="stop training after this long")
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval-steps", type=int, default=None, help="held-out perplexity every N steps (and at 0, end)")
    g.add_argument("--eval-batch-size", type=int, default=defaults.eval_batch_size)
    g.add_argument("--logging-steps", type=int, default=defaults.logging_steps)
    g.add_argument("--base-name", default=None, help="base model path/Hub id recorded in the adapter")
    g.add_argument("--no-save", dest="save", action="store_false")
    g.add_argument("--no-plot", dest="plot", action="store_false")
    g.add_argument("--disable-tqdm", action="store_true")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    values = vars(args)
    if values.get("eval_file") == "":
        values["eval_file"] = None
    values["command"] = "hf-attn-variants-train " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    return train(TrainConfig(**values))


if __name__ == "__main__":
    main()
