"""The AttnVariantLlama family with softmax attention is LlamaForCausalLM: parity, generation, training features."""

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

import hf_attn_variants
from hf_attn_variants import AttnVariantLlamaConfig, AttnVariantLlamaForCausalLM, AttnVariantLlamaModel
from hf_attn_variants.testing import tiny_config_kwargs


def build_pair(attn_implementation="sdpa", dtype=torch.float32, **overrides):
    """A stock Llama and a family model holding the same weights."""
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**tiny_config_kwargs(**overrides), attn_implementation=attn_implementation))
    family = AttnVariantLlamaForCausalLM(
        AttnVariantLlamaConfig(**tiny_config_kwargs(**overrides), attn_implementation=attn_implementation)
    )
    missing, unexpected = family.load_state_dict(llama.state_dict(), strict=True)
    assert not missing and not unexpected
    return llama.to(dtype).eval(), family.to(dtype).eval()


def random_ids(batch=2, length=11, seed=1):
    return torch.randint(3, 99, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_import_registers_auto_classes():
    config = AutoConfig.for_model("attn_variant_llama", **tiny_config_kwargs())
    assert isinstance(config, AttnVariantLlamaConfig)
    assert isinstance(AutoModel.from_config(config), AttnVariantLlamaModel)
    assert isinstance(AutoModelForCausalLM.from_config(config), AttnVariantLlamaForCausalLM)
    assert hf_attn_variants.__version__


def test_config_accepts_every_llama_field():
    llama = LlamaConfig(**tiny_config_kwargs(rope_scaling={"rope_type": "linear", "factor": 2.0}, mlp_bias=True))
    family = AttnVariantLlamaConfig(**llama.to_dict())
    for key, value in llama.to_dict().items():
        if key not in ("model_type", "architectures", "transformers_version", "auto_map"):
            assert getattr(family, key) == value, key
    assert family.attention_variant == "softmax" and family.rope_enabled and not family.layer_shortcut


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(hidden_size=30), r"`num_attention_heads`=4 must divide `hidden_size`=30"),
        (dict(num_key_value_heads=3), r"`num_key_value_heads`=3 must divide `num_attention_heads`=4"),
        (dict(hidden_size=0), r"`hidden_size` must be a positive integer, got 0"),
        (dict(num_hidden_layers=-1), r"`num_hidden_layers` must be a positive integer, got -1"),
        (dict(attention_variant="linear"), r"`attention_variant`='linear' is not supported"),
        (dict(stickbreaking_remainder="rest"), r"`stickbreaking_remainder`='rest' is not supported.*'value'"),
        (dict(rope_max_wavelength=0), r"`rope_max_wavelength` must be a positive number or None, got 0"),
        (dict(rope_max_wavelength="8192"), r"`rope_max_wavelength` must be a positive number or None, got '8192'"),
    ],
)
def test_config_rejects_contradictions(overrides, message):
    with pytest.raises(ValueError, match=message):
        AttnVariantLlamaConfig(**tiny_config_kwargs(**overrides))


def test_unknown_attn_implementation_raises_transformers_error():
    # transformers' own message: its contract, checked by its common tests.
    with pytest.raises(ValueError, match=r'`attn_implementation="flashy"` is not supported'):
        AttnVariantLlamaForCausalLM(AttnVariantLlamaConfig(**tiny_config_kwargs(), attn_implementation="flashy"))


def test_parameter_names_equal_llama():
    llama, family = build_pair()
    assert list(llama.state_dict()) == list(family.state_dict())


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("tie_word_embeddings", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize(
    "rope_scaling",
    [None, {"rope_type": "linear", "factor": 2.0}, {"rope_type": "dynamic", "factor": 2.0}],
    ids=["rope", "linear", "dynamic"],
)
def test_logits_equal_stock_llama(attn_implementation, tie_word_embeddings, rope_scaling):
    llama, family = build_pair(attn_implementation, tie_word_embeddings=tie_word_embeddings, rope_scaling=rope_scaling)
    ids = random_ids()
    with torch.no_grad():
        expected, actual = llama(ids).logits, family(ids).logits
    assert (expected - actual).abs().max().item() <= 1e-5
    if tie_word_embeddings:
        assert family.lm_head.weight.data_ptr() == family.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_greedy_generate_equals_stock_llama(attn_implementation):
    llama, family = build_pair(attn_implementation)
    ids = random_ids(batch=1, length=6)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(llama.generate(ids, **kwargs), family.generate(ids, **kwargs))


def test_left_padded_batch_generate_equals_unpadded_rows():
    _, family = build_pair("sdpa")
    rows = [random_ids(1, 7, seed=2)[0], random_ids(1, 4, seed=3)[0]]
    width = max(len(r) for r in rows)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    batched = family.generate(ids, attention_mask=mask, **kwargs)
    for i, row in enumerate(rows):
        alone = family.generate(row[None], **kwargs)
        assert torch.equal(batched[i, width:], alone[0, len(row) :])


def test_sampling_and_beam_search_run():
    _, family = build_pair("sdpa")
    ids = random_ids(batch=2, length=5)
    sampled = family.generate(ids, max_new_tokens=5, do_sample=True, top_k=10, pad_token_id=0)
    beams = family.generate(ids, max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
    assert sampled.shape == beams.shape == (2, 10)


def test_gradient_checkpointing_gives_the_same_gradients():
    _, family = build_pair("sdpa")
    family.train()
    ids = random_ids()

    def gradients():
        family.zero_grad()
        family(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in family.named_parameters()}

    plain = gradients()
    family.gradient_checkpointing_enable()
    assert family.is_gradient_checkpointing
    checkpointed = gradients()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_hidden_states_and_attentions_outputs():
    llama, family = build_pair("eager")
    ids = random_ids()
    with torch.no_grad():
        expected = llama(ids, output_hidden_states=True, output_attentions=True)
        actual = family(ids, output_hidden_states=True, output_attentions=True)
    assert len(actual.hidden_states) == 3 and len(actual.attentions) == 2
    for e, a in zip(expected.hidden_states + expected.attentions, actual.hidden_states + actual.attentions):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_dtypes(dtype):
    llama, family = build_pair("sdpa", dtype=dtype)
    ids = random_ids()
    with torch.no_grad():
        expected, actual = llama(ids).logits, family(ids).logits
    assert actual.dtype == dtype
    assert torch.equal(expected, actual)


def test_from_pretrained_dtype_and_state_dict_round_trip(tmp_path):
    _, family = build_pair("sdpa", tie_word_embeddings=True)
    family.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert isinstance(reloaded, AttnVariantLlamaForCausalLM) and reloaded.dtype == torch.bfloat16
    ids = random_ids()
    with torch.no_grad():
        expected = family(ids).logits
        for name, param in family.named_parameters():
            assert torch.equal(reloaded.get_parameter(name), param.to(torch.bfloat16)), name
        # Weights are identical; the logits differ only by bf16 rounding of the activations.
        torch.testing.assert_close(reloaded(ids).logits.float(), expected, rtol=0.05, atol=0.02)


def test_rope_max_wavelength_leaves_long_wavelengths_unrotated(tmp_path):
    """p-RoPE: frequencies with a wavelength above the limit get cos 1 / sin 0; the others are Llama's exactly."""
    head_dim = tiny_config_kwargs()["hidden_size"] // tiny_config_kwargs()["num_attention_heads"]
    llama, family = build_pair(rope_theta=10000.0)
    wavelengths = 2 * torch.pi / family.model.rotary_emb.inv_freq
    limit = float(wavelengths.sort().values[head_dim // 4])  # keeps the shortest quarter + 1 of the wavelengths
    limited = AttnVariantLlamaForCausalLM(
        AttnVariantLlamaConfig(**tiny_config_kwargs(rope_theta=10000.0), rope_max_wavelength=limit)
    ).eval()
    limited.load_state_dict(family.state_dict())
    x, positions = torch.zeros(1), torch.arange(50)[None]
    cos, sin = limited.model.rotary_emb(x, positions)
    ref_cos, ref_sin = llama.model.rotary_emb(x, positions)
    rotated = (wavelengths <= limit).repeat(2)
    assert 0 < int(rotated.sum()) < head_dim
    torch.testing.assert_close(cos[..., rotated], ref_cos[..., rotated], rtol=0, atol=0)
    torch.testing.assert_close(sin[..., rotated], ref_sin[..., rotated], rtol=0, atol=0)
    assert bool((cos[..., ~rotated] == 1).all()) and bool((sin[..., ~rotated] == 0).all())
    ids = random_ids(length=40)
    # unrotated dimensions are position-free: the logits differ from plain RoPE, and a limit above every
    # wavelength is plain RoPE exactly
    assert not torch.allclose(limited(ids).logits, family(ids).logits)
    limited.config.rope_max_wavelength = float(wavelengths.max()) * 2
    torch.testing.assert_close(limited(ids).logits, llama(ids).logits, rtol=0, atol=0)
    limited.config.rope_max_wavelength = limit
    limited.save_pretrained(tmp_path)
    reloaded = AttnVariantLlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.rope_max_wavelength == limit
    torch.testing.assert_close(reloaded(ids).logits, limited(ids).logits, rtol=0, atol=0)
