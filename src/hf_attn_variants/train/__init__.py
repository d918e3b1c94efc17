"""One training entry point: plain fine-tuning and uptraining (distillation from a teacher), LoRA or full.

    hf-attn-variants train MODEL OUTPUT_DIR [--teacher TEACHER] [--method lora|full] [--max-steps N] ...

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
  `base_variant.json` and `base_source.json` say how to rebuild that base (`hf_attn_variants.load_adapter`).
* Checked first (`checks`: one line, exit 2, nothing written), written last: into `.OUTPUT_DIR.partial`, renamed when
  complete; `--save-steps N` checkpoints there, Ctrl-C/SIGTERM saves one and stops, `--resume` continues (`run`).

Modules: config (TrainConfig), checks, data, loading, losses, trainer (UptrainingTrainer, callbacks), distributed,
run (`train`), card, cli (`main`, `cli_main`). Every name is importable from `hf_attn_variants.train`.
"""


from .card import adapter_card, plot_curves
from .cli import build_parser, cli_main, main
from .config import (
    BASE_VARIANT_FILE,
    DEFAULT_EVAL_FILE,
    DEFAULT_TRAIN_FILES,
    DTYPES,
    FAMILY_MODEL_TYPES,
    LORA_FULL_MODULES,
    PARAMETER_GROUPS,
    TrainConfig,
)
from .data import build_datasets, evenly_spaced, parse_curriculum, read_texts, tokenize_chunks
from .distributed import (
    cpu_fsdp_requested,
    enable_cpu_fsdp,
    save_trained,
    sharded_module_classes,
    wrap_present_no_split_modules,
)
from .loading import apply_lora, load_student, load_teacher, select_parameters, variant_fields, variant_overrides
from .losses import AttentionTransfer, decoder_attention_layers, distillation_loss, held_out_loss, lm_loss
from .run import train
from .trainer import TimeBudgetCallback, UptrainingTrainer
