"""The public surface: exports, registrations, shipped configs."""

import glob
import os

import pytest
import torch
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM

import hf_attn_variants
from hf_attn_variants.models.attn_variant_llama import stickbreaking_torch

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def test_exports():
    assert set(hf_attn_variants.__all__) == {
        "AttnVariantLlamaConfig",
        "AttnVariantLlamaForCausalLM",
        "AttnVariantLlamaForSequenceClassification",
        "AttnVariantLlamaForTokenClassification",
        "AttnVariantLlamaModel",
        "AttnVariantLlamaPreTrainedModel",
        "__version__",
        "load_adapter",
    }
    for name in hf_attn_variants.__all__:
        assert getattr(hf_attn_variants, name) is not None


def test_stickbreaking_is_registered():
    assert AttentionInterface().get_interface("stickbreaking", None) is stickbreaking_torch.stickbreaking_attention_forward


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIGS, "tiny-*.json"))), ids=os.path.basename)
def test_shipped_tiny_configs_build_and_run(path):
    config = AutoConfig.from_pretrained(path)
    assert isinstance(config, hf_attn_variants.AttnVariantLlamaConfig)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        logits = model(torch.randint(3, 99, (1, 6))).logits
    assert logits.shape == (1, 6, config.vocab_size) and torch.isfinite(logits).all()


def test_shipped_smollm2_configs_describe_smollm2():
    for path in glob.glob(os.path.join(CONFIGS, "smollm2-135m-*.json")):
        config = AutoConfig.from_pretrained(path)
        assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)


@pytest.mark.parametrize("source_type, warns", [("llama", False), ("qwen2", False), ("gpt2", True)])
def test_model_type_warning_only_for_unsupported_sources(tmp_path, source_type, warns):
    """Loading a supported Llama-style source into the family (convert on load) is the supported path: transformers'
    "model of type `llama` ... not supported and can yield errors" warning stays quiet for it, not for others."""
    import json
    import logging

    from transformers.utils import logging as transformers_logging

    from hf_attn_variants.testing import tiny_config_kwargs

    config = {**tiny_config_kwargs(), "model_type": source_type}
    (tmp_path / "config.json").write_text(json.dumps(config))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers.configuration_utils")
    logger.addHandler(handler)
    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_warning()
    try:
        hf_attn_variants.AttnVariantLlamaConfig.from_pretrained(tmp_path)
    finally:
        logger.removeHandler(handler)
        transformers_logging.set_verbosity(level)
    mismatch = [r for r in records if "to instantiate a model of type" in r.getMessage()]
    assert bool(mismatch) == warns, [r.getMessage() for r in records]
