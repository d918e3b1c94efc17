"""Write the variant configs of this folder (see README.md)."""

import os

from hf_attn_variants import AttnVariantLlamaConfig
from hf_attn_variants.testing import tiny_config_kwargs

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = {
    "softmax": {},
    "stickbreaking": {"attention_variant": "stickbreaking"},
    "shortcut-depth": {"layer_shortcut": True, "shortcut_mode": "depth"},
    "shortcut-depth-context": {"layer_shortcut": True, "shortcut_mode": "depth_context"},
    "stickbreaking-shortcut": {"attention_variant": "stickbreaking", "layer_shortcut": True},
}
SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
)
SIZES = {"tiny": tiny_config_kwargs(hidden_size=64, intermediate_size=128, num_hidden_layers=3), "smollm2-135m": SMOLLM2_135M}

if __name__ == "__main__":
    for size, base in SIZES.items():
        for variant, options in VARIANTS.items():
            AttnVariantLlamaConfig(**base, **options).to_json_file(os.path.join(HERE, f"{size}-{variant}.json"))
