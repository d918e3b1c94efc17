"""Conversion of Llama checkpoints: weights consumed exactly, function preserved, atomic output, bad input."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from hf_attn_variants import AttnVariantLlamaForCausalLM
from hf_attn_variants import convert
from hf_attn_variants.testing import tiny_config_kwargs


@pytest.fixture()
def llama_dir(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**tiny_config_kwargs(tie_word_embeddings=True))).eval()
    model.save_pretrained(tmp_path / "llama")
    return tmp_path / "llama", model


@pytest.mark.parametrize(
    "options, preserves_function",
    [
        (dict(), True),
        (dict(layer_shortcut=True, shortcut_mode="depth"), True),
        (dict(layer_shortcut=True, shortcut_mode="depth_context"), True),
        (dict(attention_variant="stickbreaking", stickbreaking_remainder="bias"), False),
    ],
    ids=["softmax", "shortcut-depth", "shortcut-depth-context", "stickbreaking"],
)
def test_convert_checkpoint(tmp_path, llama_dir, options, preserves_function):
    source_dir, llama = llama_dir
    out = tmp_path / "converted"
    convert.main([str(source_dir), str(out), *_cli_flags(options)])
    assert {"config.json", "model.safetensors", "README.md", "modeling_attn_variant_llama.py"} <= set(os.listdir(out))
    saved = json.loads((out / "config.json").read_text())
    for key, value in options.items():
        assert saved[key] == value
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(model, AttnVariantLlamaForCausalLM)
    ids = torch.randint(3, 99, (2, 9))
    with torch.no_grad():
        same = torch.equal(model(ids).logits, llama(ids).logits)
    assert same == preserves_function
    assert "AttnVariantLlama converted from" in (out / "README.md").read_text()


def _cli_flags(options):
    flags = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    return flags


def test_failed_conversion_leaves_nothing(tmp_path, llama_dir, monkeypatch):
    source_dir, _ = llama_dir

    def broken_card(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(convert, "render_model_card", broken_card)
    with pytest.raises(RuntimeError, match="disk full"):
        convert.convert_llama_checkpoint(str(source_dir), str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["llama"]

    def broken_save(*args, **kwargs):
        raise OSError("write failed")

    monkeypatch.undo()
    monkeypatch.setattr(AttnVariantLlamaForCausalLM, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="write failed"):
        convert.convert_llama_checkpoint(str(source_dir), str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["llama"]  # no output and no .partial-* staging folder


def test_existing_output_is_not_overwritten_silently(tmp_path, llama_dir):
    source_dir, _ = llama_dir
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        convert.convert_llama_checkpoint(str(source_dir), str(tmp_path / "out"))
    convert.convert_llama_checkpoint(str(source_dir), str(tmp_path / "out"), overwrite=True)
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_rejects_non_llama_and_pickled_checkpoints(tmp_path, llama_dir):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=99))
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="'gpt2' model; expected a Llama checkpoint"):
        convert.convert_llama_checkpoint(str(tmp_path / "gpt2"), str(tmp_path / "out"))
    _, llama = llama_dir
    llama.config.save_pretrained(tmp_path / "pickled")  # a legacy checkpoint: config + pickled weights only
    torch.save(llama.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(OSError):
        convert.convert_llama_checkpoint(str(tmp_path / "pickled"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
