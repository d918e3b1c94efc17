"""Smoke tests of the experiment scripts (experiments/): a few training steps of a tiny config through each script's
CLI flags (`--smoke`), checking the JSON it writes and that its PNGs exist. The full runs are not part of CI."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def load(name):
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(name, tmp_path, *extra):
    results, work = tmp_path / "results", tmp_path / "work"
    payload = load(name).main(["--smoke", "--results-dir", str(results), "--work-dir", str(work), *extra])
    written = json.loads((results / f"{name}.json").read_text())
    assert written["experiment"] == name
    return payload, written, results, work


def assert_pngs(results, names):
    for png in names:
        path = results / png
        assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_synthetic_recall_smoke(tmp_path):
    _, written, results, _ = run("synthetic_recall", tmp_path)
    assert set(written) >= {"experiment", "args", "task", "throughput", "variants"}
    assert set(written["variants"]) == {"softmax_rope", "stickbreaking", "stickbreaking_depth"}
    sizes = {v["parameters"] for v in written["variants"].values()}
    assert len(sizes) == 1, f"models of equal size expected, got {sizes}"
    for variant in written["variants"].values():
        assert set(variant) >= {"accuracy_by_context", "accuracy_by_distance", "accuracy_by_distance_pooled", "train"}
        assert set(variant["accuracy_by_context"]) == {"32", "64"}
        assert all(0.0 <= a <= 1.0 for a in variant["accuracy_by_context"].values())
        assert variant["train"]["steps"] == 3 and variant["train"]["tokens_per_s_median_step"] > 0
    assert set(written["throughput"]["variants"]["softmax_rope"]) >= {"tokens_per_s", "ms_per_step"}
    assert_pngs(results, ["synthetic_recall_length.png", "synthetic_recall_distance.png"])


def test_synthetic_recall_resumes(tmp_path, capsys):
    """An interrupted run resumes from its last checkpoint and ends with the weights of an uninterrupted run; a
    finished run is loaded, not retrained."""
    from safetensors.torch import load_file

    results, work = tmp_path / "results", tmp_path / "work"
    module = load("synthetic_recall")
    argv = ["--smoke", "--results-dir", str(results), "--work-dir", str(work), "--throughput-rounds", "0",
            "--variants", "stickbreaking", "--save-steps", "1"]
    first = module.main(argv)
    (run_dir,) = (work / "synthetic_recall").iterdir()
    weights = load_file(run_dir / "final" / "model.safetensors")

    # Pretend the run stopped after its step-2 checkpoint.
    shutil.rmtree(run_dir / "final")
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-3")
    (run_dir / "train_stats.json").unlink()
    assert (run_dir / "checkpoints" / "checkpoint-2").is_dir()
    capsys.readouterr()
    resumed = module.main(argv)
    assert "resuming from" in capsys.readouterr().out
    assert [step for step, _ in resumed["variants"]["stickbreaking"]["train"]["loss_history"]] == [1, 2, 3]
    again = load_file(run_dir / "final" / "model.safetensors")
    assert weights.keys() == again.keys()
    assert all(torch.equal(weights[k], again[k]) for k in weights)

    finished = module.main(argv)
    assert "finished before" in capsys.readouterr().out
    assert finished["variants"]["stickbreaking"]["accuracy_by_context"] == \
        first["variants"]["stickbreaking"]["accuracy_by_context"]


def test_austen_length_smoke(tmp_path):
    _, written, results, _ = run("austen_length", tmp_path)
    assert set(written) >= {"experiment", "args", "data", "throughput", "variants", "claim"}
    assert written["data"]["held_out"] == "austen_persuasion.txt"
    assert "austen_persuasion.txt" not in written["data"]["train_files"]
    for variant in written["variants"].values():
        assert set(variant) >= {"loss_by_bucket", "last_quarter", "loss_by_position_train_context", "mean_loss_by_context"}
        assert set(variant["loss_by_bucket"]) == {"32", "64"}
        assert set(variant["last_quarter"]["64"]) >= {"loss", "same_bytes_sliding_256", "delta_vs_sliding_256"}
        assert len(variant["loss_by_position_train_context"]) == 32
        assert [u["context"] for u in variant["context_use"]] == [8, 16, 32, 64]  # sliding 8, 16, 32; whole window
    assert_pngs(results, ["austen_length_buckets.png", "austen_length_window.png"])


def test_shortcut_gains_smoke(tmp_path):
    _, written, results, _ = run("shortcut_gains", tmp_path)
    table = written["variants"]
    assert set(table) == {"softmax_rope", "softmax_rope_depth", "softmax_rope_depth_context", "softmax_rope_wide"}
    for row in table.values():
        assert set(row) >= {"validation_loss_mean", "validation_loss_std", "validation_loss_by_seed", "parameters"}
        assert len(row["validation_loss_by_seed"]) == 2
    # the parameter-matched baseline is within one MLP unit of the shortcut model's size
    per_unit = 3 * 16 * 3  # 3 matrices x hidden 16 x 3 layers
    assert abs(table["softmax_rope_wide"]["parameters"] - table["softmax_rope_depth"]["parameters"]) <= per_unit
    assert set(written["heatmaps"]) == {"depth", "depth_context"}
    assert_pngs(results, ["shortcut_gains_loss.png", "shortcut_gains_attention_depth.png",
                          "shortcut_gains_attention_depth_context.png"])
