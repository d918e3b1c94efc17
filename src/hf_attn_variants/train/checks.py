"""Every input of a training run checked before anything is written or loaded at length (`check_config`).

A refusal is a `TrainError` (a `CommandError`): one line naming the value and what is allowed; the command prints it
and exits with status 2, leaving nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

from ..cli_common import CommandError, OutputExistsError, check_output_path
from ..lora import LORA_TARGET_MODULES, target_regex
from .config import (
    CHECKPOINTS,
    DTYPES,
    FAMILY_MODEL_TYPES,
    LORA_FULL_MODULES,
    PARAMETER_GROUPS,
    RESUME_MAY_CHANGE,
    RUN_CONFIG_FILE,
    TrainConfig,
)
from .data import parse_curriculum


class TrainError(CommandError):
    """A refused training input (one line; exit status 2)."""


@dataclasses.dataclass
class RunPlan:
    """Where a checked run reads and writes."""

    output: str  # the final folder (absolute)
    staging: str  # `.NAME.partial` next to it: the run writes here, checkpoints included; renamed when complete
    train_paths: list
    curriculum: list
    resume_from: str | None = None  # the checkpoint folder a --resume continues from
    complete: bool = False  # --resume of a run whose output is already published

    @property
    def checkpoints(self) -> str:
        return os.path.join(self.staging, CHECKPOINTS)


def staging_path(output: str) -> str:
    parent, name = os.path.split(os.path.abspath(output))
    return os.path.join(parent, f".{name}.partial")


def last_checkpoint(folder: str) -> str | None:
    """The highest `checkpoint-N` in `folder` that Trainer finished writing (its trainer_state.json is written last)."""
    if not os.path.isdir(folder):
        return None
    steps = []
    for name in os.listdir(folder):
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match and os.path.isfile(os.path.join(folder, name, "trainer_state.json")):
            steps.append(int(match.group(1)))
    return os.path.join(folder, f"checkpoint-{max(steps)}") if steps else None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_number(config, name, kind, minimum=None, maximum=None, optional=False, strict=False):
    value = getattr(config, name)
    if value is None and optional:
        return
    allowed = ("an integer" if kind is int else "a number") + (
        f" > {minimum}" if strict else f" >= {minimum}" if minimum is not None else "")
    allowed += f" and <= {maximum}" if maximum is not None else ""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is not int or float(value).is_integer())
    if ok and value != value:  # NaN
        ok = False
    if ok and minimum is not None:
        ok = value > minimum if strict else value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        raise TrainError(f"{_flag(name)} {value}: expected {allowed}")


def check_numbers(config: TrainConfig) -> None:
    for name, minimum in (("max_steps", 1), ("batch_size", 1), ("grad_accum", 1), ("max_length", 2), ("lora_r", 1),
                          ("eval_chunks", 1), ("eval_batch_size", 1), ("logging_steps", 1),
                          ("attention_transfer_steps", 0), ("warmup_steps", 0)):
        _check_number(config, name, int, minimum)
    for name, minimum in (("lora_alpha", 1), ("max_train_chunks", 1), ("eval_length", 2), ("eval_steps", 1),
                          ("save_steps", 1), ("threads", 1)):
        _check_number(config, name, int, minimum, optional=True)
    _check_number(config, "seed", int)
    _check_number(config, "learning_rate", float, 0, strict=True)
    _check_number(config, "temperature", float, 0, strict=True)
    _check_number(config, "kl_weight", float, 0, 1)
    _check_number(config, "weight_decay", float, 0)
    _check_number(config, "max_grad_norm", float, 0)
    _check_number(config, "time_budget_minutes", float, 0, optional=True, strict=True)
    _check_number(config, "rope_max_wavelength", float, 0, optional=True, strict=True)


def check_choices(config: TrainConfig) -> None:
    from transformers.trainer_utils import SchedulerType

    choices = {
        "method": ("lora", "full"), "dtype": tuple(sorted(DTYPES)), "attention_variant": (None, "softmax", "stickbreaking"),
        "stickbreaking_remainder": (None, "none", "value", "bias"), "shortcut_mode": (None, "depth", "depth_context"),
        "lr_scheduler": tuple(s.value for s in SchedulerType),
    }
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            shown = ", ".join(a for a in allowed if a is not None)
            raise TrainError(f"{_flag(name)} {getattr(config, name)!r}: expected one of {shown}")
    if config.resume and config.overwrite:
        raise TrainError("--resume continues the run in OUTPUT_DIR and --overwrite starts it again: pass one of them")
    if config.attention_transfer_steps and not config.teacher:
        raise TrainError(f"--attention-transfer-steps {config.attention_transfer_steps} needs a --teacher")
    if config.attention_transfer_steps > config.max_steps:
        raise TrainError(f"--attention-transfer-steps {config.attention_transfer_steps}: expected at most "
                         f"--max-steps ({config.max_steps})")
    if config.method == "full" and config.lora_alpha is not None:
        raise TrainError("--lora-alpha applies to --method lora only")
    if not config.lora_targets:
        raise TrainError(f"--lora-targets: name at least one of {' '.join(LORA_TARGET_MODULES)}")
    unknown = [t for t in config.lora_targets if t not in LORA_TARGET_MODULES]
    if unknown:
        raise TrainError(f"--lora-targets {' '.join(unknown)}: expected names among {' '.join(LORA_TARGET_MODULES)}")
    if config.method == "full":
        for pattern in config.train:
            try:
                re.compile(PARAMETER_GROUPS.get(pattern, pattern))
            except re.error as error:
                raise TrainError(f"--train {pattern!r} is neither a parameter group ({', '.join(PARAMETER_GROUPS)}) "
                                 f"nor a valid regex: {error}") from None


def _looks_like_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name)) and ".." not in name and not name.endswith(".")


def check_model_source(flag: str, path: str, gguf_file: str | None, gguf_flag: str) -> str | None:
    """The local folder of a model argument (None for a Hub id); refuses what cannot be a model."""
    if not path or not str(path).strip():
        raise TrainError(f"{flag} is empty: expected a model folder or Hub id")
    if os.path.isdir(path):
        if gguf_file:
            if not os.path.isfile(os.path.join(path, gguf_file)):
                raise TrainError(f"{gguf_flag} {gguf_file!r}: no such file in {path!r}")
        elif not os.path.isfile(os.path.join(path, "config.json")):
            ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
            hint = f" (it holds {ggufs[0]}: pass {gguf_flag} {ggufs[0]})" if ggufs else ""
            raise TrainError(f"{flag} {path!r}: the folder has no config.json{hint}")
        return os.path.abspath(path)
    if os.path.exists(path):
        raise TrainError(f"{flag} {path!r} is a file: expected a model folder (a .gguf goes as FOLDER {gguf_flag} NAME)")
    if os.path.isabs(path) or path.startswith(("./", "../", "~")) or not _looks_like_hub_id(path):
        raise TrainError(f"{flag} {path!r}: no such folder (and not a Hub model id)")
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and gguf_file is None:
        if not isinstance(try_to_load_from_cache(path, "config.json"), str):
            raise TrainError(f"{flag} {path!r}: no such folder, and offline (HF_HUB_OFFLINE=1) the Hub model is not "
                             "in the cache")
    return None


def check_text_file(flag: str, path: str) -> None:
    """A readable, non-empty UTF-8 text file."""
    if not os.path.isfile(path):
        raise TrainError(f"{flag} {path!r}: " + ("a folder, expected a text file" if os.path.isdir(path) else "no such file"))
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise TrainError(f"{flag} {path!r} is unreadable: {error.strerror or error}") from None
    if b"\0" in data:
        raise TrainError(f"{flag} {path!r} is a binary file: expected UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise TrainError(f"{flag} {path!r} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    if not text.strip():
        raise TrainError(f"{flag} {path!r} is empty: expected text to train on")


def check_texts(config: TrainConfig) -> list[str]:
    from .data import read_texts

    if config.eval_file is not None:
        check_text_file("--eval-file", config.eval_file)
    try:
        paths = read_texts(config.train_files, exclude=config.eval_file)
    except FileNotFoundError:
        held = f" (the held-out --eval-file {config.eval_file!r} is excluded)" if config.eval_file else ""
        raise TrainError(f"--train-files {' '.join(config.train_files)}: no file matches{held}") from None
    for path in paths:
        check_text_file("--train-files", path)
    return paths


def model_skeleton(config: TrainConfig, path: str, gguf_file: str | None, overrides: dict, cache: dict | None = None):
    """The model `config.model` loads as, with empty weights (names and structure only), and its model type. The
    config is read once per (path, gguf_file) in `cache` (a GGUF's metadata takes seconds to read)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models import AttnVariantLlamaConfig, AttnVariantLlamaForCausalLM

    cache = {} if cache is None else cache
    try:
        if (path, gguf_file) not in cache:
            cache[(path, gguf_file)] = AutoConfig.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
        source_config = cache[(path, gguf_file)]
        model_type = source_config.model_type
        with init_empty_weights():
            if model_type in FAMILY_MODEL_TYPES:
                values = {k: v for k, v in source_config.to_dict().items() if k != "model_type"}
                return AttnVariantLlamaForCausalLM(AttnVariantLlamaConfig.from_dict(values, **overrides)), model_type
            if overrides:
                raise TrainError(f"{_flag(next(iter(overrides)))}: variant changes need a Llama-style model (model type "
                                 f"{' or '.join(FAMILY_MODEL_TYPES)}), {path!r} is {model_type!r}; convert it first")
            return AutoModelForCausalLM.from_config(source_config), model_type
    except (TrainError, KeyboardInterrupt):
        raise
    except Exception as error:  # noqa: BLE001 - an unreadable config, an unknown model type, ...
        from ..cli_common import first_line

        raise TrainError(f"cannot read the model config of {path!r}: {first_line(error)}") from None


def check_trained_names(config: TrainConfig, model) -> None:
    """`--train` and `--lora-targets` must name something the model has."""
    if config.method == "lora":
        targets = re.compile(target_regex(config.lora_targets))
        module_names = [name for name, _ in model.named_modules()]
        missing = [t for t in config.lora_targets if not any(targets.fullmatch(n) and n.endswith("." + t) for n in module_names)]
        if missing:
            raise TrainError(f"--lora-targets {' '.join(missing)}: {type(model).__name__} has no such decoder projection")
        for group in config.train:
            for name in LORA_FULL_MODULES.get(group, [group]):
                if not any(n == name or n.endswith("." + name) for n in module_names):
                    raise TrainError(f"--train {group!r} with --method lora: no module of {type(model).__name__} is "
                                     f"named so; expected a group ({', '.join(LORA_FULL_MODULES)}) or a module name "
                                     "such as input_layernorm")
    else:
        names = [name for name, _ in model.named_parameters()]
        for pattern in config.train:
            regex = re.compile(PARAMETER_GROUPS.get(pattern, pattern))
            if not any(regex.search(n) for n in names):
                raise TrainError(f"--train {pattern!r}: matches no parameter of {type(model).__name__}; expected a group "
                                 f"({', '.join(PARAMETER_GROUPS)}) or a regex over parameter names")


def comparable(config: TrainConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in RESUME_MAY_CHANGE}


def check_output(config: TrainConfig, protect) -> tuple[str, str, str | None, bool]:
    """(output, staging, checkpoint to resume from, output already complete)."""
    hint = "pass --overwrite to replace it" + ("" if config.resume else " (or --resume to return the finished run)")
    output = check_output_path(config.output_dir, config.overwrite, protect, error=TrainError,
                               allow_existing=config.resume, exists_hint=hint)
    staging = staging_path(output)
    if os.path.lexists(staging) and not os.path.isdir(staging):
        raise TrainError(f"{staging!r} (the run's staging folder) exists and is not a folder; remove it")
    checkpoint = last_checkpoint(os.path.join(staging, CHECKPOINTS))
    if config.resume and os.path.isdir(output) and not os.path.isdir(staging):
        return output, staging, None, True
    if os.path.isdir(staging) and not (config.resume or config.overwrite):
        where = f"at {os.path.basename(checkpoint)}" if checkpoint else "without a checkpoint"
        raise OutputExistsError(f"an interrupted run of {config.output_dir!r} is in {staging!r} ({where}); pass --resume "
                                "to continue it or --overwrite to start again")
    if config.resume and checkpoint:
        recorded_path = os.path.join(staging, RUN_CONFIG_FILE)
        if os.path.isfile(recorded_path):
            with open(recorded_path, encoding="utf-8") as f:
                recorded = json.load(f)
            current = json.loads(json.dumps(comparable(config)))
            changed = [k for k in sorted(set(recorded) | set(current)) if recorded.get(k) != current.get(k)]
            if changed:
                shown = ", ".join(f"{_flag(k)} {current.get(k)!r} (was {recorded.get(k)!r})" for k in changed[:3])
                raise TrainError(f"--resume must repeat the interrupted run's arguments: {shown}; or pass --overwrite "
                                 "to start again")
    return output, staging, checkpoint if config.resume else None, False


def check_config(config: TrainConfig) -> RunPlan:
    """Check everything that can be checked without loading weights; returns where the run reads and writes."""
    check_numbers(config)
    check_choices(config)
    try:
        curriculum = parse_curriculum(config.curriculum, config.max_length)
    except ValueError as error:
        raise TrainError(f"--curriculum {config.curriculum!r}: {error}; expected LEN:STEPS,... with each LEN "
                         f"dividing --max-length ({config.max_length})") from None
    student_folder = check_model_source("MODEL", config.model, config.gguf_file, "--gguf-file")
    teacher_folder = None
    if config.teacher:
        teacher_folder = check_model_source("--teacher", config.teacher, config.teacher_gguf_file, "--teacher-gguf-file")
    elif config.teacher_gguf_file:
        raise TrainError("--teacher-gguf-file needs --teacher (the folder holding it)")
    output, staging, checkpoint, complete = check_output(config, [student_folder, teacher_folder])
    plan = RunPlan(output=output, staging=staging, train_paths=[], curriculum=curriculum, resume_from=checkpoint,
                   complete=complete)
    if complete:
        return plan
    plan.train_paths = check_texts(config)
    from .loading import variant_overrides

    configs = {}
    student, _ = model_skeleton(config, config.model, config.gguf_file, variant_overrides(config), configs)
    check_trained_names(config, student)
    if config.teacher:
        teacher, _ = model_skeleton(config, config.teacher, config.teacher_gguf_file, {}, configs)
        s_vocab, t_vocab = student.config.vocab_size, teacher.config.vocab_size
        if s_vocab != t_vocab:
            raise TrainError(f"--teacher {config.teacher!r} has a vocabulary of {t_vocab} tokens, the student "
                             f"{s_vocab}: distillation needs the same tokenizer")
        if config.attention_transfer_steps:
            s_layers, t_layers = student.config.num_hidden_layers, teacher.config.num_hidden_layers
            if s_layers != t_layers:
                raise TrainError(f"--attention-transfer-steps needs as many decoder layers in the teacher ({t_layers}) "
                                 f"as in the student ({s_layers})")
    return plan
