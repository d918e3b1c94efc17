"""Stand-in for transformers' `tests/generation/test_utils.py` (not in the sdist).

`ModelTesterMixin.test_generation_tester_mixin_inheritance` requires a model that can `generate` to have a tester
inheriting `GenerationTesterMixin`. The family's generation conformance (greedy / sampling / beam search with and
without cache, left padding, scores and logits, assisted decoding, cache classes) is covered by our own
`tests/models/test_generation_conformance.py`; this stand-in only keeps upstream's cache-format check, which needs the
model tester's sizes.
"""

import torch
from transformers.cache_utils import Cache
from transformers.testing_utils import torch_device


class GenerationTesterMixin:
    def test_past_key_values_format(self):
        """A forward with `use_cache=True` returns a `Cache` of `num_hidden_layers` layers whose keys and values are
        (batch, num_key_value_heads, seq_len, head_dim), as transformers' generation utilities assume."""
        for model_class in self.all_generative_model_classes:
            config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
            text_config = config.get_text_config(decoder=True)
            num_layers = text_config.num_hidden_layers
            num_heads = text_config.num_attention_heads
            kv_heads = getattr(text_config, "num_key_value_heads", None) or num_heads
            head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads
            batch, seq_len = inputs["input_ids"].shape

            model = model_class(config).to(torch_device).eval()
            with torch.no_grad():
                outputs = model(**inputs, use_cache=True)
            # transformers 5.24 renamed the output field `past_key_values` -> `cache` (reading the old one warns).
            cache = outputs["cache" if "cache" in type(outputs).__dataclass_fields__ else "past_key_values"]
            self.assertIsInstance(cache, Cache)
            self.assertEqual(len(cache), num_layers, f"{model_class.__name__}: cache layers != num_hidden_layers")
            for layer_idx, layer in enumerate(cache.layers):
                for name in ("keys", "values"):
                    self.assertEqual(
                        tuple(getattr(layer, name).shape),
                        (batch, kv_heads, seq_len, head_dim),
                        f"{model_class.__name__}: layer {layer_idx} {name}",
                    )
