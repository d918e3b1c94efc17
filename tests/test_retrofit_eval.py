"""The retrofit evaluation (experiments/retrofit_eval.py) and recipe (examples/lora_finetune.py, the teacher data
scripts): its measures against brute force on a tiny model, the answer scoring, and what the recipe trains on (never
a held-out text or a probe answer; a curriculum that reaches the full length). The real runs need the SmolLM2 GGUF and
an hour of CPU: not part of CI."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from hf_attn_variants import AttnVariantLlamaConfig, AttnVariantLlamaForCausalLM
from hf_attn_variants.testing import tiny_config_kwargs
from hf_attn_variants.train.data import parse_curriculum

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "experiments"))
import retrofit_chat_data  # noqa: E402
import retrofit_eval  # noqa: E402
import retrofit_text_data  # noqa: E402


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = AttnVariantLlamaConfig(**tiny_config_kwargs(attention_variant="stickbreaking", max_position_embeddings=2048))
    return AttnVariantLlamaForCausalLM(config).double().eval()


def brute_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """NLL of every next token, one forward per prefix (nothing shared between positions)."""
    out = []
    with torch.no_grad():
        for i in range(1, len(ids)):
            logits = model(input_ids=ids[None, :i]).logits[0, -1]
            out.append(-torch.log_softmax(logits, -1)[ids[i]])
    return torch.stack(out).float()  # as the evaluation reports it (its LM head runs in float32)


def test_token_nll_matches_one_prefix_at_a_time(model):
    ids = torch.randint(3, 99, (30,))
    fast = retrofit_eval.token_nll(model, ids[None], logits_chunk=7)[0]  # chunked LM head, uneven last chunk
    torch.testing.assert_close(fast, brute_nll(model, ids))


@pytest.mark.parametrize("context,stride", [(8, 4), (5, 3)])
def test_short_context_nll_scores_every_token_with_bounded_context(model, context, stride):
    """Position i (predicting token i + 1) is scored from the piece that starts at the last multiple of `stride` leaving
    it at least `context` tokens: between `context` and `context + stride - 1` tokens before it."""
    window = torch.randint(3, 99, (41,))
    got = retrofit_eval.short_context_nll(model, window, context, stride=stride, batch=3)
    assert got.shape == (40,) and got[: context - 1].isnan().all() and not got[context - 1 :].isnan().any()
    for i in range(context - 1, 40):
        start = (i - (context - 1)) // stride * stride
        assert context <= i + 1 - start < context + stride
        expected = brute_nll(model, window[start : i + 2])[-1]
        torch.testing.assert_close(got[i], expected, msg=f"position {i}")


def test_length_eval_buckets_compare_the_same_tokens(model, monkeypatch):
    monkeypatch.setattr(retrofit_eval, "BUCKETS", [(8, 16), (16, 32), (32, 64)])
    ids = torch.randint(3, 99, (200,))
    result = retrofit_eval.length_eval(model, ids, windows=2, window_length=32, context=8)
    assert result["window_starts"] == [0, 200 - 32 - 1]
    assert [(b["from"], b["to"]) for b in result["buckets"]] == [(8, 16), (16, 32)]  # 32-64 is past the window
    full = torch.stack([brute_nll(model, ids[s : s + 33]) for s in result["window_starts"]]).mean(0)
    short = torch.stack([retrofit_eval.short_context_nll(model, ids[s : s + 33], 8) for s in result["window_starts"]])
    for bucket in result["buckets"]:
        lo, hi = bucket["from"], bucket["to"]
        assert bucket["full_context"] == pytest.approx(full[lo - 1 : hi - 1].mean().item())
        assert bucket["context_512"] == pytest.approx(short.mean(0)[lo - 1 : hi - 1].mean().item())
        assert bucket["excess"] == pytest.approx(bucket["full_context"] - bucket["context_512"])


def test_held_out_perplexity_is_exp_mean_nll_of_evenly_spread_chunks(model):
    ids = torch.randint(3, 99, (101,))
    got = retrofit_eval.held_out_perplexity(model, ids, length=10, chunks=3, batch=2)
    starts = [0, 30, 60]  # 10 chunks of 10, 3 wanted: k * 10 // 3
    nll = torch.cat([brute_nll(model, ids[s : s + 10]) for s in starts])
    assert got == pytest.approx(math.exp(nll.mean().item()))


@pytest.mark.parametrize("answer,accepted,correct", [
    ("The capital of France is Paris.", ["Paris"], True),
    ("paris, of course", ["Paris"], True),
    ("Parisian cafés", ["Paris"], False),
    ("A spider has 8 legs.", ["eight", "8"], True),
    ("It has 18 legs.", ["8"], False),
    ("Water is H₂O.", ["H2O", "H₂O"], True),
    ("", ["Paris"], False),
])
def test_answer_scoring_needs_a_whole_word(answer, accepted, correct):
    assert retrofit_eval.answer_is_correct(answer, accepted) is correct


def test_probe_is_well_formed():
    questions = json.loads(retrofit_eval.PROBE.read_text(encoding="utf-8"))["questions"]
    assert len(questions) >= 30 and len({q["q"] for q in questions}) == len(questions)
    assert all(q["answers"] and all(a.strip() for a in q["answers"]) for q in questions)


def test_teacher_prompts_stay_off_the_probe():
    retrofit_chat_data.check_held_out(retrofit_chat_data.build_prompts())
    openings = retrofit_text_data.build_openings()
    retrofit_chat_data.check_held_out(openings)
    assert len(openings) == len(set(openings)) >= 100
    with pytest.raises(ValueError, match="chat-probe question"):
        retrofit_chat_data.check_held_out(["What is the capital of France?"])
    with pytest.raises(ValueError, match="probe answer 'Tokyo'"):
        retrofit_chat_data.check_held_out(["Tell me about tokyo at night."])


def test_recipe_trains_on_no_held_out_text_and_reaches_full_length(monkeypatch, tmp_path):
    """The arguments examples/lora_finetune.py hands `hf-attn-variants train` (the teacher data stubbed)."""
    spec = importlib.util.spec_from_file_location("lora_finetune", REPO / "examples" / "lora_finetune.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    monkeypatch.setattr(recipe, "require_smollm2_gguf", lambda: (str(tmp_path), "model.gguf"))
    for module in (recipe.retrofit_chat_data, recipe.retrofit_text_data):  # the teacher data: empty stand-ins
        monkeypatch.setattr(module, "main", lambda argv: Path(argv[argv.index("--out") + 1]).write_text("x"))
    argv = recipe.recipe_argv(["--out", str(tmp_path / "run")])

    def values(flag):
        i = len(argv) - 1 - argv[::-1].index(flag)  # the last occurrence wins, as argparse reads it
        rest = argv[i + 1 :]
        return rest[: next((k for k, a in enumerate(rest) if a.startswith("--")), len(rest))]

    train_files = [Path(p).resolve() for p in values("--train-files")]
    assert (tmp_path / "run.chats.txt").resolve() in train_files and (tmp_path / "run.text.txt").resolve() in train_files
    held_out = {p.resolve() for p in retrofit_eval.HELD_OUT.values()}
    assert not held_out & set(train_files)
    assert Path(values("--eval-file")[0]).resolve() == retrofit_eval.HELD_OUT["persuasion"].resolve()
    max_length, max_steps = int(values("--max-length")[0]), int(values("--max-steps")[0])
    schedule = parse_curriculum(values("--curriculum")[0], max_length)
    assert schedule[-1][1] < max_steps, "the curriculum must end before the last step, or max_length is never trained"
    assert int(values("--attention-transfer-steps")[0]) <= schedule[0][1]


def _result(label, ppl, correct, excess):
    buckets = [{"from": lo, "to": hi, "excess": excess} for lo, hi in retrofit_eval.BUCKETS]
    return {"label": label, "perplexity": dict.fromkeys(retrofit_eval.HELD_OUT, ppl),
            "chat": {"correct": correct, "empty": 0, "questions": 40}, "length": {"buckets": buckets}}


def test_table_has_a_column_per_model_with_ratios_to_the_source():
    lines = retrofit_eval.table(_result("source", 10.0, 25, 2.0), _result("a", 12.0, 24, 0.5),
                                _result("b", 15.0, 20, -0.01)).splitlines()
    assert lines[0] == "| measure | source (softmax) | a | b | target |"
    assert lines[2] == "| perplexity @512, persuasion | 10.00 | 12.00 (1.20×) | 15.00 (1.50×) | ≤ 1.25× |"
    assert "| 25 | 24 (-1) | 20 (-5) |" in lines[5]
    assert lines[-1].endswith("| +2.000 | +0.500 | -0.010 | ≤ +0.02 (retrofit) |")


@pytest.mark.parametrize("spec", ["no-equals-sign", "=out/x", "label=/nonexistent/adapter"])
def test_bad_arm_is_refused_before_anything_runs(spec, capsys):
    with pytest.raises(SystemExit) as exit_info:
        retrofit_eval.main(["--arm", spec])
    assert exit_info.value.code == 2
    assert f"--arm {spec!r}: expected LABEL=ADAPTER_FOLDER" in capsys.readouterr().err


def test_teacher_data_scripts_write_their_file_whole(monkeypatch, tmp_path, capsys):
    """The command both teacher-data scripts share (the teacher stubbed): every prompt's text, written at once."""
    monkeypatch.setattr(retrofit_chat_data, "load_teacher", lambda threads: ("model", "tokenizer"))
    seen = {}

    def generate(model, tokenizer, prompts, max_new_tokens):
        seen.update(model=model, max_new_tokens=max_new_tokens, count=len(prompts))
        return [f"<{p}>" for p in prompts]

    out = tmp_path / "sub" / "docs.txt"
    retrofit_chat_data.teacher_data_main(["--out", str(out), "--max-new-tokens", "7"], "doc", ["a", "b"], generate, 96,
                                         "documents")
    assert out.read_text() == "<a><b>" and seen == {"model": "model", "max_new_tokens": 7, "count": 2}
    assert sorted(p.name for p in out.parent.iterdir()) == ["docs.txt"]
    assert "2 teacher documents ->" in capsys.readouterr().out
    with pytest.raises(ValueError, match="probe answer"):  # checked before the teacher is even loaded
        retrofit_chat_data.teacher_data_main(["--out", str(out)], "doc", ["Visit Paris"], generate, 96, "documents")
