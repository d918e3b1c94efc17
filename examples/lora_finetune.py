"""LoRA fine-tuning of SmolLM2-135M converted to stick-breaking attention, on Jane Austen.

    .venv/bin/python examples/lora_finetune.py [--steps 30] [--variant stickbreaking|shortcut|softmax] [--out out/lora]

Swapping softmax for stick-breaking changes the function the pretrained weights compute; a short LoRA run (rank 16 on
every decoder projection, via `hf_attn_variants.lora.lora_config`) recovers much of the language-modelling loss.
Prints the held-out loss of the source model, of the converted model before and after fine-tuning, and saves the
adapter (reload with `PeftModel.from_pretrained(base, out)`).
"""

import argparse
import os

import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import AutoTokenizer
from tqdm import tqdm

from hf_attn_variants import AttnVariantLlamaForCausalLM
from hf_attn_variants.lora import lora_config
from hf_attn_variants.testing import smollm2_gguf_path

AUSTEN = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "austen", "austen_prideprejudice.txt")


def chunks(tokenizer, path, length, limit_chars):
    text = open(path, encoding="utf-8").read()[:limit_chars]
    ids = tokenizer(text).input_ids
    rows = [ids[i : i + length] for i in range(0, len(ids) - length, length)]
    return Dataset.from_dict({"input_ids": rows}).with_format("torch")


@torch.no_grad()
def mean_loss(model, dataset, batch_size):
    model.eval()
    losses = [model(input_ids=b["input_ids"], labels=b["input_ids"]).loss.item() for b in dataset.iter(batch_size)]
    return sum(losses) / len(losses)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", default=AUSTEN)
    parser.add_argument("--variant", choices=["softmax", "shortcut", "stickbreaking"], default="stickbreaking")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", default="out/lora")
    args = parser.parse_args()
    torch.manual_seed(0)

    folder, name = os.path.split(smollm2_gguf_path())
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    data = chunks(tokenizer, args.text, args.length, limit_chars=400_000).train_test_split(test_size=16, seed=0)
    source = AttnVariantLlamaForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    print(f"source model (softmax):          held-out loss {mean_loss(source, data['test'], args.batch_size):.3f}")
    del source

    attn_implementation = None if args.variant == "softmax" else args.variant
    model = AttnVariantLlamaForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, attn_implementation=attn_implementation
    )
    model.hf_quantizer, model.is_quantized = None, False  # GGUF weights are dequantized: train them like any other
    print(f"converted ({args.variant}), step 0:   held-out loss {mean_loss(model, data['test'], args.batch_size):.3f}")

    model = get_peft_model(model, lora_config(model, r=16))
    model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    batches = data["train"].shuffle(seed=0).iter(args.batch_size)
    model.train()
    for step in tqdm(range(args.steps), desc="LoRA"):
        batch = next(batches)["input_ids"]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    print(f"converted ({args.variant}), step {args.steps}: held-out loss {mean_loss(model, data['test'], args.batch_size):.3f}")
    model.save_pretrained(args.out)
    print(f"adapter saved to {args.out}")


if __name__ == "__main__":
    main()
