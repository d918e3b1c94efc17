"""Layerwise attention shortcuts (Verma & Pilanci, arXiv 2409.10870): function preservation, cache, masking, training,
remote code, plotting."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM

from hf_attn_variants import AttnVariantLlamaConfig, AttnVariantLlamaForCausalLM
from hf_attn_variants.models.attn_variant_llama import modeling_attn_variant_llama
from hf_attn_variants.models.attn_variant_llama.layer_shortcut import (
    AttnVariantLlamaLayerShortcut,
    AttnVariantLlamaShortcutCache,
    apply_rope,
)
from hf_attn_variants.testing import remote_code_logits, tiny_config_kwargs

MODES = ["depth", "depth_context"]
STICKBREAKING_FILE = os.path.join(os.path.dirname(modeling_attn_variant_llama.__file__), "stickbreaking_torch.py")
needs_stickbreaking = pytest.mark.skipif(
    not os.path.exists(STICKBREAKING_FILE), reason="stickbreaking_torch.py (written by another engineer) is missing"
)


def shortcut_kwargs(mode, **overrides):
    """Tiny 3-layer config with a shortcut reading layers 0 and 1 (the final layer is 2)."""
    return tiny_config_kwargs(**{"num_hidden_layers": 3, "layer_shortcut": True, "shortcut_mode": mode, **overrides})


def build_model(mode, active=True, dtype=torch.float32, seed=0, **overrides):
    """A shortcut model; `active` gives o_proj and q_proj large random weights so the shortcut changes the logits."""
    torch.manual_seed(seed)
    model = AttnVariantLlamaForCausalLM(AttnVariantLlamaConfig(**shortcut_kwargs(mode, **overrides)))
    if active:
        with torch.no_grad():
            model.model.shortcut.o_proj.weight.normal_(std=0.3)
            model.model.shortcut.q_proj.weight.normal_(std=0.3)
    return model.to(dtype).eval()


def random_ids(batch=2, length=9, seed=1):
    return torch.randint(3, 99, (batch, length), generator=torch.Generator().manual_seed(seed))


def shortcut_parameters(model):
    return {name: p for name, p in model.named_parameters() if ".shortcut." in name}


# --- function preservation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_fresh_shortcut_leaves_logits_bit_identical(mode, dtype):
    torch.manual_seed(0)
    plain = AttnVariantLlamaForCausalLM(AttnVariantLlamaConfig(**tiny_config_kwargs(num_hidden_layers=3)))
    with_shortcut = AttnVariantLlamaForCausalLM(AttnVariantLlamaConfig(**shortcut_kwargs(mode)))
    missing, unexpected = with_shortcut.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".shortcut." in key for key in missing)
    assert with_shortcut.model.shortcut.o_proj.weight.count_nonzero() == 0  # survived post_init's re-initialisation
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(plain.to(dtype)(ids).logits, with_shortcut.to(dtype)(ids).logits)
        with_shortcut.model.shortcut.o_proj.weight.normal_(std=0.3)
        logits = with_shortcut(ids).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()


@pytest.mark.parametrize("mode", MODES)
def test_retrofit_llama_checkpoint_by_attn_implementation_name(mode, tmp_path):
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**tiny_config_kwargs(num_hidden_layers=3))).eval()
    llama.save_pretrained(tmp_path / "llama")
    model = AttnVariantLlamaForCausalLM.from_pretrained(
        tmp_path / "llama", attn_implementation="shortcut", shortcut_mode=mode
    ).eval()
    assert model.config.layer_shortcut and model.config.shortcut_mode == mode
    assert model.model.shortcut.o_proj.weight.count_nonzero() == 0
    assert model.model.shortcut.q_proj.weight.count_nonzero() > 0  # only o_proj is zero: no saddle point
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(llama(ids).logits, model(ids).logits)

    model.save_pretrained(tmp_path / "retrofit")
    saved = json.loads((tmp_path / "retrofit" / "config.json").read_text())
    assert saved["layer_shortcut"] is True and saved["shortcut_mode"] == mode
    reloaded = AttnVariantLlamaForCausalLM.from_pretrained(tmp_path / "retrofit").eval()
    assert reloaded.model.shortcut is not None
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


@needs_stickbreaking
@pytest.mark.parametrize("mode", MODES)
def test_shortcut_on_stickbreaking_model_is_function_preserving(mode, tmp_path):
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**tiny_config_kwargs(num_hidden_layers=3))).eval()
    llama.save_pretrained(tmp_path)
    stickbreaking = AttnVariantLlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="stickbreaking").eval()
    combined = AttnVariantLlamaForCausalLM.from_pretrained(
        tmp_path, attn_implementation="stickbreaking", layer_shortcut=True, shortcut_mode=mode
    ).eval()
    assert combined.config.attention_variant == "stickbreaking" and combined.model.shortcut is not None
    assert not combined.config.rope_enabled and combined.model.shortcut.rotary_emb is None
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(stickbreaking(ids).logits, combined(ids).logits)
        with torch.no_grad():
            combined.model.shortcut.o_proj.weight.normal_(std=0.3)
        assert torch.isfinite(combined(ids).logits).all()


# --- training --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, overrides, steps_until_all",
    [
        ("depth", {}, 2),
        ("depth_context", {}, 2),
        # Two zero-initialised Linears in a chain (o_proj, then the feature MLP's output): one more step.
        ("depth_context", {"shortcut_feature_mlp": True}, 3),
    ],
    ids=["depth", "depth_context", "feature_mlp"],
)
def test_gradients_reach_every_shortcut_parameter(mode, overrides, steps_until_all):
    model = build_model(mode, active=False, **overrides).train()
    parameters = shortcut_parameters(model)
    optimizer = torch.optim.SGD(parameters.values(), lr=0.5)
    ids = random_ids()
    reached = set()
    for step in range(1, steps_until_all + 1):
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        reached |= {name for name, p in parameters.items() if p.grad is not None and p.grad.count_nonzero() > 0}
        if step == 1:
            assert "model.shortcut.o_proj.weight" in reached
        optimizer.step()
    assert reached == set(parameters), sorted(set(parameters) - reached)


@pytest.mark.parametrize("mode", MODES)
def test_activation_checkpointing_gives_the_same_gradients(mode):
    model = build_model(mode).train()
    ids = random_ids()

    def gradients():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain = gradients()
    model.gradient_checkpointing_enable()
    assert model.model.shortcut.gradient_checkpointing
    checkpointed = gradients()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


# --- exactness of the depth_context merge ----------------------------------------------------------------------------


def naive_shortcut(shortcut, hidden_states, sources, attention_mask, position_ids):
    """Reference: one softmax over the concatenation of all sources' keys (|S| * T) under a block-causal mask."""
    batch, length, hidden_size = hidden_states.shape
    heads = (batch, length, shortcut.num_heads, shortcut.head_dim)
    kv_heads = (batch, length, shortcut.num_kv_heads, shortcut.head_dim)
    groups = shortcut.num_heads // shortcut.num_kv_heads  # grouped-query attention: head h reads kv head h // groups
    query = shortcut.q_proj(shortcut.query_norm(hidden_states)).view(heads).transpose(1, 2)
    features = shortcut.source_features(tuple(sources), hidden_states.device).unbind(dim=2)
    keys = [shortcut.k_proj(f).view(kv_heads).transpose(1, 2).repeat_interleave(groups, dim=1) for f in features]
    values = [shortcut.v_proj(f).view(kv_heads).transpose(1, 2).repeat_interleave(groups, dim=1) for f in features]
    if shortcut.mode == "depth":
        scores = torch.stack([(query * key).sum(-1) for key in keys], dim=-1) * shortcut.scaling
        output = (scores.softmax(-1)[..., None] * torch.stack(values, dim=-2)).sum(-2)
    else:
        if shortcut.rotary_emb is not None:
            cos, sin = shortcut.rotary_emb(query, position_ids)
            query, keys = apply_rope(query, cos, sin), [apply_rope(key, cos, sin) for key in keys]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        mask = causal[None, None] & attention_mask[:, None, None, :].bool()
        scores = query @ torch.cat(keys, dim=2).transpose(-1, -2) * shortcut.scaling
        scores = scores.masked_fill(~torch.cat([mask] * len(keys), dim=-1), float("-inf"))
        output = scores.softmax(-1) @ torch.cat(values, dim=2)
    return hidden_states + shortcut.o_proj(output.transpose(1, 2).reshape(batch, length, hidden_size))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(shortcut_feature_mlp=True, shortcut_num_heads=2, shortcut_num_key_value_heads=2),
        dict(shortcut_feature_mlp=True, shortcut_num_heads=4, shortcut_num_key_value_heads=2),  # GQA, feature MLPs
        dict(shortcut_num_heads=4, shortcut_num_key_value_heads=1),  # GQA, the folded source norm of `depth`
        dict(shortcut_normalize_sources=False),  # model default: 4 heads, 2 key/value heads
    ],
    ids=["mha_mlp", "gqa_mlp", "mqa_norm", "gqa_plain"],
)
@pytest.mark.parametrize("grad", [True, False], ids=["autograd_path", "inference_path"])
@pytest.mark.parametrize("mode", MODES)
def test_shortcut_equals_naive_concatenated_attention_in_float64(mode, grad, overrides):
    config = AttnVariantLlamaConfig(**shortcut_kwargs(mode, **overrides))
    torch.manual_seed(0)
    shortcut = AttnVariantLlamaLayerShortcut(config).double()
    for parameter in shortcut.parameters():  # every weight non-trivial, including the zero-initialised ones
        torch.nn.init.normal_(parameter, std=0.3)
    batch, length = 2, 7
    hidden_states = torch.randn(batch, length, config.hidden_size, dtype=torch.float64)
    sources = [torch.randn_like(hidden_states) * scale for scale in (1.0, 5.0)]
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[1, :3] = 0  # left padding: those queries are skipped below (they see no key)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    with torch.set_grad_enabled(grad):  # inference may take a fused kernel, training must stay differentiable
        actual, _ = shortcut(hidden_states, *sources, attention_mask=attention_mask, position_ids=position_ids)
    expected = naive_shortcut(shortcut, hidden_states, sources, attention_mask, position_ids)
    real = attention_mask.bool()
    torch.testing.assert_close(actual[real], expected[real], rtol=0, atol=1e-10)
    assert torch.isfinite(actual).all()


# --- cache and generation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [None, 4, 1], ids=["default_kv", "mha", "mqa"])
@pytest.mark.parametrize("mode", MODES)
def test_incremental_decoding_with_cache_equals_full_forward(mode, kv_heads):
    model = build_model(mode, dtype=torch.float64, shortcut_num_key_value_heads=kv_heads)
    shortcut = model.model.shortcut
    expected_kv_heads = kv_heads or 2  # None: the model's 4 heads / 2 key/value heads
    assert shortcut.num_kv_heads == expected_kv_heads
    assert shortcut.k_proj.weight.shape == shortcut.v_proj.weight.shape == (expected_kv_heads * 8, 32)
    assert shortcut.q_proj.weight.shape == shortcut.o_proj.weight.shape == (32, 32)
    ids = random_ids(length=10)
    with torch.no_grad():
        full = model(ids).logits
        prefix = model(ids[:, :6], use_cache=True)
        cache = prefix.past_key_values
        expected_class = AttnVariantLlamaShortcutCache if mode == "depth_context" else DynamicCache
        assert type(cache) is expected_class
        steps = [prefix.logits]
        for t in range(6, 10):
            steps.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-12)
    if mode == "depth_context":
        # One cache layer per decoder layer (transformers' contract); the shortcut's sources sit beside them.
        assert len(cache.layers) == 3 and len(cache.shortcut_cache.layers) == 2
        assert cache.shortcut_cache.layers[0].get_seq_length() == 10 == cache.get_seq_length()
        shortcut_layers = cache.shortcut_cache.layers
        assert shortcut_layers[0].keys.shape == shortcut_layers[1].values.shape == (2, expected_kv_heads, 10, 8)


def test_crop_keeps_shortcut_cache_consistent():
    model = build_model("depth_context", dtype=torch.float64)
    ids = random_ids(length=10)
    with torch.no_grad():
        full = model(ids).logits
        cache = model(ids[:, :8], use_cache=True).past_key_values
        cache.crop(-3)
        assert all(layer.get_seq_length() == 5 for layer in [*cache.layers, *cache.shortcut_cache.layers])
        resumed = model(ids[:, 5:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(resumed, full[:, 5:], rtol=0, atol=1e-12)


@pytest.mark.parametrize("cache_factory", [lambda config: DynamicCache(config=config), lambda config: DynamicCache()])
def test_cache_without_shortcut_slots_is_rejected(cache_factory):
    model = build_model("depth_context", dtype=torch.float64)
    with torch.no_grad(), pytest.raises(ValueError, match="AttnVariantLlamaShortcutCache"):
        model(random_ids(length=6), past_key_values=cache_factory(model.config), use_cache=True)


@pytest.mark.parametrize("mode", MODES)
def test_generate_with_cache_equals_without(mode):
    model = build_model(mode, dtype=torch.float64)
    ids = random_ids(batch=2, length=5)
    greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **greedy), model.generate(ids, use_cache=False, **greedy))
    beams = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **beams), model.generate(ids, use_cache=False, **beams))
    sampled = model.generate(ids, max_new_tokens=4, do_sample=True, top_k=10, pad_token_id=0)
    assert sampled.shape == (2, 9)


@pytest.mark.parametrize("mode", MODES)
def test_left_padded_rows_equal_unpadded_runs(mode):
    model = build_model(mode, dtype=torch.float64)
    rows = [random_ids(1, 7, seed=2)[0], random_ids(1, 4, seed=3)[0]]
    width = max(len(row) for row in rows)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :], mask[i, width - len(row) :] = row, 1
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        batched_logits = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
    batched = model.generate(ids, attention_mask=mask, **greedy)
    for i, row in enumerate(rows):
        with torch.no_grad():
            alone = model(row[None]).logits[0]
        torch.testing.assert_close(batched_logits[i, width - len(row) :], alone, rtol=0, atol=1e-10)
        assert torch.equal(batched[i, width:], model.generate(row[None], **greedy)[0, len(row) :])


def test_packed_sequences_do_not_see_each_other():
    model = build_model("depth_context", dtype=torch.float64)
    first, second = random_ids(1, 5, seed=4), random_ids(1, 4, seed=5)
    packed = torch.cat([first, second], dim=1)
    position_ids = torch.cat([torch.arange(5), torch.arange(4)])[None]
    with torch.no_grad():
        # transformers detects packing only without a cache, so the token layers need use_cache=False too.
        logits = model(packed, position_ids=position_ids, use_cache=False).logits[0]
        torch.testing.assert_close(logits[:5], model(first).logits[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(logits[5:], model(second).logits[0], rtol=0, atol=1e-10)


def test_depth_context_is_causal():
    model = build_model("depth_context", dtype=torch.float64)
    ids = random_ids(batch=1, length=10)
    perturbed = ids.clone()
    perturbed[0, 6] = (ids[0, 6] + 7) % 96 + 3
    with torch.no_grad():
        original, changed = model(ids).logits, model(perturbed).logits
    assert torch.equal(original[:, :6], changed[:, :6])
    assert not torch.allclose(original[:, 6:], changed[:, 6:])


# --- outputs and configuration ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_output_attentions_has_one_entry_per_layer_and_the_shortcut_its_own_field(mode):
    model = build_model(mode, attn_implementation="eager")
    with torch.no_grad():
        outputs = model(random_ids(), output_attentions=True)
        without = model(random_ids())
    assert len(outputs.attentions) == 3 and outputs.attentions[0].shape == (2, 4, 9, 9)
    assert outputs.shortcut_attentions.shape == (2, 4, 9, 2)
    torch.testing.assert_close(outputs.shortcut_attentions.sum(-1), torch.ones(2, 4, 9))
    assert without.shortcut_attentions is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(shortcut_source_layers=[0, 5]), r"`shortcut_source_layers`=\[0, 5\].*invalid: \[5\]"),
        (dict(shortcut_source_layers=[2]), r"`shortcut_source_layers`=\[2\].*before the final layer 2.*invalid: \[2\]"),
        (dict(shortcut_mode="sideways"), r"`shortcut_mode`='sideways' is not supported"),
        (dict(shortcut_num_heads=5), r"`shortcut_num_heads`=5 must divide `hidden_size`=32"),
        (dict(shortcut_num_key_value_heads=3), r"`shortcut_num_key_value_heads`=3 must divide .*=4"),
        (dict(shortcut_num_heads=2, shortcut_num_key_value_heads=4), r"`shortcut_num_key_value_heads`=4 .*=2"),
        (dict(shortcut_num_key_value_heads=0), r"`shortcut_num_key_value_heads` must be a positive integer, got 0"),
    ],
)
def test_bad_shortcut_configuration_is_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        AttnVariantLlamaConfig(**shortcut_kwargs("depth", **overrides))


@pytest.mark.parametrize(
    "model_heads, model_kv_heads, shortcut_heads, expected",
    [(4, 2, None, 2), (4, 4, None, 4), (4, 1, None, 1), (4, 2, 8, 4), (4, 2, 2, 1), (4, 2, 1, 1), (9, 3, None, 3),
     (9, 3, 3, 1), (8, 4, 2, 1), (4, None, 2, 2)],
)
def test_default_shortcut_key_value_heads_keeps_the_model_ratio(model_heads, model_kv_heads, shortcut_heads, expected):
    config = AttnVariantLlamaConfig(
        **shortcut_kwargs(
            "depth",
            hidden_size=8 * model_heads,
            num_attention_heads=model_heads,
            num_key_value_heads=model_kv_heads,
            shortcut_num_heads=shortcut_heads,
        )
    )
    assert config.shortcut_num_key_value_heads is None and config.shortcut_key_value_heads == expected
    assert config.shortcut_heads % expected == 0


# --- remote code -----------------------------------------------------------------------------------------------------

@needs_stickbreaking  # the remote-code folder imports stickbreaking_torch.py
@pytest.mark.parametrize("mode", MODES)
def test_saved_model_reloads_as_remote_code_without_the_package(mode, tmp_path):
    model = build_model(mode)
    model.save_pretrained(tmp_path / "model")
    inputs = {"input_ids": random_ids()}
    child = remote_code_logits(str(tmp_path / "model"), inputs, str(tmp_path))  # package hidden, offline
    assert child["class"] == "AttnVariantLlamaForCausalLM"
    with torch.no_grad():
        assert torch.equal(child["logits"], model(**inputs).logits)


# --- plotting --------------------------------------------------------------------------------------------------------


def test_plot_helper_writes_a_png_that_depends_on_the_text(tmp_path):
    matplotlib_image = pytest.importorskip("matplotlib.image")
    from hf_attn_variants.plotting import plot_shortcut_attention

    model = build_model("depth")

    def character_tokenizer(text):
        return [3 + ord(character) % 90 for character in text]

    images = []
    for name, text in [("a", "hello world"), ("b", "shortcuts!!")]:
        path = tmp_path / f"{name}.png"
        attention = plot_shortcut_attention(model, character_tokenizer, text, path)
        assert attention.shape == (2, len(text))
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        images.append(matplotlib_image.imread(path))
    assert images[0].shape == images[1].shape and not (images[0] == images[1]).all()
    head = plot_shortcut_attention(model, character_tokenizer, "hello", tmp_path / "head.png", head=1)
    torch.testing.assert_close(torch.from_numpy(head).sum(0), torch.ones(5))


def test_differentiable_attention_with_log_normaliser_passes_gradcheck():
    from hf_attn_variants.models.attn_variant_llama.layer_shortcut import attention_with_log_normaliser

    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 2, 4, 3, dtype=torch.float64, generator=generator) for _ in range(3))
    mask = torch.ones(4, 4, dtype=torch.bool).tril()[None, None]

    def attention(query, key, value):
        return attention_with_log_normaliser(query, key, value, mask, scaling=0.7)

    assert torch.autograd.gradcheck(attention, (query.requires_grad_(), key.requires_grad_(), value.requires_grad_()))
