"""`hf-attn-variants train` as a command you can trust, on tiny random models.

* Bad input: one line naming the value and what is allowed, exit status 2, nothing written (in process through
  `main(argv)`, and through the `hf-attn-variants` command).
* Output: a staging folder renamed when complete; an existing output is refused unless --overwrite (or --resume,
  which leaves a finished run alone); no pickles in the published folder.
* Resume: SIGTERM (or a crash) mid-run keeps a checkpoint; `--resume` finishes the run with the loss curve and the
  weights of an uninterrupted one, in one process and in two (DDP through `accelerate launch`).
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from hf_attn_variants import cli
from hf_attn_variants.train import main
from test_train import COMMON, EVAL_FILE, ROOT, log_values, make_tiny_family


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    model = make_tiny_family(root / "model")
    (root / "empty.txt").write_text("  \n")
    (root / "binary.txt").write_bytes(b"\x00\x01\x02PK\x03\x04" * 100)
    (root / "latin1.txt").write_bytes("caf\xe9 au lait, ".encode("latin-1") * 50)
    (root / "short.txt").write_text("A few words.")
    (root / "file.txt").write_text("I am a file, not a folder.")
    (root / "noconfig").mkdir()
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2)).save_pretrained(root / "gpt2")
    big_vocab = make_tiny_family(root / "other-vocab", vocab_size=120)
    return {"root": root, "model": model, "gpt2": str(root / "gpt2"), "other_vocab": big_vocab}


# (extra argv, what the one line must contain); "{root}" is the inputs folder, "{model}" the tiny model.
BAD_INPUTS = {
    "model-missing": (["{root}/nope", "OUT"], ["'{root}/nope'", "no such folder"]),
    "model-no-config": (["{root}/noconfig", "OUT"], ["no config.json"]),
    "model-is-a-file": (["{root}/file.txt", "OUT"], ["is a file"]),
    "gguf-missing": (["{model}", "OUT", "--gguf-file", "x.gguf"], ["--gguf-file 'x.gguf'", "no such file"]),
    "teacher-missing": (["{model}", "OUT", "--teacher", "{root}/nope"], ["--teacher", "no such folder"]),
    "teacher-vocab": (["{model}", "OUT", "--teacher", "{other_vocab}"], ["vocabulary of 120", "99"]),
    "train-empty": (["{model}", "OUT", "--train-files", "{root}/empty.txt"], ["empty.txt' is empty"]),
    "train-binary": (["{model}", "OUT", "--train-files", "{root}/binary.txt"], ["binary.txt' is a binary file"]),
    "train-not-utf8": (["{model}", "OUT", "--train-files", "{root}/latin1.txt"], ["is not UTF-8 text"]),
    "train-no-match": (["{model}", "OUT", "--train-files", "{root}/*.nothing"], ["--train-files", "no file matches"]),
    "train-only-eval": (["{model}", "OUT", "--train-files", EVAL_FILE], ["no file matches", "is excluded"]),
    "train-too-short": (["{model}", "OUT", "--train-files", "{root}/short.txt"], ["--max-length 64", "tokens"]),
    "eval-missing": (["{model}", "OUT", "--eval-file", "{root}/nope.txt"], ["--eval-file", "no such file"]),
    "max-length-0": (["{model}", "OUT", "--max-length", "0"], ["--max-length 0", "integer >= 2"]),
    "max-steps-negative": (["{model}", "OUT", "--max-steps", "-1"], ["--max-steps -1", "integer >= 1"]),
    "max-steps-0": (["{model}", "OUT", "--max-steps", "0"], ["--max-steps 0", "integer >= 1"]),
    "max-steps-text": (["{model}", "OUT", "--max-steps", "ten"], ["--max-steps", "invalid int value: 'ten'"]),
    "lora-r-0": (["{model}", "OUT", "--lora-r", "0"], ["--lora-r 0", "integer >= 1"]),
    "lora-train-unknown": (["{model}", "OUT", "--method", "lora", "--train", "foo"], ["--train 'foo'", "norms"]),
    "lora-targets-unknown": (["{model}", "OUT", "--lora-targets", "qkv"], ["--lora-targets qkv", "q_proj"]),
    "full-train-no-match": (["{model}", "OUT", "--method", "full", "--train", "nothing_such"], ["'nothing_such'", "matches no parameter"]),
    "full-train-bad-regex": (["{model}", "OUT", "--method", "full", "--train", "(q"], ["'(q'", "valid regex"]),
    "method": (["{model}", "OUT", "--method", "qlora"], ["--method", "'qlora'", "lora"]),
    "batch-size-0": (["{model}", "OUT", "--batch-size", "0"], ["--batch-size 0"]),
    "lr-0": (["{model}", "OUT", "--lr", "0"], ["--learning-rate 0", "> 0"]),
    "kl-weight": (["{model}", "OUT", "--kl-weight", "1.5"], ["--kl-weight 1.5", "<= 1"]),
    "scheduler": (["{model}", "OUT", "--lr-scheduler", "sometimes"], ["--lr-scheduler 'sometimes'", "cosine"]),
    "curriculum-syntax": (["{model}", "OUT", "--curriculum", "short"], ["--curriculum 'short'", "LEN:STEPS"]),
    "curriculum-divide": (["{model}", "OUT", "--curriculum", "48:4"], ["--curriculum '48:4'", "divid"]),
    "transfer-no-teacher": (["{model}", "OUT", "--attention-transfer-steps", "3"], ["needs a --teacher"]),
    "eval-steps-0": (["{model}", "OUT", "--eval-steps", "0"], ["--eval-steps 0"]),
    "save-steps-0": (["{model}", "OUT", "--save-steps", "0"], ["--save-steps 0"]),
    "resume-and-overwrite": (["{model}", "OUT", "--resume", "--overwrite"], ["--resume", "--overwrite"]),
    "output-is-a-file": (["{model}", "{root}/file.txt"], ["file.txt' exists and is not a folder"]),
    "output-is-the-model": (["{model}", "{model}", "--overwrite"], ["refusing to write", "the source model"]),
    "variant-on-gpt2": (["{gpt2}", "OUT", "--attention-variant", "stickbreaking"], ["--attention-variant", "'gpt2'"]),
    # A variant change saves the converted base next to the adapter: never before the arguments are checked.
    "variant-change-bad-rank": (["{model}", "OUT", "--attention-variant", "stickbreaking", "--lora-r", "0"], ["--lora-r 0"]),
}


def _argv(template, inputs, out):
    """MODEL OUT, the small-run defaults, then the case's flags (argparse: the last value of a flag wins)."""
    values = {"root": str(inputs["root"]), "model": inputs["model"], "gpt2": inputs["gpt2"],
              "other_vocab": inputs["other_vocab"]}
    argv = [out if a == "OUT" else a.format(**values) for a in template]
    return argv[:2] + ["--max-steps", "2", *COMMON] + argv[2:]


@pytest.mark.parametrize("case", sorted(BAD_INPUTS), ids=str)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, inputs, tmp_path, capsys):
    template, expected = BAD_INPUTS[case]
    work = tmp_path / "work"
    work.mkdir()
    before = sorted(os.listdir(inputs["root"]))
    argv = _argv(template, inputs, str(work / "out"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = [line for line in err.splitlines() if line.startswith(("error:", "Traceback"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in expected:
        text = text.format(root=inputs["root"], model=inputs["model"], other_vocab=inputs["other_vocab"])
        assert text in lines[0], lines[0]
    assert os.listdir(work) == [], os.listdir(work)  # no output, no staging folder, no base
    assert sorted(os.listdir(inputs["root"])) == before


def test_the_command_exits_2_with_one_line_and_debug_shows_the_traceback(inputs, tmp_path, capsys):
    argv = ["train", inputs["model"], str(tmp_path / "out"), *COMMON, "--max-length", "0"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and err.startswith("error: --max-length 0"), err
    assert cli.main([*argv, "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_console_alias_exits_0_after_a_run_and_2_on_bad_input(inputs, tmp_path):
    """`python -m hf_attn_variants.train` (what the `hf-attn-variants-train` alias runs): status 0, no metrics dump."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    ok = subprocess.run([sys.executable, "-m", "hf_attn_variants.train", inputs["model"], str(tmp_path / "out"),
                         "--method", "full", "--max-steps", "1", "--no-plot", *COMMON],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "log_history" not in ok.stderr and "summary:" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "hf_attn_variants.train", inputs["model"], str(tmp_path / "out2"),
                          *COMMON, "--lora-r", "0"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --lora-r 0: expected an integer >= 1", bad.stderr


def test_existing_output_needs_overwrite_and_the_output_holds_no_pickles(inputs, tmp_path, capsys):
    out = str(tmp_path / "out")
    run = [inputs["model"], out, "--method", "full", "--max-steps", "2", "--save-steps", "1", "--no-plot", *COMMON]
    main(run)
    files = set(os.listdir(out))
    assert {"model.safetensors", "config.json", "metrics.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files) and "checkpoints" not in files, files
    assert os.listdir(tmp_path) == ["out"]  # the staging folder is gone
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(run)
    assert exit_info.value.code == 2 and "already exists; pass --overwrite" in capsys.readouterr().err
    first = os.path.getmtime(os.path.join(out, "metrics.json"))
    assert main(run + ["--resume"])["steps"] == 2  # a finished run: returned as it is
    assert os.path.getmtime(os.path.join(out, "metrics.json")) == first
    metrics = main(run + ["--overwrite", "--max-steps", "3"])
    assert metrics["steps"] == 3 and json.load(open(os.path.join(out, "metrics.json")))["steps"] == 3
    assert os.listdir(tmp_path) == ["out"]


# ---------------------------------------------------------------------------------------------------------------------
# Interrupt and resume
# ---------------------------------------------------------------------------------------------------------------------

# A training command whose steps take a little longer, so a signal reliably lands mid-run.
SLOW_STEPS = """
import sys, time
from hf_attn_variants.train import UptrainingTrainer, cli_main

_step = UptrainingTrainer.training_step

def training_step(self, *args, **kwargs):
    time.sleep(0.1)
    return _step(self, *args, **kwargs)

UptrainingTrainer.training_step = training_step
sys.exit(cli_main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def resume_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    script = root / "slow_train.py"
    script.write_text(SLOW_STEPS)
    student = make_tiny_family(root / "student", seed=2)  # softmax: independent of the kernels being worked on
    teacher = make_tiny_family(root / "teacher", seed=3)
    # Distillation with the trainer's own state: attention transfer first, a curriculum, evaluations.
    recipe = [student, "OUT", "--teacher", teacher, "--method", "full", "--attention-transfer-steps", "8",
              "--kl-weight", "0.5", "--curriculum", "32:12", "--max-steps", "24", "--eval-steps", "8", "--lr", "1e-2",
              "--no-plot", *COMMON]
    return root, script, recipe


def _command(script, argv, processes, port):
    if processes == 1:
        return [sys.executable, str(script), *argv]
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes), "--multi_gpu",
            "--main_process_port", str(port), str(script), *argv]


def _as_foreground():
    # A shell starts background jobs with SIGINT ignored and the child inherits that (the command then rightly leaves
    # it alone); a user's Ctrl-C reaches a foreground process, so the child gets the default disposition.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _run(script, argv, processes, port, stop_after=None, sig=signal.SIGTERM):
    """Run the command; with `stop_after`, send `sig` once that many training steps were logged."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(_command(script, argv, processes, port), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=_as_foreground)
    lines = []
    if stop_after is not None:
        for line in proc.stdout:
            lines.append(line)
            if sum("'loss'" in seen for seen in lines) >= stop_after:
                proc.send_signal(sig)
                break
    try:
        lines.append(proc.communicate(timeout=300)[0])
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, "".join(lines)


def _assert_same_run(resumed_dir, reference_dir, stopped_at):
    resumed = json.load(open(os.path.join(resumed_dir, "metrics.json")))
    reference = json.load(open(os.path.join(reference_dir, "metrics.json")))
    assert resumed["steps"] == reference["steps"] == 24 and resumed["resumed_from_step"] == stopped_at
    for key in ("loss", "attention_transfer_loss", "kl_loss", "lm_loss", "seq_len", "learning_rate"):
        assert log_values(resumed, key) == pytest.approx(log_values(reference, key), rel=1e-4, abs=1e-6), key
    assert log_values(reference, "seq_len") == [32] * 12 + [64] * 12
    evals = lambda m: [(h["step"], h["eval_loss"]) for h in m["log_history"] if "eval_loss" in h]  # noqa: E731
    assert [s for s, _ in evals(resumed)] == [s for s, _ in evals(reference)] == [0, 8, 16, 24]
    assert [v for _, v in evals(resumed)] == pytest.approx([v for _, v in evals(reference)], rel=1e-4, abs=1e-6)
    weights, expected = (load_file(os.path.join(d, "model.safetensors")) for d in (resumed_dir, reference_dir))
    assert weights.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(weights[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)
    assert not any(f.endswith((".bin", ".pt", ".pth")) or f == "checkpoints" for f in os.listdir(resumed_dir))


def _staging(out):
    parent, name = os.path.split(out)
    return os.path.join(parent, f".{name}.partial")


@pytest.mark.parametrize("processes", [1, 2], ids=["one-process", "ddp-two-processes"])
def test_sigterm_then_resume_equals_an_uninterrupted_run(resume_setup, processes):
    root, script, recipe = resume_setup
    if processes > 1:  # attention transfer under DDP fails before and after this change (see the report): KL only
        at = recipe.index("--attention-transfer-steps")
        recipe = recipe[:at] + recipe[at + 2:]
    port = 29640 + processes
    reference, out = str(root / f"reference-{processes}"), str(root / f"interrupted-{processes}")
    code, log = _run(script, [reference if a == "OUT" else a for a in recipe], processes, port)
    assert code == 0, log[-4000:]

    argv = [out if a == "OUT" else a for a in recipe]
    code, log = _run(script, argv + ["--save-steps", "100"], processes, port, stop_after=5)
    assert code != 0 and "interrupted by SIGTERM at step" in log, log[-4000:]
    assert not os.path.exists(out)
    checkpoints = os.listdir(os.path.join(_staging(out), "checkpoints"))
    assert len(checkpoints) == 1, checkpoints  # the one the signal saved (--save-steps 100 saves none)
    stopped_at = int(checkpoints[0].split("-")[1])
    assert 5 <= stopped_at < 12, stopped_at  # mid attention transfer / curriculum
    assert f"checkpoint-{stopped_at} saved in" in log and "--resume" in log

    code, log = _run(script, argv, processes, port)  # without --resume: refused, the partial run kept
    assert (code == 2 if processes == 1 else code != 0) and "pass --resume to continue it or --overwrite" in log, log[-3000:]
    code, log = _run(script, argv + ["--resume"], processes, port)
    assert code == 0, log[-4000:]
    assert not os.path.exists(_staging(out))
    _assert_same_run(out, reference, stopped_at)


def test_a_killed_run_resumes_from_its_last_periodic_checkpoint(resume_setup):
    """SIGKILL (a crash, an out-of-memory kill) leaves the staging folder with the --save-steps checkpoints."""
    root, script, recipe = resume_setup
    reference, out = str(root / "reference-1"), str(root / "killed")
    if not os.path.exists(reference):
        assert _run(script, [reference if a == "OUT" else a for a in recipe], 1, 0)[0] == 0
    argv = [out if a == "OUT" else a for a in recipe] + ["--save-steps", "4"]
    code, log = _run(script, argv, 1, 0, stop_after=10, sig=signal.SIGKILL)
    assert code == -signal.SIGKILL and not os.path.exists(out)
    code, log = _run(script, argv + ["--resume"], 1, 0)
    assert code == 0, log[-4000:]
    resumed = json.load(open(os.path.join(out, "metrics.json")))["resumed_from_step"]
    assert resumed in (4, 8), resumed
    _assert_same_run(out, reference, resumed)


def test_resume_must_repeat_the_run_s_arguments(resume_setup, capsys):
    root, script, recipe = resume_setup
    out = str(root / "changed")
    argv = [out if a == "OUT" else a for a in recipe]
    code, log = _run(script, argv, 1, 0, stop_after=3)
    assert code == 128 + signal.SIGTERM, log[-3000:]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--resume", "--lr", "0.5"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--learning-rate 0.5 (was 0.01)" in err, err
    assert os.path.isdir(_staging(out))  # still there to resume
    shutil.rmtree(_staging(out))


def test_ctrl_c_saves_a_checkpoint_like_sigterm(resume_setup):
    root, script, recipe = resume_setup
    out = str(root / "ctrl-c")
    code, log = _run(script, [out if a == "OUT" else a for a in recipe], 1, 0, stop_after=3, sig=signal.SIGINT)
    assert code == 130 and "interrupted by SIGINT at step" in log and "--resume" in log, log[-3000:]
    assert len(os.listdir(os.path.join(_staging(out), "checkpoints"))) == 1 and not os.path.exists(out)
    shutil.rmtree(_staging(out))
