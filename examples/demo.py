"""Demo: SmolLM2-135M-Instruct in the AttnVariantLlama family — answer a question, save, reload as remote code.

    .venv/bin/python examples/demo.py [--variant softmax|shortcut|stickbreaking] [--out out/demo] [--no-adapter]

1. Loads the real GGUF checkpoint into the family (`AttnVariantLlamaForCausalLM.from_pretrained(..., gguf_file=...)`).
   `--variant stickbreaking` converts it the way the committed uptraining adapter expects (the fields in its
   `base_variant.json`: stick-breaking with RoPE kept), applies the adapter (`adapters/`, made by
   `hf-attn-variants-train`, see its README) and merges it; `--no-adapter` shows the bare conversion instead.
2. Answers a chat question greedily.
3. Converts/saves it (atomic folder with config.json + auto_map, safetensors, tokenizer, remote code, model card).
4. Reloads the folder with `trust_remote_code=True` in a fresh process that cannot import hf_attn_variants and checks
   that its logits equal the in-process model's.
"""

import argparse
import json
import os
import tempfile

import torch
from transformers import AutoTokenizer

from hf_attn_variants import AttnVariantLlamaForCausalLM
from hf_attn_variants.convert import render_model_card, save_atomically
from hf_attn_variants.testing import remote_code_logits, require_smollm2_gguf

QUESTION = "What is the capital of France?"
ADAPTER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "adapters", "smollm2-135m-stickbreaking-rope-lora")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=["softmax", "shortcut", "stickbreaking"], default="softmax")
    parser.add_argument("--out", default="out/demo")
    parser.add_argument("--adapter", default=ADAPTER, help="uptraining adapter applied with --variant stickbreaking")
    parser.add_argument("--no-adapter", dest="adapter", action="store_const", const=None)
    args = parser.parse_args()

    folder, name = require_smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    attn_implementation = None if args.variant == "softmax" else args.variant
    adapter = args.adapter if args.variant == "stickbreaking" else None
    # The adapter was trained on one particular conversion; build exactly that one.
    variant = json.load(open(os.path.join(adapter, "base_variant.json"))) if adapter else {}
    model = AttnVariantLlamaForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, attn_implementation=attn_implementation, **variant
    ).eval()
    # GGUF weights arrive dequantized; drop the quantizer so the model can be saved.
    model.hf_quantizer, model.is_quantized = None, False
    del model.config.quantization_config
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()
        print(f"applied the uptraining adapter {os.path.relpath(adapter)} (merged)")

    messages = [{"role": "user", "content": QUESTION}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=30, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"variant: {args.variant} (attention_variant={model.config.attention_variant}, "
          f"layer_shortcut={model.config.layer_shortcut})")
    print(f"Q: {QUESTION}\nA: {answer.strip()}")
    if args.variant == "stickbreaking" and not adapter:
        print("(stick-breaking replaces softmax in pretrained weights: without the uptraining adapter the answer degrades)")

    save_atomically(model, args.out, tokenizer, render_model_card(model, os.path.join(folder, name)), overwrite=True)
    print(f"saved to {args.out}: {sorted(os.listdir(args.out))}")

    with tempfile.TemporaryDirectory() as workdir, torch.no_grad():
        child = remote_code_logits(args.out, dict(inputs), workdir)
        # The child cannot import this package, so stick-breaking runs there as pure PyTorch; compare against the same
        # path here (the package's C++ CPU forward agrees with it to float rounding, not bit for bit).
        previous = os.environ.get("HF_ATTN_VARIANTS_SB_BACKEND")
        os.environ["HF_ATTN_VARIANTS_SB_BACKEND"] = "torch"
        try:
            same = torch.equal(child["logits"], model(**inputs).logits)
        finally:
            os.environ.pop("HF_ATTN_VARIANTS_SB_BACKEND")
            if previous is not None:
                os.environ["HF_ATTN_VARIANTS_SB_BACKEND"] = previous
    print(f"reloaded with trust_remote_code=True in a process without hf_attn_variants: {child['class']}, "
          f"logits identical: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
