"""transformers contracts that user code relies on: switching the attention implementation after loading, the static
cache, strict config fields, the classification heads."""

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    DynamicCache,
    StaticCache,
)

from hf_attn_variants import AttnVariantLlamaConfig, AttnVariantLlamaForCausalLM
from hf_attn_variants.models.attn_variant_llama.layer_shortcut import AttnVariantLlamaShortcutStaticCache
from hf_attn_variants.models.attn_variant_llama.modeling_attn_variant_llama import (
    AttnVariantLlamaForSequenceClassification,
    AttnVariantLlamaForTokenClassification,
)
from hf_attn_variants.models.attn_variant_llama.stickbreaking_torch import naive_stickbreaking_attn
from hf_attn_variants.testing import VARIANTS, tiny_config_kwargs



def build(seed=0, attn_implementation=None, **options):
    torch.manual_seed(seed)
    config = AttnVariantLlamaConfig(**tiny_config_kwargs(num_hidden_layers=3, **options))
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    model = AttnVariantLlamaForCausalLM(config).eval()
    if model.model.shortcut is not None:  # a trained shortcut, so it changes the logits
        with torch.no_grad():
            model.model.shortcut.o_proj.weight.normal_(std=0.3)
    return model


def ids(batch=2, length=8, seed=1):
    return torch.randint(3, 99, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, input_ids, **kwargs):
    with torch.no_grad():
        return model(input_ids, **kwargs).logits


def prefill_then_decode(model, input_ids, cache, prefill=5):
    """Logits of a prefill of `prefill` tokens into `cache`, then of one token at a time, concatenated."""
    with torch.no_grad():
        steps = [model(input_ids[:, :prefill], past_key_values=cache, use_cache=True).logits]
        for t in range(prefill, input_ids.shape[1]):
            steps.append(model(input_ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(steps, dim=1)


# --- switching after load ----------------------------------------------------------------------------------------------


def test_switching_softmax_to_stickbreaking_and_between_implementations_equals_built_models():
    switched = build()
    built = build(attention_variant="stickbreaking")
    built.load_state_dict(switched.state_dict())
    x = ids()

    switched.set_attn_implementation("stickbreaking")
    assert switched.config.attention_variant == "stickbreaking" and not switched.config.rope_enabled
    assert torch.equal(logits(switched, x), logits(built, x))

    # "eager" and "sdpa" say how stick-breaking runs: the reference (with weights) or the blockwise op.
    switched.set_attn_implementation("eager")
    built_eager = build(attention_variant="stickbreaking", attn_implementation="eager")
    built_eager.load_state_dict(switched.state_dict())
    torch.testing.assert_close(logits(switched, x), logits(built_eager, x), rtol=0, atol=0)
    torch.testing.assert_close(logits(switched, x), logits(built, x), rtol=1e-5, atol=1e-5)
    switched.set_attn_implementation("sdpa")
    assert switched.config.attention_variant == "stickbreaking"
    assert torch.equal(logits(switched, x), logits(built, x))

    # Back to softmax is an explicit config change.
    switched.config.attention_variant = "softmax"
    assert torch.equal(logits(switched, x), logits(build(), x))


@pytest.mark.parametrize("start, target", [("eager", "sdpa"), ("sdpa", "eager")])
def test_switching_softmax_backends_equals_built_models(start, target):
    model = build(attn_implementation=start)
    model.set_attn_implementation(target)
    assert model.config._attn_implementation == target
    torch.testing.assert_close(logits(model, ids()), logits(build(attn_implementation=target), ids()))


@pytest.mark.parametrize("variant", ["softmax", "stickbreaking"])
def test_switching_to_shortcut_builds_a_function_preserving_shortcut(variant):
    model = build(**VARIANTS[variant])
    before = logits(model, ids())
    model.set_attn_implementation("shortcut")
    assert model.config.layer_shortcut and model.model.shortcut is not None
    assert not model.model.shortcut.o_proj.weight.any()
    assert torch.equal(logits(model, ids()), before)
    assert model.config.attention_variant == VARIANTS[variant].get("attention_variant", "softmax")


def test_stickbreaking_refuses_backends_that_cannot_run_it():
    model = build(attention_variant="stickbreaking")
    with pytest.raises(ValueError, match="'flex_attention' cannot run stick-breaking.*'eager', 'sdpa', 'stickbreaking'"):
        model.set_attn_implementation("flex_attention")
    assert model.config._attn_implementation == "sdpa"  # unchanged


def test_unknown_implementation_changes_nothing():
    model = build()
    with pytest.raises(ValueError, match="flashy"):
        model.set_attn_implementation("flashy")
    assert model.config.attention_variant == "softmax" and model.config._attn_implementation == "sdpa"


def test_eager_stickbreaking_returns_the_reference_weights():
    model = build(attention_variant="stickbreaking", attn_implementation="eager").double()
    x = ids(length=6)
    with torch.no_grad():
        outputs = model(x, output_attentions=True)
    assert len(outputs.attentions) == 3
    weights = outputs.attentions[0]
    assert weights.shape == (2, 4, 6, 6)
    attention = model.model.layers[0].self_attn
    hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(x))
    shape = (2, 6, -1, attention.head_dim)
    q = attention.q_proj(hidden).view(shape).transpose(1, 2)
    k = attention.k_proj(hidden).view(shape).transpose(1, 2)
    v = attention.v_proj(hidden).view(shape).transpose(1, 2)
    _, _, reference = naive_stickbreaking_attn(q, k, v, scale=attention.scaling, return_weights=True)
    torch.testing.assert_close(weights, reference, rtol=0, atol=1e-12)
    assert torch.all(weights.sum(-1) <= 1 + 1e-12) and not weights.triu().any()  # j < i: strictly lower triangular


# --- static cache -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_static_cache_generation_equals_dynamic(variant):
    model = build(**VARIANTS[variant])
    x = ids(length=6)
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    greedy = dict(attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=0)
    dynamic = model.generate(x, **greedy)
    assert torch.equal(model.generate(x, cache_implementation="static", **greedy), dynamic)
    assert torch.equal(model.generate(x, use_cache=False, **greedy), dynamic)


@pytest.mark.parametrize("variant", ["softmax", "stickbreaking", "shortcut_depth"])
def test_user_static_cache_decoding_equals_full_forward(variant):
    model = build(**VARIANTS[variant])
    x = ids(length=9)
    cache = StaticCache(config=model.config, max_cache_len=16)
    torch.testing.assert_close(prefill_then_decode(model, x, cache), logits(model, x), rtol=1e-5, atol=1e-5)


def test_depth_context_static_cache_needs_the_shortcut_slots():
    model = build(**VARIANTS["shortcut_depth_context"])
    x = ids(length=9)
    with torch.no_grad(), pytest.raises(ValueError, match="AttnVariantLlamaShortcutStaticCache"):
        model(x, past_key_values=StaticCache(config=model.config, max_cache_len=16), use_cache=True)
    cache = AttnVariantLlamaShortcutStaticCache(config=model.config, max_cache_len=16)
    assert len(cache.layers) == model.config.num_hidden_layers
    torch.testing.assert_close(prefill_then_decode(model, x, cache), logits(model, x), rtol=1e-5, atol=1e-5)


def test_compiled_static_cache_decode_step_equals_eager():
    """The static cache is how users compile decoding; the step traces (graph breaks where the op needs them)."""
    model = build(attention_variant="stickbreaking")
    x = ids(batch=1, length=6)
    greedy = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, cache_implementation="static")
    expected = model.generate(x, **greedy)
    model.forward = torch.compile(model.forward, backend="eager")
    try:
        assert torch.equal(model.generate(x, **greedy), expected)
    finally:
        del model.forward
        torch._dynamo.reset()


def test_cache_has_one_layer_per_decoder_layer():
    for variant, options in VARIANTS.items():
        with torch.no_grad():
            cache = build(**options)(ids(), use_cache=True).past_key_values
        assert len(cache.layers) == 3 and len(cache) == 3, variant
        assert isinstance(cache, DynamicCache)


# --- strict config fields ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("layer_shortcut", "false"),
        ("use_rope", "no"),
        ("stickbreaking_attend_current", 1),
        ("shortcut_feature_mlp", "yes"),
        ("shortcut_normalize_sources", 0),
        ("query_key_norm", "true"),
        ("attention_qkv_bias", "false"),
    ],
)
def test_boolean_fields_reject_other_types(field, value):
    with pytest.raises(ValueError, match=rf"`{field}` must be .*bool.*got {value!r}"):
        AttnVariantLlamaConfig(**tiny_config_kwargs(num_hidden_layers=3, **{field: value}))


@pytest.mark.parametrize("value", [[1.7], [0, "1"], [True], 1])
def test_source_layers_reject_non_integers(value):
    with pytest.raises(ValueError, match=r"`shortcut_source_layers` must be a list of integer"):
        AttnVariantLlamaConfig(**tiny_config_kwargs(num_hidden_layers=3, layer_shortcut=True, shortcut_source_layers=value))


@pytest.mark.parametrize("value", ["1", True, float("nan"), -1.0])
def test_stickbreaking_scale_rejects_non_positive_numbers(value):
    with pytest.raises(ValueError, match=r"`stickbreaking_scale` must be a positive number"):
        AttnVariantLlamaConfig(**tiny_config_kwargs(stickbreaking_scale=value))


# --- classification heads ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["softmax", "stickbreaking_shortcut"])
def test_classification_heads_load_the_base_and_train(tmp_path, variant):
    model = build(**VARIANTS[variant])
    model.save_pretrained(tmp_path)
    x, mask = ids(), torch.ones(2, 8, dtype=torch.long)
    sequence = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    token = AutoModelForTokenClassification.from_pretrained(tmp_path, num_labels=5)
    assert isinstance(sequence, AttnVariantLlamaForSequenceClassification)
    assert isinstance(token, AttnVariantLlamaForTokenClassification)
    assert torch.equal(sequence.model.embed_tokens.weight, model.model.embed_tokens.weight)
    sequence_out = sequence(x, attention_mask=mask, labels=torch.tensor([0, 2]))
    token_out = token(x, attention_mask=mask, labels=torch.randint(0, 5, (2, 8)))
    assert sequence_out.logits.shape == (2, 3) and token_out.logits.shape == (2, 8, 5)
    (sequence_out.loss + token_out.loss).backward()
    assert sequence.score.weight.grad is not None and token.score.weight.grad is not None
