"""Compatibility matrix: checkpoints saved here run as remote code on the transformers releases users have.

For each release in `COMPAT_TRANSFORMERS` a plain venv (torch 2.13.0 + that transformers, nothing else; cached in
`$HF_ATTN_VARIANTS_COMPAT_CACHE`, default `~/.cache/hf-attn-variants/compat`) loads a saved checkpoint of every variant
with `trust_remote_code=True`, the package import blocked, and checks logits, cached vs uncached greedy generation,
beam search and a left-padded batch against the outputs saved by this venv (tests/compat/check_checkpoints.py).
The first run creates the venvs (about a minute each); later runs reuse them.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_attn_variants import AttnVariantLlamaConfig, AttnVariantLlamaForCausalLM
from hf_attn_variants.testing import VARIANTS, tiny_config_kwargs

COMPAT_TRANSFORMERS = ["5.4.0", "5.21.1", "5.24.0", "5.25.0"]  # oldest supported, last pre-rename, dev venv, newest
COMPAT_TORCH = "2.13.0"
CHECKER = Path(__file__).parent / "compat" / "check_checkpoints.py"
CACHE = Path(os.environ.get("HF_ATTN_VARIANTS_COMPAT_CACHE", Path.home() / ".cache" / "hf-attn-variants" / "compat"))


def compat_venv(transformers_version: str) -> Path:
    """A cached venv with only torch and the given transformers (built under a temporary name, then renamed)."""
    venv = CACHE / f"torch{COMPAT_TORCH}-transformers{transformers_version}"
    python = venv / "bin" / "python"
    if python.exists():
        return python
    staging = CACHE / f".partial-{venv.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(staging)], check=True)
    pip = [str(staging / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    # torch first and pinned, so pip takes the CPU wheel and transformers cannot pull another torch.
    subprocess.run([*pip, f"torch=={COMPAT_TORCH}"], check=True)
    subprocess.run([*pip, f"torch=={COMPAT_TORCH}", f"transformers=={transformers_version}"], check=True)
    staging.rename(venv)  # venv scripts keep the staging path in their shebangs; we only ever run bin/python
    return python


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One saved checkpoint per variant, with the reference outputs of this (development) venv beside it."""
    root = tmp_path_factory.mktemp("compat")
    paths = []
    for name, options in VARIANTS.items():
        torch.manual_seed(0)
        model = AttnVariantLlamaForCausalLM(AttnVariantLlamaConfig(**tiny_config_kwargs(num_hidden_layers=3, **options))).eval()
        if model.model.shortcut is not None:  # a trained shortcut, so the check sees it (zero-init adds nothing)
            torch.nn.init.normal_(model.model.shortcut.o_proj.weight, std=0.2)
        input_ids = torch.randint(3, model.config.vocab_size, (2, 7))
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, :2] = 0
        greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            reference = {
                "variant": name,
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "max_new_tokens": 6,
                "logits": model(input_ids, attention_mask=attention_mask).logits,
                "greedy": model.generate(input_ids[:1, 2:], **greedy),
                "beam3": model.generate(input_ids[:1, 2:], num_beams=3, **greedy),
                "left_padded": model.generate(input_ids, attention_mask=attention_mask, **greedy),
            }
        path = root / name
        model.save_pretrained(path)
        torch.save(reference, path / "reference.pt")
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("transformers_version", COMPAT_TRANSFORMERS)
def test_checkpoints_run_as_remote_code(checkpoints, transformers_version):
    python = compat_venv(transformers_version)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    run = subprocess.run(
        [str(python), str(CHECKER), *checkpoints], capture_output=True, text=True, env=env, timeout=900
    )
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(VARIANTS), f"checker failed on transformers {transformers_version}:\n{run.stderr[-4000:]}"
    failures = {r["variant"]: [k for k, ok in r["checks"].items() if not ok] for r in results}
    failures = {variant: failed for variant, failed in failures.items() if failed}
    assert all(r["transformers"] == transformers_version for r in results)
    assert not failures, f"transformers {transformers_version}: {failures}"
    assert run.returncode == 0, run.stderr[-4000:]
