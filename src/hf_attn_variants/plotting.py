"""Plots of what the layerwise attention shortcut attends to (needs the `plot` extra: `pip install "./hf-attn-variants[plot]"` from a clone)."""

import numpy as np
import torch


def _matplotlib_figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "Plotting needs matplotlib: install the `plot` extra, `pip install './hf-attn-variants[plot]'` from a clone."
        ) from error
    return Figure


def _token_labels(tokenizer, token_ids: list[int]) -> list[str]:
    """Readable x tick labels: the tokenizer's tokens when it has them, else decoded ids, else the ids."""
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        return [str(token) for token in tokenizer.convert_ids_to_tokens(token_ids)]
    if hasattr(tokenizer, "decode"):
        return [tokenizer.decode([token_id]) for token_id in token_ids]
    return [str(token_id) for token_id in token_ids]


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` from a HF tokenizer (returns a mapping with `input_ids`) or a callable returning ids."""
    encoded = tokenizer(text)
    token_ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
    token_ids = torch.as_tensor(token_ids).reshape(-1)
    return token_ids.tolist()


@torch.no_grad()
def plot_shortcut_attention(model, tokenizer, text: str, path, head: int | None = None) -> np.ndarray:
    r"""
    Heatmap of the layerwise shortcut's attention over its source layers for every token of `text`, saved as an image.

    Args:
        model (`AttnVariantLlamaForCausalLM` or `AttnVariantLlamaModel`):
            A model with `config.layer_shortcut=True`.
        tokenizer:
            A HF tokenizer, or any callable mapping the text to token ids (a list or a mapping with `input_ids`).
            Tick labels come from its `convert_ids_to_tokens` or `decode` when it has them, else the ids.
        text (`str`):
            The input; one column per token.
        path (`str` or `os.PathLike`):
            Where to write the image; the format follows the suffix (PNG for `.png`).
        head (`int`, *optional*):
            Plot this shortcut head; `None` averages over heads.

    Returns:
        `np.ndarray` of shape (|S|, T): the plotted attention, rows in `config.shortcut_sources` order. In `"depth"`
        mode a column is token t's softmax over the source layers; in `"depth_context"` mode it is the probability mass
        each source layer receives, summed over the positions <= t.
    """
    config = model.config
    if not getattr(config, "layer_shortcut", False):
        raise ValueError("`plot_shortcut_attention` needs a model with `config.layer_shortcut=True`.")
    Figure = _matplotlib_figure_class()

    token_ids = _encode(tokenizer, text)
    input_ids = torch.tensor([token_ids], device=model.device)
    shortcut_attention = model(input_ids=input_ids, output_attentions=True).shortcut_attentions[0].float()  # (H, T, |S|)
    if head is None:
        attention = shortcut_attention.mean(dim=0)
    elif not 0 <= head < shortcut_attention.shape[0]:
        raise ValueError(f"`head`={head} is out of range for a shortcut with {shortcut_attention.shape[0]} heads.")
    else:
        attention = shortcut_attention[head]
    attention = attention.transpose(0, 1).cpu().numpy()  # (|S|, T)

    sources = config.shortcut_sources
    figure = Figure(figsize=(max(4.0, 0.4 * len(token_ids) + 2.0), max(2.5, 0.35 * len(sources) + 1.5)))
    axes = figure.add_subplot()
    image = axes.imshow(attention, aspect="auto", cmap="viridis", vmin=0.0, vmax=max(float(attention.max()), 1e-12))
    axes.set_xticks(range(len(token_ids)), _token_labels(tokenizer, token_ids), rotation=90, fontsize=8)
    axes.set_yticks(range(len(sources)), [f"layer {layer}" for layer in sources], fontsize=8)
    axes.set_xlabel("token")
    axes.set_ylabel("source layer")
    head_name = "mean over heads" if head is None else f"head {head}"
    axes.set_title(f"layer shortcut ({config.shortcut_mode}), {head_name}", fontsize=9)
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    figure.savefig(path)
    return attention


__all__ = ["plot_shortcut_attention"]
