"""Stick-breaking as the family's token attention: selection, config round trip, NoPE, cache, padding."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_attn_variants import AttnVariantLlamaConfig, AttnVariantLlamaForCausalLM
from hf_attn_variants.models.attn_variant_llama.stickbreaking_torch import naive_stickbreaking_attn
from hf_attn_variants.testing import tiny_config_kwargs


def stickbreaking_model(**overrides):
    torch.manual_seed(0)
    config = AttnVariantLlamaConfig(**tiny_config_kwargs(attention_variant="stickbreaking", **overrides))
    return AttnVariantLlamaForCausalLM(config).eval()


def test_attn_implementation_name_selects_stickbreaking_and_is_saved(tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**tiny_config_kwargs())).save_pretrained(tmp_path / "llama")
    model = AttnVariantLlamaForCausalLM.from_pretrained(tmp_path / "llama", attn_implementation="stickbreaking")
    assert model.config._attn_implementation == "stickbreaking"
    assert model.config.attention_variant == "stickbreaking" and not model.config.rope_enabled
    model.save_pretrained(tmp_path / "sb")
    saved = json.loads((tmp_path / "sb" / "config.json").read_text())
    assert saved["attention_variant"] == "stickbreaking" and saved["stickbreaking_remainder"] == "none"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sb")  # no attn_implementation named
    # `attention_variant` says what is computed; the default implementation ("sdpa") runs the fast stick-breaking op.
    assert reloaded.config.attention_variant == "stickbreaking" and reloaded.config._attn_implementation == "sdpa"
    ids = torch.randint(3, 99, (1, 8))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_stickbreaking_needs_no_positions():
    """NoPE: stretching the position ids leaves the logits unchanged (the stick order encodes position).

    A constant shift would not do: RoPE is invariant to it too. Stretching changes relative distances."""
    model = stickbreaking_model()
    ids = torch.randint(3, 99, (1, 10))
    with torch.no_grad():
        base = model(ids, position_ids=torch.arange(10)[None]).logits
        shifted = model(ids, position_ids=torch.arange(10)[None] * 3).logits
    assert torch.equal(base, shifted)


def test_use_rope_keeps_rotary_embeddings():
    model = stickbreaking_model(use_rope=True)
    ids = torch.randint(3, 99, (1, 10))
    with torch.no_grad():
        base = model(ids, position_ids=torch.arange(10)[None]).logits
        shifted = model(ids, position_ids=torch.arange(10)[None] * 3).logits
    assert model.config.rope_enabled and not torch.allclose(base, shifted)


def test_layer_uses_the_stickbreaking_formula():
    """One attention layer's output equals the float64 reference applied to its projected q, k, v."""
    model = stickbreaking_model(stickbreaking_attend_current=True).double()
    attention = model.model.layers[0].self_attn
    hidden = torch.randn(2, 7, 32, dtype=torch.float64)
    with torch.no_grad():
        out, _ = attention(hidden, attention_mask=None)
        shape = (2, 7, -1, attention.head_dim)
        q, k, v = (proj(hidden).view(shape).transpose(1, 2) for proj in (attention.q_proj, attention.k_proj, attention.v_proj))
        o, _ = naive_stickbreaking_attn(q, k, v, scale=attention.scaling, attend_current=True)
        expected = attention.o_proj(o.transpose(1, 2).reshape(2, 7, -1))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("remainder", ["none", "value", "bias"])
@pytest.mark.parametrize("attend_current", [False, True])
def test_cache_generate_equals_full_forward(remainder, attend_current):
    model = stickbreaking_model(stickbreaking_remainder=remainder, stickbreaking_attend_current=attend_current)
    if remainder == "bias":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.stickbreaking_remainder_bias.normal_()
    ids = torch.randint(3, 99, (2, 6))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = model.generate(ids, use_cache=True, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    with torch.no_grad():  # chunked prefill over a cache equals the full forward at the same positions
        full = model(cached).logits
        first = model(cached[:, :9], use_cache=True)
        rest = model(cached[:, 9:], past_key_values=first.past_key_values).logits
    torch.testing.assert_close(rest, full[:, 9:], rtol=1e-5, atol=1e-5)


def test_left_padded_batch_equals_unpadded_rows():
    model = stickbreaking_model(stickbreaking_remainder="value")
    long, short = torch.randint(3, 99, (1, 9)), torch.randint(3, 99, (1, 5))
    ids = torch.cat([long, torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1)])
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(batched[0], model(long).logits[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batched[1, 4:], model(short).logits[0], rtol=1e-5, atol=1e-5)
        assert torch.isfinite(batched).all()


def test_packed_sequences_do_not_see_each_other():
    """Two documents in one row, marked by restarting position_ids, equal the two documents run alone."""
    model = stickbreaking_model()
    first, second = torch.randint(3, 99, (1, 6)), torch.randint(3, 99, (1, 5))
    packed = torch.cat([first, second], 1)
    position_ids = torch.cat([torch.arange(6), torch.arange(5)])[None]
    with torch.no_grad():
        logits = model(packed, position_ids=position_ids, use_cache=False).logits
        torch.testing.assert_close(logits[:, :6], model(first).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits[:, 6:], model(second).logits, rtol=1e-5, atol=1e-5)


def test_stock_llama_drop_in_keeps_rope():
    """`attn_implementation="stickbreaking"` on stock LlamaForCausalLM: RoPE stays, module scaling, j < i."""
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**tiny_config_kwargs(), attn_implementation="stickbreaking")).eval()
    ids = torch.randint(3, 99, (1, 8))
    with torch.no_grad():
        logits = llama(ids).logits
        shifted = llama(ids, position_ids=torch.arange(8)[None] * 3).logits
    assert torch.isfinite(logits).all() and not torch.allclose(logits, shifted)


def test_gradient_checkpointing_and_bf16():
    model = stickbreaking_model(stickbreaking_remainder="bias").train()
    model.gradient_checkpointing_enable()
    ids = torch.randint(3, 99, (2, 8))
    model(ids, labels=ids).loss.backward()
    assert model.model.layers[0].self_attn.stickbreaking_remainder_bias.grad.abs().sum() > 0
    model = model.to(torch.bfloat16).eval()
    with torch.no_grad():
        assert model(ids).logits.dtype == torch.bfloat16


def test_triton_backend_matches_torch_backend_in_the_model(monkeypatch):
    """The model dispatches to the Triton kernels when asked (here in Triton's CPU interpreter): same logits and
    gradients as the PyTorch path, on a left-padded GQA batch."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    import hf_attn_variants.ops.stickbreaking as triton_ops

    calls = []
    kernel = triton_ops.parallel_stickbreaking_attn
    monkeypatch.setattr(triton_ops, "parallel_stickbreaking_attn", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    ids = torch.randint(3, 99, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    results = {}
    for backend in ("torch", "triton"):
        model = stickbreaking_model(stickbreaking_backend=backend, stickbreaking_remainder="value").train()
        loss = model(ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        results[backend] = (loss.detach(), model.model.layers[0].self_attn.q_proj.weight.grad)
    assert len(calls) == 2  # one call per layer, all from the "triton" run
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["triton"][1], results["torch"][1], rtol=1e-4, atol=1e-6)
