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
