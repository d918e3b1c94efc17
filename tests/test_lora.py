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
