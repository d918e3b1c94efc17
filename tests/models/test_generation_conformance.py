"""Generation conformance of every variant: what transformers' `GenerationTesterMixin` checks, on tiny random models.

- greedy / sampling (fixed seed) / beam search give the same sequences with and without the cache, and greedy equals
  the argmax of full forwards;
- a left-padded batch equals each row generated alone (and its last-token logits equal the unpadded row's);
- `output_scores` / `output_logits` / `output_attentions` / `output_hidden_states` with `return_dict_in_generate=True`
  have the right lengths and shapes, equal between cache and no cache, and the logits are the model's;
- assisted decoding (an identical or a different assistant model, or prompt lookup) equals greedy;
- generation continues from a returned cache, and from `inputs_embeds`;
- cache classes: the default `DynamicCache`, a cache object the user passes (dynamic or static) and
  `cache_implementation="static"` all equal the default.

Weights are drawn with a large spread (and the shortcut's zero-initialised output projection too, so the shortcut
contributes), which keeps the logits far from ties: exact sequence equality is then a stable check in float32.
"""

import copy
import functools

import pytest
import torch
from torch import nn
from transformers import DynamicCache, StaticCache
from transformers.modeling_outputs import BaseModelOutputWithPast

from hf_attn_variants import AttnVariantLlamaConfig, AttnVariantLlamaForCausalLM
from hf_attn_variants.models.attn_variant_llama import layer_shortcut
from hf_attn_variants.testing import VARIANTS

VOCAB, PAD, BOS = 99, 0, 1
PROMPT_LEN, NEW_TOKENS = 5, 6
# transformers 5.24 renamed the cache argument and output field `past_key_values` -> `cache`.
CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"

pytestmark = [pytest.mark.parametrize("variant", list(VARIANTS)), pytest.mark.usefixtures("one_torch_thread")]


@functools.cache
def _model(variant: str, seed: int = 0, attn_implementation: str | None = None) -> AttnVariantLlamaForCausalLM:
    """A tiny random model of the variant (shared between tests: generate never changes it)."""
    config = AttnVariantLlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=None,  # never stop early: every row generates exactly max_new_tokens
        tie_word_embeddings=False,
        attn_implementation=attn_implementation,
        **VARIANTS[variant],
    )
    torch.manual_seed(seed)
    model = AttnVariantLlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, 0.3, generator=generator)
    return model


def _prompts(batch: int = 3, length: int = PROMPT_LEN, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _generate(model, input_ids, **kwargs):
    kwargs.setdefault("max_new_tokens", NEW_TOKENS)
    kwargs.setdefault("do_sample", False)
    with torch.no_grad():
        return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)


def _cache_of(output):
    return output[CACHE_NAME]


def _source_room_caches(model):
    """(dynamic, static) cache classes a user passes for this model: a `depth_context` shortcut needs the family's."""
    if model.config.layer_shortcut and model.config.shortcut_mode == "depth_context":
        return layer_shortcut.AttnVariantLlamaShortcutCache, layer_shortcut.AttnVariantLlamaShortcutStaticCache
    return DynamicCache, StaticCache


# ---------------------------------------------------------------------------------------------------------------------
# Decoding strategies: cache and no cache agree
# ---------------------------------------------------------------------------------------------------------------------


def test_greedy_cache_equals_no_cache_and_full_forward_argmax(variant):
    model, prompts = _model(variant), _prompts()
    cached = _generate(model, prompts, use_cache=True)
    uncached = _generate(model, prompts, use_cache=False)
    assert cached.shape == (3, PROMPT_LEN + NEW_TOKENS)
    assert torch.equal(cached[:, :PROMPT_LEN], prompts)
    torch.testing.assert_close(cached, uncached, rtol=0, atol=0)

    sequence = prompts
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            next_token = model(sequence).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    torch.testing.assert_close(cached, sequence, rtol=0, atol=0)


def test_sampling_with_seed_cache_equals_no_cache(variant):
    model, prompts = _model(variant), _prompts()
    sampled = {}
    for use_cache in (True, False):
        torch.manual_seed(1234)
        sampled[use_cache] = _generate(model, prompts, do_sample=True, top_k=20, temperature=0.9, use_cache=use_cache)
    torch.testing.assert_close(sampled[True], sampled[False], rtol=0, atol=0)
    torch.manual_seed(4321)
    other_seed = _generate(model, prompts, do_sample=True, top_k=20, temperature=0.9)
    assert not torch.equal(other_seed, sampled[True]), "sampling ignored the seed"


def test_beam_search_cache_equals_no_cache(variant):
    model, prompts = _model(variant), _prompts()
    outputs = {
        use_cache: _generate(
            model,
            prompts,
            num_beams=3,
            num_return_sequences=2,
            use_cache=use_cache,
            return_dict_in_generate=True,
            output_scores=True,
        )
        for use_cache in (True, False)
    }
    cached, uncached = outputs[True], outputs[False]
    assert cached.sequences.shape == (3 * 2, PROMPT_LEN + NEW_TOKENS)
    torch.testing.assert_close(cached.sequences, uncached.sequences, rtol=0, atol=0)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, rtol=1e-5, atol=1e-5)
    assert len(cached.scores) == NEW_TOKENS and all(s.shape == (3 * 3, VOCAB) for s in cached.scores)
    assert cached.beam_indices.shape[0] == 3 * 2


# ---------------------------------------------------------------------------------------------------------------------
# Left padding
# ---------------------------------------------------------------------------------------------------------------------


def _left_padded(rows):
    longest = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), longest), PAD)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, longest - len(row) :] = row
        attention_mask[i, longest - len(row) :] = 1
    return input_ids, attention_mask


def test_left_padded_batch_equals_rows_alone(variant):
    model = _model(variant)
    prompts = _prompts(batch=3, length=7, seed=3)
    rows = [prompts[0, :3], prompts[1, :7], prompts[2, :5]]
    input_ids, attention_mask = _left_padded(rows)

    with torch.no_grad():
        last_logits = model(input_ids, attention_mask=attention_mask).logits[:, -1]
        for i, row in enumerate(rows):
            alone = model(row[None]).logits[:, -1]
            torch.testing.assert_close(last_logits[i : i + 1], alone, rtol=1e-4, atol=1e-4, msg=f"row {i} logits")

    for use_cache in (True, False):
        with torch.no_grad():
            batch = model.generate(
                input_ids,
                attention_mask=attention_mask,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                use_cache=use_cache,
            )
        for i, row in enumerate(rows):
            alone = _generate(model, row[None], use_cache=use_cache)
            torch.testing.assert_close(
                batch[i, input_ids.shape[1] :], alone[0, len(row) :], rtol=0, atol=0, msg=f"row {i}, cache={use_cache}"
            )


# ---------------------------------------------------------------------------------------------------------------------
# Output fields of return_dict_in_generate
# ---------------------------------------------------------------------------------------------------------------------


def test_scores_and_logits_shapes_and_cache_equivalence(variant):
    model, prompts = _model(variant), _prompts()
    outputs = {
        use_cache: _generate(
            model, prompts, use_cache=use_cache, return_dict_in_generate=True, output_scores=True, output_logits=True
        )
        for use_cache in (True, False)
    }
    cached = outputs[True]
    for output in outputs.values():
        assert len(output.scores) == len(output.logits) == NEW_TOKENS
        assert all(t.shape == (3, VOCAB) for t in (*output.scores, *output.logits))
    for field in ("scores", "logits"):
        for step, (a, b) in enumerate(zip(getattr(cached, field), getattr(outputs[False], field))):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{field}[{step}]")

    # The raw logits are the model's next-token logits, and greedy picks their argmax.
    with torch.no_grad():
        for step in range(NEW_TOKENS):
            prefix = cached.sequences[:, : PROMPT_LEN + step]
            expected = model(prefix).logits[:, -1]
            torch.testing.assert_close(cached.logits[step], expected, rtol=1e-5, atol=1e-5, msg=f"logits[{step}]")
            assert torch.equal(cached.scores[step].argmax(-1), cached.sequences[:, PROMPT_LEN + step])


def test_attentions_and_hidden_states_outputs(variant):
    model, prompts = _model(variant, attn_implementation="eager"), _prompts()
    config = model.config
    heads, layers, hidden = config.num_attention_heads, config.num_hidden_layers, config.hidden_size
    outputs = {
        use_cache: _generate(
            model,
            prompts,
            use_cache=use_cache,
            return_dict_in_generate=True,
            output_attentions=True,
            output_hidden_states=True,
        )
        for use_cache in (True, False)
    }
    for use_cache, output in outputs.items():
        assert len(output.attentions) == len(output.hidden_states) == NEW_TOKENS
        for step in range(NEW_TOKENS):
            keys = PROMPT_LEN + step
            queries = (PROMPT_LEN if step == 0 else 1) if use_cache else keys
            assert len(output.attentions[step]) == layers, f"one attention map per decoder layer (step {step})"
            for attention in output.attentions[step]:
                assert attention.shape == (3, heads, queries, keys), (use_cache, step)
            assert len(output.hidden_states[step]) == layers + 1
            for states in output.hidden_states[step]:
                assert states.shape == (3, queries, hidden), (use_cache, step)
    # The last query row of each step is the same with and without the cache.
    for step in range(NEW_TOKENS):
        for cached, uncached in zip(outputs[True].attentions[step], outputs[False].attentions[step]):
            torch.testing.assert_close(cached[:, :, -1], uncached[:, :, -1], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Assisted decoding
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("assistant", ["same_model", "other_model", "prompt_lookup"])
def test_assisted_decoding_equals_greedy(variant, assistant):
    model = _model(variant)
    # A prompt that repeats itself gives prompt lookup candidates to verify.
    prompt = _prompts(batch=1, length=4, seed=5).repeat(1, 3)
    greedy = _generate(model, prompt, max_new_tokens=10)
    if assistant == "prompt_lookup":
        kwargs = {"prompt_lookup_num_tokens": 3}
    else:
        # An identical assistant has every candidate accepted; another one has some rejected (the cache is cropped).
        kwargs = {"assistant_model": copy.deepcopy(_model(variant, seed=0 if assistant == "same_model" else 7))}
    assisted = _generate(model, prompt, max_new_tokens=10, **kwargs)
    torch.testing.assert_close(assisted, greedy, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Caches
# ---------------------------------------------------------------------------------------------------------------------


def test_default_cache_is_dynamic(variant):
    model, prompts = _model(variant), _prompts()
    output = _generate(model, prompts, return_dict_in_generate=True)
    cache = _cache_of(output)
    assert isinstance(cache, DynamicCache)
    assert type(cache) is _source_room_caches(model)[0]
    assert len(cache) == model.config.num_hidden_layers
    # The last generated token has not been fed back yet.
    assert cache.get_seq_length() == PROMPT_LEN + NEW_TOKENS - 1


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_user_passed_cache_equals_default(variant, kind):
    model, prompts = _model(variant), _prompts()
    default = _generate(model, prompts)
    dynamic_class, static_class = _source_room_caches(model)
    if kind == "dynamic":
        cache = dynamic_class(config=model.config)
    else:
        cache = static_class(config=model.config, max_cache_len=PROMPT_LEN + NEW_TOKENS)
    output = _generate(model, prompts, return_dict_in_generate=True, **{CACHE_NAME: cache})
    torch.testing.assert_close(output.sequences, default, rtol=0, atol=0)
    assert _cache_of(output) is cache, "generate must fill the cache it was given"
    assert cache.get_seq_length() == PROMPT_LEN + NEW_TOKENS - 1


def test_static_cache_implementation_equals_dynamic(variant):
    model, prompts = _model(variant), _prompts()
    dynamic = _generate(model, prompts, return_dict_in_generate=True, output_logits=True)
    static = _generate(model, prompts, return_dict_in_generate=True, output_logits=True, cache_implementation="static")
    assert isinstance(_cache_of(static), StaticCache)
    torch.testing.assert_close(static.sequences, dynamic.sequences, rtol=0, atol=0)
    for step, (a, b) in enumerate(zip(static.logits, dynamic.logits)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"logits[{step}]")


def test_depth_context_refuses_cache_without_source_room(variant):
    model, prompts = _model(variant), _prompts()
    if _source_room_caches(model)[0] is DynamicCache:
        pytest.skip("only a depth_context shortcut keeps extra keys/values in the cache")
    for cache in (DynamicCache(config=model.config), StaticCache(config=model.config, max_cache_len=16)):
        with pytest.raises(ValueError, match="depth_context"):
            _generate(model, prompts, **{CACHE_NAME: cache})


def test_continue_from_returned_cache(variant):
    model, prompts = _model(variant), _prompts()
    full = _generate(model, prompts, max_new_tokens=2 * NEW_TOKENS)
    first = _generate(model, prompts, return_dict_in_generate=True)
    with torch.no_grad():
        continued = model.generate(
            first.sequences,
            attention_mask=torch.ones_like(first.sequences),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            **{CACHE_NAME: _cache_of(first)},
        )
    torch.testing.assert_close(continued, full, rtol=0, atol=0)


def test_generate_from_inputs_embeds(variant):
    model, prompts = _model(variant), _prompts()
    from_ids = _generate(model, prompts)
    with torch.no_grad():
        from_embeds = model.generate(
            inputs_embeds=model.get_input_embeddings()(prompts),
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
        )
    # With only `inputs_embeds`, generate returns the new tokens alone.
    torch.testing.assert_close(from_embeds, from_ids[:, PROMPT_LEN:], rtol=0, atol=0)
