"""benchmarks/gpu_check.py: the whole pipeline on tiny CPU shapes (`--cpu-smoke`), and its one-line exit without CUDA.

The script runs in a subprocess, as it would on a GPU machine: `--cpu-smoke` must set TRITON_INTERPRET=1 itself
before triton is imported, so the child gets an environment without it (and without CUDA).
"""

import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")


def _env():
    dropped = ("TRITON_INTERPRET", "HF_ATTN_VARIANTS_SB_BACKEND")
    env = {key: val for key, val in os.environ.items() if key not in dropped}
    env.update(CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def test_no_cuda_exits_zero_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path / "out")], capture_output=True, text=True,
                            timeout=120, env=_env(), check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: needs a CUDA GPU"), result.stdout
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    started = time.monotonic()
    result = subprocess.run([sys.executable, SCRIPT, "--cpu-smoke", "--out", str(out)], capture_output=True,
                            text=True, timeout=300, env=_env(), check=False)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    return out, result.stdout, elapsed


def test_cpu_smoke_writes_results_json(smoke):
    out, _, _ = smoke
    results = json.loads((out / "results.json").read_text())
    assert {"meta", "parts", "checks", "kernels", "models", "skipped", "notes", "all_checks_passed"} <= set(results)
    assert results["meta"]["mode"] == "cpu-smoke"
    assert results["skipped"] == [] and results["all_checks_passed"] is True
    # every part ran to its end, with its elapsed time
    assert set(results["parts"]) == {"checks", "kernels", "models"}
    for part in results["parts"].values():
        assert part["status"] == "done" and part["elapsed_s"] >= 0
    # correctness: forward (sampled rows), gradients, varlen, padding mask and decode, all against float64
    checks = results["checks"]
    names = " | ".join(c["name"] for c in checks)
    for kind in ("forward T=", "forward+backward", "varlen forward (", "varlen forward+backward", "padding mask",
                 "long stick", "decode Q="):
        assert kind in names, kind
    assert {c["dtype"] for c in checks} == {"bfloat16", "float32"}
    for c in checks:
        assert c["status"] == "pass", c
        assert set(c["errors"]) in ({"o", "rem"}, {"o", "rem", "dq", "dk", "dv"})
        assert all(0 <= err <= c["tolerances"][q] for q, err in c["errors"].items())
    assert any("dq" in c["errors"] for c in checks) and any("rows" in c for c in checks)
    # kernel timings: every mode, stick-breaking and SDPA timed, FA2 absent on the CPU
    rows = results["kernels"]["rows"]
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd", "decode"}
    for r in rows:
        assert r["stickbreaking"][0] > 0 and r["sdpa"][0] > 0 and r["fa2"] is None and r["sb_over_sdpa"] > 0
    # model-level: the bench_models.py variants in every section
    models = results["models"]
    for section in ("prefill", "decode", "train"):
        assert models[section], section
        for variants in models[section].values():
            assert set(variants) == {"softmax (SDPA)", "stickbreaking", "stickbreaking + depth shortcut"}
            assert all(v["seconds"] > 0 for v in variants.values())
    assert models["keys_visited"]["max"] >= 1


def test_cpu_smoke_writes_results_md(smoke):
    out, stdout, _ = smoke
    text = (out / "results.md").read_text()
    for heading in ("## GPU check:", "### Correctness against the float64 reference", "### Kernel timings",
                    "### Model-level", "### Parts"):
        assert heading in text, heading
    assert "| check | shape | dtype | o | rem | dq | dk | dv | result |" in text
    assert "| T | mode | stick-breaking | SDPA | FA2 | SB/SDPA | SB/FA2 |" in text
    assert "CPU smoke run" in text and "| FAIL |" not in text and "error:" not in text
    # elapsed time per part on stdout
    for title in ("correctness vs float64 reference", "kernel timings", "model-level benchmark"):
        assert f"-- {title}: done in" in stdout, title


def test_cpu_smoke_is_quick(smoke):
    _, _, elapsed = smoke
    assert elapsed < 240, f"--cpu-smoke took {elapsed:.0f} s"  # ~45 s on 2 busy cores; the bound allows a slow CI
