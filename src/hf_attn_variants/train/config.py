"""What a training run is: `TrainConfig` (the CLI flags are its fields) and the names its values refer to."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..lora import LORA_TARGET_MODULES

DEFAULT_TRAIN_FILES = "data/austen/*.txt"
DEFAULT_EVAL_FILE = "data/austen/austen_persuasion.txt"
FAMILY_MODEL_TYPES = ("llama", "attn_variant_llama")
BASE_VARIANT_FILE = "base_variant.json"  # written next to an adapter: the variant fields of its base
BASE_SOURCE_FILE = "base_source.json"  # and, when its base is a conversion, how to rebuild it (source + variant)
RUN_CONFIG_FILE = "train_config.json"  # in the staging folder: what a --resume must match
CHECKPOINTS = "checkpoints"  # Trainer's checkpoint-N folders, inside the staging folder
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
    # checkpoints and the output folder
    save_steps: int | None = None  # a checkpoint every N steps (besides the one a SIGTERM/Ctrl-C saves)
    resume: bool = False  # continue from the last checkpoint of an interrupted run (or return a finished one)
    overwrite: bool = False  # replace an existing output folder (once the new one is complete)


# Fields a --resume may change: they do not change what is computed.
RESUME_MAY_CHANGE = ("threads", "disable_tqdm", "time_budget_minutes", "command", "resume", "overwrite", "plot",
                     "save_steps", "eval_batch_size")

