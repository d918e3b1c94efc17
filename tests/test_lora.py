"""LoRA fine-tuning of family models with peft: targets, training, adapter save/reload, merge."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from hf_attn_variants import AttnVariantLlamaConfig, AttnVariantLlamaForCausalLM
from hf_attn_variants.lora import lora_config
from hf_attn_variants.testing import tiny_config_kwargs


@pytest.mark.parametrize(
    "variant",
    [dict(attention_variant="stickbreaking"), dict(attention_variant="stickbreaking", layer_shortcut=True)],
    ids=["stickbreaking", "stickbreaking+shortcut"],
)
def test_lora_trains_saves_and_reloads(tmp_path, variant):
    torch.manual_seed(0)
    base = AttnVariantLlamaForCausalLM(AttnVariantLlamaConfig(**tiny_config_kwargs(**variant)))
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, lora_config(base, r=4))

    wrapped = {name for name, _ in model.named_modules() if name.endswith("lora_A")}
    assert len(wrapped) == 2 * 7, sorted(wrapped)  # 7 projections x 2 layers, nothing in the shortcut
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in name or "shortcut" in name for name in trainable)
    assert any("shortcut" in name for name in trainable) == bool(variant.get("layer_shortcut"))

    ids = torch.randint(3, 99, (4, 16), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses

    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        merged = reloaded.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    assert isinstance(merged, AttnVariantLlamaForCausalLM)


@pytest.mark.parametrize("layer_shortcut", [False, True], ids=["plain", "shortcut"])
def test_peft_default_targets_are_registered(layer_shortcut):
    """`import hf_attn_variants` registers the family with peft: LoraConfig(task_type="CAUSAL_LM") needs no targets."""
    from peft import LoraConfig
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    from hf_attn_variants.lora import LORA_TARGET_MODULES, LORA_TARGET_REGEX

    assert TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["attn_variant_llama"] == LORA_TARGET_REGEX
    torch.manual_seed(0)
    base = AttnVariantLlamaForCausalLM(AttnVariantLlamaConfig(**tiny_config_kwargs(layer_shortcut=layer_shortcut)))
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=4))
    wrapped = sorted(name for name, _ in model.named_modules() if name.endswith("lora_A"))
    assert len(wrapped) == 2 * 7 and not any("shortcut" in name for name in wrapped), wrapped
    assert {name.split(".")[-2] for name in wrapped} == set(LORA_TARGET_MODULES)


_REMOTE_CODE_LORA_CHILD = r"""
import importlib.abc, sys

class _HidePackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hf_attn_variants" or name.startswith("hf_attn_variants."):
            raise ImportError(name + " is hidden")

sys.meta_path.insert(0, _HidePackage())
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
try:
    get_peft_model(model, LoraConfig(task_type="CAUSAL_LM"))
except ValueError as error:
    print("ERROR:", error)
names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", target_modules=names))
print("WRAPPED:", sum(name.endswith("lora_A") for name, _ in peft_model.named_modules()))
"""


def test_remote_code_only_needs_explicit_targets(tmp_path):
    """Without the package, peft knows no default for `attn_variant_llama`: its own error, fixed by naming the
    seven projections (what the README says to pass)."""
    import os
    import subprocess
    import sys

    from hf_attn_variants.lora import LORA_TARGET_MODULES

    torch.manual_seed(0)
    AttnVariantLlamaForCausalLM(AttnVariantLlamaConfig(**tiny_config_kwargs())).save_pretrained(tmp_path / "model")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    env.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, "-c", _REMOTE_CODE_LORA_CHILD, str(tmp_path / "model")], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ERROR: Please specify `target_modules`" in result.stdout, result.stdout  # peft's own message
    assert "WRAPPED: 14" in result.stdout
    assert LORA_TARGET_MODULES == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
