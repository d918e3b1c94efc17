"""A saved model reloads through `trust_remote_code=True` in a process where hf_attn_variants cannot be imported."""

import json
import os

import pytest
import torch

from hf_attn_variants import AttnVariantLlamaConfig, AttnVariantLlamaForCausalLM
from hf_attn_variants.testing import remote_code_logits, tiny_config_kwargs


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0}),
        dict(attention_variant="stickbreaking", stickbreaking_remainder="bias"),
    ],
    ids=["softmax", "tied-rope-scaling", "stickbreaking"],
)
def test_remote_code_round_trip(tmp_path, overrides, monkeypatch):
    torch.manual_seed(0)
    model = AttnVariantLlamaForCausalLM(AttnVariantLlamaConfig(**tiny_config_kwargs(**overrides))).eval()
    if hasattr(model.model.layers[0].self_attn, "stickbreaking_remainder_bias"):
        with torch.no_grad():  # make the remainder bias matter
            for layer in model.model.layers:
                layer.self_attn.stickbreaking_remainder_bias.normal_()
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)

    saved = json.loads((model_dir / "config.json").read_text())
    assert saved["model_type"] == "attn_variant_llama"
    assert saved["auto_map"] == {
        "AutoConfig": "configuration_attn_variant_llama.AttnVariantLlamaConfig",
        "AutoModel": "modeling_attn_variant_llama.AttnVariantLlamaModel",
        "AutoModelForCausalLM": "modeling_attn_variant_llama.AttnVariantLlamaForCausalLM",
        "AutoModelForSequenceClassification": "modeling_attn_variant_llama.AttnVariantLlamaForSequenceClassification",
        "AutoModelForTokenClassification": "modeling_attn_variant_llama.AttnVariantLlamaForTokenClassification",
    }
    copied = {f for f in os.listdir(model_dir) if f.endswith(".py")}
    assert copied == {
        "configuration_attn_variant_llama.py",
        "modeling_attn_variant_llama.py",
        "stickbreaking_torch.py",
        "layer_shortcut.py",
        "transformers_compat.py",
    }

    inputs = {"input_ids": torch.randint(3, 99, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    inputs["attention_mask"][1, :3] = 0  # left padding exercises the mask path of the copied code
    with torch.no_grad():
        with_kernels = model(**inputs).logits
        # The child cannot import the package, so it runs pure PyTorch: the same path here must match it bit for bit.
        monkeypatch.setenv("HF_ATTN_VARIANTS_SB_BACKEND", "torch")
        expected = model(**inputs).logits
    child = remote_code_logits(str(model_dir), inputs, str(tmp_path))
    assert child["class"] == "AttnVariantLlamaForCausalLM"
    assert torch.equal(child["logits"], expected)
    torch.testing.assert_close(with_kernels, expected, rtol=1e-5, atol=1e-5)  # the package's C++ CPU kernels
