"""Conversion of Llama / Mistral / Qwen2 / Qwen3 checkpoints (safetensors and GGUF) into AttnVariantLlama.

Tiny random source models are made here with transformers' own classes; `--verify` and the logits are compared with the
source model as transformers loads it. Refusals, the model card, publishing, hygiene (atomic output, signals,
permissions, one-line errors) are checked on the same tiny folders.
"""

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from hf_attn_variants import AttnVariantLlamaForCausalLM, convert
from hf_attn_variants.testing import tiny_config_kwargs

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.filterwarnings("ignore::hf_attn_variants.convert.ConversionWarning")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUSTEN = os.path.join(ROOT, "data", "austen", "austen_prideprejudice.txt")
VOCAB = 320  # byte-level BPE: 256 bytes + 3 specials + merges
SOURCES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}
VARIANTS = {  # CLI flags, function-preserving
    "softmax": ([], True),
    "stickbreaking": (["--attention-variant", "stickbreaking"], False),
    "shortcut-depth": (["--layer-shortcut", "--shortcut-mode", "depth"], True),
    "shortcut-depth_context": (["--layer-shortcut", "--shortcut-mode", "depth_context"], True),
    "stickbreaking+shortcut": (["--attention-variant", "stickbreaking", "--layer-shortcut"], False),
}
TOKENIZER_FILES = set(convert.TOKENIZER_FILES)


# ---------------------------------------------------------------------------------------------------------------------
# Tiny sources
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    with open(AUSTEN, encoding="utf-8") as f:
        text = f.read()[:20000]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_model(kind, tie=True, **overrides):
    config_class, model_class = SOURCES[kind]
    kwargs = tiny_config_kwargs(vocab_size=VOCAB, tie_word_embeddings=tie)
    if kind == "mistral":
        kwargs["sliding_window"] = kwargs["max_position_embeddings"]  # a window >= the context is full attention
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = model_class(config_class(**kwargs)).eval()
    with torch.no_grad():  # biases and norms away from 0 / 1, so dropping one changes the logits
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0.0, 0.5)
            elif "norm" in name:
                parameter.normal_(1.0, 0.3)
    return model


def make_source(tmp_path, kind, tokenizer=None, tie=True, dtype=torch.float32, shard=None, name=None, **overrides):
    folder = tmp_path / (name or f"src-{kind}")
    model = make_model(kind, tie=tie, **overrides).to(dtype)
    model.save_pretrained(folder, max_shard_size=shard or "50GB")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n# a tiny source\n")
    return folder


def reference_logits(folder, ids, gguf_file=None, dtype=torch.float32):
    kwargs = dict(gguf_file=gguf_file) if gguf_file else dict(use_safetensors=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).eval()
    with torch.no_grad():
        return model(ids).logits


def output_logits(folder, ids):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert isinstance(model, AttnVariantLlamaForCausalLM)
    with torch.no_grad():
        return model(ids).logits


def run_cli(capsys, *argv):
    capsys.readouterr()  # drop what the test printed before (e.g. save bars of the source)
    code = convert.main([str(a) for a in argv] + ["--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err):
    return [line for line in err.splitlines() if line.startswith("error:")]


def _permute(weights, heads, kv_heads):  # llama.cpp's q/k layout (transformers' GGUF loader undoes it)
    heads = kv_heads if kv_heads is not None and heads != kv_heads else heads
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape
    )


def write_gguf(path, model, arch, tokenizer=None, float16=False, extra_tensor=None, drop=None, license="mit"):
    """A GGUF file as llama.cpp would write it: gguf-py tensor names, permuted llama q/k, a gpt2 tokenizer."""
    config = model.config
    name_map = gguf.get_tensor_name_map({"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
                                         "qwen3": gguf.MODEL_ARCH.QWEN3}.get(arch, gguf.MODEL_ARCH.LLAMA),
                                        config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    if license:
        writer.add_license(license)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if arch == "llama":
        writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    if tokenizer is not None:
        backend = json.loads(tokenizer.backend_tokenizer.to_str())
        vocab = backend["model"]["vocab"]
        tokens = sorted(vocab, key=vocab.get)
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(tokens)
        writer.add_token_types([1] * len(tokens))
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]])
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_pad_token_id(0)
    tied = config.tie_word_embeddings
    for name, tensor in model.state_dict().items():
        if (tied and name == "lm_head.weight") or name == drop:
            continue
        base, suffix = name.rsplit(".", 1)
        array = tensor.detach().float().numpy()
        if arch == "llama" and base.endswith("self_attn.q_proj"):
            array = _permute(array, config.num_attention_heads, config.num_attention_heads)
        if arch == "llama" and base.endswith("self_attn.k_proj"):
            array = _permute(array, config.num_attention_heads, config.num_key_value_heads)
        if float16 and array.ndim >= 2:
            array = array.astype(np.float16)
        writer.add_tensor(f"{name_map.get_name(base)}.{suffix}", array)
    if extra_tensor:
        writer.add_tensor(extra_tensor, np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def folder_text(folder):
    texts = []
    for name in os.listdir(folder):
        if name.endswith((".json", ".md", ".py", ".jinja", ".txt")):
            texts.append((folder / name).read_text(encoding="utf-8"))
    return "\n".join(texts)


# ---------------------------------------------------------------------------------------------------------------------
# Every source type x every variant, verified
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kind", list(SOURCES))
def test_convert_every_source_to_every_variant(tmp_path, capsys, tokenizer, kind, variant):
    flags, preserving = VARIANTS[variant]
    sharded = kind in ("mistral", "qwen2")  # sharded safetensors in and out
    shard = "20KB" if sharded else None
    source = make_source(tmp_path, kind, tokenizer, tie=kind != "llama", shard=shard)
    assert (source / "model.safetensors.index.json").exists() == sharded
    out = tmp_path / "converted"
    shard_flags = ["--max-shard-size", shard] if shard else []
    code, stdout, err = run_cli(capsys, source, out, "--verify", *flags, *shard_flags)
    assert code == 0, err
    assert "verify: max |Δlogit| = " in stdout

    files = set(os.listdir(out))
    assert {"config.json", "README.md", "modeling_attn_variant_llama.py", "tokenizer.json"} <= files
    assert ("model.safetensors.index.json" in files) == sharded and ("model.safetensors" in files) != sharded
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "attn_variant_llama"
    assert config["attention_variant"] == ("stickbreaking" if "stickbreaking" in variant else "softmax")
    assert config["layer_shortcut"] == ("shortcut" in variant)
    expected_bias = (True, False) if kind == "qwen2" else (None, False)
    assert (config["attention_qkv_bias"], config["attention_bias"]) == expected_bias
    assert config["query_key_norm"] == (kind == "qwen3")
    assert not any(key in config for key in ("sliding_window", "use_sliding_window", "layer_types"))

    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    converted, reference = output_logits(out, ids), reference_logits(source, ids)
    assert torch.equal(converted, reference) == preserving
    if preserving:
        assert "max |Δlogit| = 0," in stdout and "passed" in stdout
    else:
        assert "reported only" in stdout

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == f"src-{kind}" and card.data.license == "mit"
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert ("stick-breaking-attention" in card.data.tags) == ("stickbreaking" in variant)
    assert ("layer-shortcut" in card.data.tags) == ("shortcut" in variant)
    assert "perplexity" in card.text and "max \\|Δlogit\\|" in card.text
    assert str(tmp_path) not in folder_text(out)  # no path of this machine in the published files


def test_dtype_auto_keeps_bfloat16_and_dtype_flag_casts(tmp_path, capsys, tokenizer):
    source = make_source(tmp_path, "qwen3", tokenizer, dtype=torch.bfloat16, shard="20KB")
    code, _, err = run_cli(capsys, source, tmp_path / "auto", "--max-shard-size", "30KB", "--verify")
    assert code == 0, err
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["dtype"] == "bfloat16"
    index = json.loads((tmp_path / "auto" / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        with safe_open(str(tmp_path / "auto" / shard), framework="pt") as handle:
            assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"BF16"}
    ids = torch.randint(3, VOCAB, (1, 9))
    assert torch.equal(output_logits(tmp_path / "auto", ids), reference_logits(source, ids, dtype=torch.bfloat16))

    code, _, err = run_cli(capsys, source, tmp_path / "fp32", "--dtype", "float32")
    assert code == 0, err
    with safe_open(str(tmp_path / "fp32" / "model.safetensors"), framework="pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"F32"}


def test_dry_run_prints_the_files_and_writes_nothing(tmp_path, capsys, tokenizer):
    source = make_source(tmp_path, "llama", tokenizer, shard="20KB")
    code, stdout, err = run_cli(capsys, source, tmp_path / "out", "--dry-run", "--layer-shortcut",
                                "--max-shard-size", "20KB", "--verify", "--push-to-hub", "me/tiny")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == ["src-llama"]
    assert stdout.startswith("dry run: nothing written")
    listed = {line.strip() for line in stdout.splitlines() if line.startswith("  ") and "tokenizer" not in line}
    listed = {name.split(" (")[0] for name in listed}
    code, _, err = run_cli(capsys, source, tmp_path / "out", "--layer-shortcut", "--max-shard-size", "20KB")
    assert code == 0, err
    assert listed == set(os.listdir(tmp_path / "out")) - TOKENIZER_FILES
    assert "would upload" not in stdout and "push:    to me/tiny" in stdout


# ---------------------------------------------------------------------------------------------------------------------
# GGUF sources
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch, variant, tie, float16",
    [("llama", "softmax", False, False), ("llama", "stickbreaking", False, False),
     ("qwen2", "shortcut-depth_context", True, False), ("qwen2", "softmax", True, True)],
    ids=["llama-softmax", "llama-stickbreaking", "qwen2-shortcut", "qwen2-f16"],
)
def test_convert_gguf(tmp_path, capsys, tokenizer, arch, variant, tie, float16):
    model = make_model(arch, tie=tie)
    folder = tmp_path / "gguf"
    folder.mkdir()
    path = write_gguf(folder / f"tiny-{arch}.gguf", model, arch, tokenizer=tokenizer, float16=float16)
    flags, preserving = VARIANTS[variant]
    out = tmp_path / "converted"
    code, stdout, err = run_cli(capsys, path, out, "--verify", *flags)  # the .gguf path itself is a source
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == ("float16" if float16 else "float32")  # quantized/F32 -> float32, F16 kept
    assert config["tie_word_embeddings"] == tie and config["attention_qkv_bias"] == (True if arch == "qwen2" else None)
    assert "quantization_config" not in config

    ids = torch.randint(3, VOCAB, (1, 10))
    reference = reference_logits(folder, ids, gguf_file=path.name, dtype=torch.float16 if float16 else torch.float32)
    assert torch.equal(output_logits(out, ids), reference) == preserving

    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert not {"local_files_only", "is_local", "name_or_path"} & set(tokenizer_config)
    assert tokenizer_config["model_max_length"] == model.config.max_position_embeddings
    text = "It is a truth universally acknowledged"
    assert AutoTokenizer.from_pretrained(out, trust_remote_code=True)(text).input_ids == tokenizer(text).input_ids
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == f"gguf/tiny-{arch}.gguf" and card.data.license == "mit"


def test_gguf_refusals(tmp_path, capsys):
    model = make_model("llama", tie=False)
    (tmp_path / "g").mkdir()
    write_gguf(tmp_path / "g" / "extra.gguf", model, "llama", extra_tensor="blk.0.attn_extra.weight")
    write_gguf(tmp_path / "g" / "missing.gguf", model, "llama", drop="model.layers.1.mlp.up_proj.weight")
    write_gguf(tmp_path / "g" / "rope.gguf", model, "llama", extra_tensor="rope_freqs.weight")
    write_gguf(tmp_path / "g" / "phi3.gguf", model, "phi3")
    for name, message in [
        ("extra.gguf", "1 extra (blk.0.attn_extra.weight)"),
        ("missing.gguf", "1 missing (model.layers.1.mlp.up_proj.weight)"),
        ("rope.gguf", "rope_freqs holds Llama-3.1-style RoPE scaling"),
        ("phi3.gguf", "GGUF of architecture 'phi3'; supported GGUF architectures: llama, qwen2, qwen3"),
    ]:
        code, _, err = run_cli(capsys, tmp_path / "g", tmp_path / "out", "--gguf-file", name)
        assert code == 2 and len(error_lines(err)) == 1 and message in err, (name, err)
        assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Refusals of safetensors sources (one line, exit 2, nothing written)
# ---------------------------------------------------------------------------------------------------------------------


def _drop_tensor(folder, name):
    path = folder / "model.safetensors"
    state = load_file(str(path))
    del state[name]
    save_file(state, str(path), metadata={"format": "pt"})


def _add_tensor(folder, name):
    path = folder / "model.safetensors"
    state = load_file(str(path))
    state[name] = torch.zeros(3)
    save_file(state, str(path), metadata={"format": "pt"})


def test_refusals(tmp_path, capsys, tokenizer):
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=99)).save_pretrained(gpt2)
    missing = make_source(tmp_path, "llama", name="missing")
    _drop_tensor(missing, "model.layers.1.mlp.up_proj.weight")
    extra = make_source(tmp_path, "llama", name="extra")
    _add_tensor(extra, "model.layers.0.self_attn.extra.weight")
    untied = make_source(tmp_path, "llama", tie=False, name="untied")
    _drop_tensor(untied, "lm_head.weight")
    reshaped = make_source(tmp_path, "qwen2", name="reshaped")
    config = json.loads((reshaped / "config.json").read_text())
    (reshaped / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    sharded = make_source(tmp_path, "llama", shard="20KB", name="sharded")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    os.remove(sharded / sorted(set(index["weight_map"].values()))[-1])
    pickled = tmp_path / "pickled"
    model = make_model("llama")
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    quantized = make_source(tmp_path, "llama", name="quantized")
    config = json.loads((quantized / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "fp8"}}))
    mistral = make_source(tmp_path, "mistral", sliding_window=64)  # < max_position_embeddings=128
    qwen2 = make_source(tmp_path, "qwen2", use_sliding_window=True, sliding_window=64, max_window_layers=0)
    qwen3 = make_source(tmp_path, "qwen3", use_sliding_window=True, sliding_window=64)
    cases = [
        (gpt2, [], "holds a 'gpt2' model; supported source types: llama, mistral, qwen2, qwen3"),
        (missing, [], "1 missing (model.layers.1.mlp.up_proj.weight)"),
        (extra, [], "1 extra (model.layers.0.self_attn.extra.weight)"),
        (untied, [], "1 missing (lm_head.weight)"),
        (reshaped, [], "with another shape (model.layers.0.mlp.down_proj.weight: source (32, 64), target (32, 48)"),
        (sharded, [], "listed in model.safetensors.index.json is missing"),
        (pickled, [], "only pickled weights (pytorch_model.bin)"),
        (quantized, [], "quantized checkpoint (quantization_config: fp8)"),
        (mistral, [], "Mistral model with sliding_window=64 < max_position_embeddings=128"),
        (qwen2, [], "use_sliding_window=true and sliding_window=64 < max_position_embeddings=128"),
        (qwen3, [], "use_sliding_window=true and sliding_window=64"),
        (missing, ["--attention-variant", "nope"], "argument --attention-variant: invalid choice"),
        (tmp_path / "nowhere", [], "does not exist"),
    ]
    for source, flags, message in cases:
        code, stdout, err = run_cli(capsys, source, tmp_path / "out", *flags)
        assert code == 2, (source, err)
        assert err.strip().count("\n") == 0 and message in err, (source, err)
        assert not (tmp_path / "out").exists()
    # a window >= the context, or none, converts
    for overrides in (dict(sliding_window=None), dict(sliding_window=128)):
        folder = make_source(tmp_path, "mistral", name=f"mistral-{overrides['sliding_window']}", **overrides)
        assert run_cli(capsys, folder, tmp_path / "ok", "--dry-run")[0] == 0


def test_debug_prints_the_traceback(tmp_path, capsys):
    code, _, err = run_cli(capsys, tmp_path / "nowhere", tmp_path / "out", "--debug")
    assert code == 2 and "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("error:")


def test_api_raises_conversion_errors(tmp_path):
    source = make_source(tmp_path, "llama")
    with pytest.raises(convert.ConversionError, match="unknown variant option"):
        convert.convert_checkpoint(source, tmp_path / "out", attention_varient="stickbreaking")
    with pytest.raises(convert.ConversionError, match="shortcut_mode"):
        convert.convert_checkpoint(source, tmp_path / "out", layer_shortcut=True, shortcut_mode="sideways")
    assert sorted(os.listdir(tmp_path)) == ["src-llama"]


def test_in_memory_convert_model():
    for kind in SOURCES:
        source = make_model(kind)
        model = convert.convert_model(source, layer_shortcut=True)
        ids = torch.randint(3, VOCAB, (1, 7))
        with torch.no_grad():
            assert torch.equal(model(ids).logits, source(ids).logits), kind


# ---------------------------------------------------------------------------------------------------------------------
# Output hygiene: atomic folder, overwrite, paths, permissions, tokenizer warnings, verification failure
# ---------------------------------------------------------------------------------------------------------------------


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    source = make_source(tmp_path, "llama")

    def broken_card(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(convert, "render_model_card", broken_card)
    with pytest.raises(RuntimeError, match="disk full"):
        convert.convert_checkpoint(source, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["src-llama"]

    def broken_save(*args, **kwargs):
        raise OSError("write failed")

    monkeypatch.undo()
    monkeypatch.setattr(AttnVariantLlamaForCausalLM, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="write failed"):
        convert.convert_checkpoint(source, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["src-llama"]  # no output and no .partial-* staging folder


def test_save_atomically_keeps_its_signature(tmp_path, tokenizer):
    model = convert.convert_model(make_model("llama"))
    card = convert.render_model_card(model, str(tmp_path / "src-llama"))
    out = convert.save_atomically(model, str(tmp_path / "out"), tokenizer, card, overwrite=True)
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(os.listdir(out))
    assert ModelCard.load(os.path.join(out, "README.md")).data.base_model == "src-llama"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_verification_failure_fails_the_command_and_writes_nothing(tmp_path, capsys, monkeypatch):
    source = make_source(tmp_path, "qwen2")
    load = convert.load_converted_model

    def tampered(*args, **kwargs):
        loaded = load(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.bias.add_(1e-2)
        return loaded

    monkeypatch.setattr(convert, "load_converted_model", tampered)
    code, _, err = run_cli(capsys, source, tmp_path / "out", "--layer-shortcut", "--verify")
    assert code == 2 and "verification failed: max |Δlogit| =" in err and "FAILED" in err
    assert sorted(os.listdir(tmp_path)) == ["src-qwen2"]


def test_existing_output_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    source = make_source(tmp_path, "llama")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")

    def no_load(*args, **kwargs):
        raise AssertionError("the source must not be inspected or loaded when the output exists")

    monkeypatch.setattr(convert, "inspect_source", no_load)
    code, _, err = run_cli(capsys, source, tmp_path / "out")
    assert code == 2 and "already exists; pass --overwrite" in err
    monkeypatch.undo()
    with pytest.raises(FileExistsError):
        convert.convert_checkpoint(source, tmp_path / "out")
    code, _, err = run_cli(capsys, source, tmp_path / "out", "--overwrite")
    assert code == 0, err
    assert (tmp_path / "out" / "config.json").exists() and not (tmp_path / "out" / "keep.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["out", "src-llama"]  # no .replaced-* or .partial-* left


def test_dangerous_output_paths_are_refused(tmp_path, capsys, monkeypatch):
    source = make_source(tmp_path, "llama")
    monkeypatch.chdir(source)
    before = sorted(os.listdir(tmp_path)), sorted(os.listdir(source))
    for output, message in [("", "the output path is empty"), (".", "it is the current folder"),
                            ("..", "it is an ancestor of the current folder"),
                            (str(source), "it is the current folder")]:
        code, _, err = run_cli(capsys, source, output, "--overwrite")
        assert code == 2 and message in err, (output, err)
    monkeypatch.chdir(ROOT)
    code, _, err = run_cli(capsys, source, tmp_path, "--overwrite")
    assert code == 2 and "it is an ancestor of the source src-llama, which --overwrite would delete" in err
    assert (sorted(os.listdir(tmp_path)), sorted(os.listdir(source))) == before


def test_output_folder_gets_normal_permissions(tmp_path, capsys):
    source = make_source(tmp_path, "llama")
    old = os.umask(0o022)
    try:
        code, _, err = run_cli(capsys, source, tmp_path / "out")
    finally:
        os.umask(old)
    assert code == 0, err
    assert stat.S_IMODE(os.stat(tmp_path / "out").st_mode) == 0o755
    modes = {name: stat.S_IMODE(os.stat(tmp_path / "out" / name).st_mode) for name in os.listdir(tmp_path / "out")}
    assert set(modes.values()) == {0o644}, modes  # safetensors writes its files 0600


def test_missing_or_unreadable_tokenizer_is_a_warning(tmp_path, capsys, tokenizer):
    bare = make_source(tmp_path, "llama", name="bare")
    with pytest.warns(convert.ConversionWarning, match="bare has no tokenizer"):
        convert.convert_checkpoint(bare, tmp_path / "out-bare")
    assert not TOKENIZER_FILES & set(os.listdir(tmp_path / "out-bare"))

    broken = make_source(tmp_path, "llama", tokenizer, name="broken")
    (broken / "tokenizer.json").write_text("{not json")
    code, stdout, err = run_cli(capsys, broken, tmp_path / "out-broken", "--verify")
    assert code == 0, err
    warning = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "could not be read" in warning[0] and "skipped tokenizer.json" in warning[0]
    assert "seeded random token ids (no tokenizer)" in stdout  # verify still compares logits


def test_verify_text_file(tmp_path, capsys, tokenizer):
    source = make_source(tmp_path, "qwen3", tokenizer)
    text = tmp_path / "emma.txt"
    with open(os.path.join(ROOT, "data", "austen", "austen_emma.txt"), encoding="utf-8") as f:
        text.write_text(f.read()[:3000])
    code, stdout, err = run_cli(capsys, source, tmp_path / "out", "--verify-text", text)
    assert code == 0, err
    assert "tokens of emma.txt" in stdout and "emma.txt" in (tmp_path / "out" / "README.md").read_text()
    code, _, err = run_cli(capsys, source, tmp_path / "out2", "--verify-text", tmp_path / "absent.txt")
    assert code == 2 and "--verify-text" in err and len(error_lines(err)) == 1


def test_shipped_verification_text_is_the_austen_excerpt():
    with open(AUSTEN, encoding="utf-8") as f:
        assert convert.AUSTEN_EXCERPT in f.read()


_SLOW_SAVE = textwrap.dedent(
    """
    import os, sys, time
    from hf_attn_variants import AttnVariantLlamaForCausalLM, convert

    save = AttnVariantLlamaForCausalLM.save_pretrained

    def slow_save(self, folder, *args, **kwargs):
        save(self, folder, *args, **kwargs)
        open(os.environ["SAVING_MARKER"], "w").close()
        time.sleep(120)

    AttnVariantLlamaForCausalLM.save_pretrained = slow_save
    sys.exit(convert.main(sys.argv[1:]))
    """
)


def test_sigterm_during_save_leaves_nothing(tmp_path):
    source = make_source(tmp_path / "work", "llama")
    marker = tmp_path / "saving"
    env = dict(os.environ, SAVING_MARKER=str(marker), HF_HUB_OFFLINE="1")
    child = subprocess.Popen(
        [sys.executable, "-c", _SLOW_SAVE, str(source), str(tmp_path / "work" / "out"), "--no-progress"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.time() + 180
        while not marker.exists():
            assert child.poll() is None, child.communicate()
            assert time.time() < deadline, "the child never reached the save"
            time.sleep(0.2)
        partial = [name for name in os.listdir(tmp_path / "work") if name.startswith(".partial-")]
        assert len(partial) == 1 and "config.json" in os.listdir(tmp_path / "work" / partial[0])
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM" in err
    assert sorted(os.listdir(tmp_path / "work")) == ["src-llama"]


# ---------------------------------------------------------------------------------------------------------------------
# Publishing
# ---------------------------------------------------------------------------------------------------------------------


def test_push_without_network_fails_cleanly_and_keeps_the_folder(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    source = make_source(tmp_path, "llama")
    code, _, err = run_cli(capsys, source, tmp_path / "offline", "--push-to-hub", "me/tiny")  # HF_HUB_OFFLINE=1
    assert code == 2 and len(error_lines(err)) == 1 and "offline mode is on" in err
    assert "config.json" in os.listdir(tmp_path / "offline")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    code, _, err = run_cli(capsys, source, tmp_path / "no-token", "--push-to-hub", "me/tiny")
    assert code == 2 and "no Hugging Face token" in err and len(error_lines(err)) == 1

    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
    code, _, err = run_cli(capsys, source, tmp_path / "no-network", "--push-to-hub", "me/tiny", "--private")
    assert code == 2 and len(error_lines(err)) == 1 and "cannot push to me/tiny" in err, err
    assert "hf upload me/tiny" in err
    assert {"config.json", "README.md", "model.safetensors"} <= set(os.listdir(tmp_path / "no-network"))


def test_push_uploads_the_folder_and_a_later_push_to_hub_keeps_the_card(tmp_path, capsys, monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants
    import transformers.utils.hub as transformers_hub
    from huggingface_hub import RepoUrl
    from transformers import PreTrainedModel

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
    hub = {}  # what the fake Hub repo holds

    def create_repo(self, repo_id, **kwargs):
        hub["private"] = kwargs.get("private")
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, folder_path, repo_id, **kwargs):
        hub.update(repo=repo_id, files=sorted(os.listdir(folder_path)))
        hub["README.md"] = open(os.path.join(folder_path, "README.md"), encoding="utf-8").read()

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    source = make_source(tmp_path, "llama")
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, source, out, "--layer-shortcut", "--push-to-hub", "me/tiny", "--private")
    assert code == 0, err
    assert "pushed to https://huggingface.co/me/tiny" in stdout and hub["private"] is True
    assert hub["files"] == sorted(os.listdir(out)) and hub["README.md"] == (out / "README.md").read_text()
    assert 'repo = "me/tiny"' in hub["README.md"]

    # model.push_to_hub() later: transformers loads the card the repo holds (ours) and uploads it with the weights
    def load_card(repo_id, **kwargs):
        return ModelCard(hub["README.md"])

    uploaded = {}

    def capture(self, working_dir, repo_id, **kwargs):
        uploaded.update(files=sorted(os.listdir(working_dir)))
        uploaded["README.md"] = open(os.path.join(working_dir, "README.md"), encoding="utf-8").read()

    monkeypatch.setattr(transformers_hub.ModelCard, "load", load_card)
    monkeypatch.setattr(PreTrainedModel, "_upload_modified_files", capture)
    model = AutoModelForCausalLM.from_pretrained(out)
    model.push_to_hub("me/tiny")
    card = ModelCard(uploaded["README.md"])
    assert card.data.base_model == "src-llama" and "layer-shortcut" in card.data.tags
    assert "AttnVariantLlama" in card.text and "trust_remote_code=True" in card.text


def test_card_parses_and_names_no_local_path(tmp_path, capsys, tokenizer):
    source = make_source(tmp_path, "qwen2", tokenizer)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, source, out, "--attention-variant", "stickbreaking", "--verify")
    assert code == 0, err
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "src-qwen2" and card.data.license == "mit" and card.data.language == "en"
    tags = {"attn_variant_llama", "custom_code", "stick-breaking-attention", "converted-from-qwen2"}
    assert tags <= set(card.data.tags)
    assert "AutoTokenizer.from_pretrained(repo, trust_remote_code=True)" in card.text
    assert "AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True" in card.text
    assert '"attention_variant": "stickbreaking"' in card.text and "perplexity" in card.text
    assert str(tmp_path) not in card.content
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert not {"local_files_only", "is_local"} & set(tokenizer_config) and tokenizer_config["model_max_length"] == 128
    card = convert.render_model_card(AutoModelForCausalLM.from_pretrained(out), str(source / "x.gguf"))
    assert ModelCard(card).data.base_model == "src-qwen2/x.gguf"  # a local path is reduced to folder/file


def test_push_to_hub_to_a_new_repo_keeps_the_converted_card(tmp_path, capsys, monkeypatch):
    """A fake Hub: transformers' push_to_hub writes its generic card to a repo that has none; the family's override
    uploads the converted card first, so that is the card push_to_hub loads, tags and uploads again."""
    import huggingface_hub
    from huggingface_hub import RepoUrl
    from huggingface_hub.errors import EntryNotFoundError
    from transformers import PreTrainedModel

    source = make_source(tmp_path, "llama")
    assert run_cli(capsys, source, tmp_path / "out")[0] == 0
    remote = {}

    def load_card(repo_id, **kwargs):
        if "README.md" not in remote:
            raise EntryNotFoundError("no README.md in the new repo")
        return ModelCard(remote["README.md"])

    def upload_file(self, path_or_fileobj, path_in_repo, repo_id, **kwargs):
        remote[path_in_repo] = open(path_or_fileobj, encoding="utf-8").read()

    def upload_folder(self, working_dir, repo_id, **kwargs):
        remote["README.md"] = open(os.path.join(working_dir, "README.md"), encoding="utf-8").read()

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_file", upload_file)
    monkeypatch.setattr(huggingface_hub.ModelCard, "load", load_card)
    monkeypatch.setattr(PreTrainedModel, "_upload_modified_files", upload_folder)
    AutoModelForCausalLM.from_pretrained(tmp_path / "out").push_to_hub("me/new")
    expected = ModelCard((tmp_path / "out" / "README.md").read_text())
    pushed = ModelCard(remote["README.md"])
    assert pushed.data.to_dict() == expected.data.to_dict() and pushed.text == expected.text
