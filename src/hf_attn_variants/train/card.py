"""What a finished run writes besides the weights: the adapter's model card and the curves."""

from __future__ import annotations

import json
import os

from .config import BASE_SOURCE_FILE, BASE_VARIANT_FILE


def base_source(config, variant: dict, base_name: str | None) -> dict | None:
    """How to rebuild the adapter's base when it is a conversion made on load (None when the base is MODEL itself):
    the source in a machine-independent form, the variant fields and the converter command."""
    from ..lora import build_command, describe_source
    from .loading import variant_overrides

    if not (variant_overrides(config) or config.gguf_file):
        return None
    source = describe_source(config.model, config.gguf_file)
    output = os.path.basename(os.path.abspath(config.output_dir))
    name = base_name if base_name and not os.path.isabs(base_name) and os.sep not in base_name.strip("./") else f"{output}-base"
    name = name.removeprefix("./")
    return {**source, "name": name, "variant": variant, "build": build_command(source, variant, name)}


def adapter_card(metrics: dict, variant: dict, source: dict | None = None) -> str:
    """A Hub card (YAML metadata that `huggingface_hub.ModelCard` reads) for a LoRA adapter trained by `train`."""
    from huggingface_hub import ModelCard, ModelCardData

    base = metrics["base_model_name_or_path"]
    data = ModelCardData(
        library_name="peft", pipeline_tag="text-generation", base_model=None if not base or os.path.isabs(base) or base.startswith(".") else base,
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
        f"Trained with `hf-attn-variants train` ({config['method']}, {metrics['steps']} steps, "
        f"{metrics['trained_parameters']:,} trained parameters, {metrics['train_seconds'] / 60:.1f} min)"
        + (f" from the teacher `{config['teacher']}`" if config.get("teacher") else "") + ".",
        "",
        f"Base: `{base}`, an `attn_variant_llama` model with {json.dumps(changed)} (all variant fields in "
        f"`{BASE_VARIANT_FILE}`).",
        "",
        "```python",
        "import hf_attn_variants",
        "",
        "# finds the base, or builds it from the source recorded in base_source.json; base=... to pass your own",
        'model = hf_attn_variants.load_adapter("path/to/this/adapter", merge=True)',
        "```",
        "",
    ]
    if source is not None and source.get("build"):
        lines += [
            f"The base is a conversion of {source['source']}"
            + (f" (`{source['gguf_file']}`)" if source.get("gguf_file") else "")
            + f" (recorded in `{BASE_SOURCE_FILE}`), which `load_adapter` rebuilds when the base is not found. "
            "To build it as a folder yourself (for `base=`, or for `AutoPeftModelForCausalLM` once "
            "`adapter_config.json` names that folder):",
            "",
            "```bash",
            source["build"],
            "```",
            "",
        ]
    lines += [
        f"Held-out perplexity (`{os.path.basename(config['eval_file'] or '') or 'none'}`, "
        f"{config['eval_chunks']} chunks of {config['eval_length'] or config['max_length']} tokens): "
        f"before {fmt(metrics.get('initial_eval_perplexity'))}, after {fmt(final)}{ratio}; "
        f"teacher {fmt(teacher)}.",
    ]
    if config.get("command"):
        lines += ["", "Command:", "", "```bash", config["command"], "```"]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n").content


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

