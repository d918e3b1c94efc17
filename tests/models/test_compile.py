"""`torch.compile(fullgraph=True)` of a tiny stick-breaking model on CPU: prefill, decode steps with the dynamic and
the static cache, and a training step trace without a graph break (the package's C++ kernels are torch.library
custom ops) and equal eager. Compiling on CPU needs a C++ compiler; each test compiles once (tens of seconds)."""

import shutil

import pytest
import torch
from transformers import DynamicCache, StaticCache

from hf_attn_variants import AttnVariantLlamaConfig, AttnVariantLlamaForCausalLM
from hf_attn_variants.models.attn_variant_llama.stickbreaking_torch import cpu_kernels_compile_fullgraph
from hf_attn_variants.testing import VARIANTS, tiny_config_kwargs

T, MAX_CACHE = 20, 32  # T > 16: the prefill runs the C++ forward op (up to 16 queries take the decode op)

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="torch.compile on CPU needs a C++ compiler")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)


def require_kernels():
    if not cpu_kernels_compile_fullgraph():
        pytest.skip("the package's C++ CPU kernels are unavailable (HF_ATTN_VARIANTS_CPU_KERNEL=0 or no build)")


def tiny_model(variant="stickbreaking", **overrides):
    torch.manual_seed(0)
    config = AttnVariantLlamaConfig(**tiny_config_kwargs(**VARIANTS[variant], **overrides))
    return AttnVariantLlamaForCausalLM(config).eval()


def inputs():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 99, (2, T), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in one row
    return ids, mask


def test_can_compile_fullgraph_follows_the_kernels():
    require_kernels()
    assert AttnVariantLlamaForCausalLM._can_compile_fullgraph is True
    assert tiny_model()._can_compile_fullgraph is True
    assert tiny_model("softmax")._can_compile_fullgraph is True
    assert tiny_model(stickbreaking_backend="torch")._can_compile_fullgraph is False  # pure PyTorch breaks the graph


@pytest.mark.parametrize("remainder", ["none", "value"])
def test_prefill_compiles_fullgraph_and_equals_eager(remainder):
    require_kernels()
    model = tiny_model(stickbreaking_remainder=remainder)
    ids, mask = inputs()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_decode_step_compiles_fullgraph_and_equals_eager(cache_kind):
    """Prefill eagerly, then three compiled decode steps (fullgraph) against eager ones. The static cache's unfilled
    tail is rotated out of the way under compile (no data-dependent cut)."""
    require_kernels()
    model = tiny_model(stickbreaking_remainder="value")
    config = model.config
    ids, mask = inputs()

    def step(token, cache, position, step_mask):
        return model(token, past_key_values=cache, attention_mask=step_mask, cache_position=position,
                     use_cache=True).logits

    compiled_step = torch.compile(step, fullgraph=True)
    logits = {}
    for name, function in (("eager", step), ("compiled", compiled_step)):
        cache = DynamicCache(config=config) if cache_kind == "dynamic" else StaticCache(config=config,
                                                                                         max_cache_len=MAX_CACHE)
        outputs = []
        with torch.no_grad():
            model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            for i in range(3):
                step_mask = torch.cat([mask, torch.ones(2, i + 1, dtype=mask.dtype)], 1)
                if cache_kind == "static":
                    step_mask = torch.cat([step_mask, step_mask.new_zeros(2, MAX_CACHE - step_mask.shape[1])], 1)
                outputs.append(function(torch.full((2, 1), 5 + i), cache, torch.tensor([T + i]), step_mask))
        logits[name] = torch.stack(outputs)
    torch.testing.assert_close(logits["compiled"], logits["eager"], rtol=1e-5, atol=1e-6)


def test_training_step_compiles_fullgraph_and_equals_eager():
    """Forward + backward through the C++ forward op and its registered autograd (the C++ backward op)."""
    require_kernels()
    model = tiny_model().train()
    ids, mask = inputs()
    labels = torch.randint(3, 99, ids.shape, generator=torch.Generator().manual_seed(2))
    loss = model(ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    compiled_loss = compiled(ids, attention_mask=mask, labels=labels).loss
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)
