"""Continuous batching: transformers' `generate_batch` and `ContinuousBatchingManager` (what `transformers serve
--continuous-batching` runs) hand the model many requests packed into one row over a `PagedAttentionCache`.

- every variant that can run paged gives generate()'s greedy tokens, token for token: prompts of different lengths
  spanning several cache pages, prompts split over several forwards (chunked prefill), different max_new_tokens,
  requests that join while others decode, and the checkpoint run as remote code without the package;
- the paged stick-breaking function equals the float64 reference applied per request (varlen, GQA, rows with no
  visible key, padding rows), on every backend;
- the `depth_context` shortcut is refused once, when batching starts.
"""

import json
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from hf_attn_variants import AttnVariantLlamaConfig, AttnVariantLlamaForCausalLM
from hf_attn_variants.models.attn_variant_llama.stickbreaking_torch import (
    eager_paged_stickbreaking_attention_forward,
    naive_stickbreaking_attn,
    paged_stickbreaking_attention_forward,
)
from hf_attn_variants.testing import VARIANTS, run_remote_code_child, tiny_config_kwargs

VOCAB = 99
# Pages of 4 tokens (transformers' minimum), so prompts span several; at most 8 tokens per forward, so the longer
# prompts are prefilled in chunks whose queries attend to their own earlier keys in the cache.
CB_CONFIG = dict(page_size=4, num_blocks=64, max_batch_tokens=8)
PROMPT_LENGTHS = (3, 14, 6, 9)

# Variants that run paged, by how they are asked for: "eager" becomes continuous batching's "paged|eager" (the
# stick-breaking reference), and the "stickbreaking" name the fast op under continuous batching's "sdpa".
CB_VARIANTS = {
    "softmax": VARIANTS["softmax"],
    "softmax_eager": dict(attn_implementation="eager"),
    "stickbreaking": VARIANTS["stickbreaking"],
    "stickbreaking_torch": dict(VARIANTS["stickbreaking"], stickbreaking_backend="torch"),
    "stickbreaking_eager": dict(VARIANTS["stickbreaking"], attn_implementation="eager"),
    "stickbreaking_named_value_attend_current": dict(
        VARIANTS["stickbreaking"],
        attn_implementation="stickbreaking",
        stickbreaking_remainder="value",
        stickbreaking_attend_current=True,
    ),
    "shortcut_depth": VARIANTS["shortcut_depth"],
    "stickbreaking_shortcut_depth": dict(VARIANTS["stickbreaking_shortcut"], shortcut_mode="depth"),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(variant_options: dict, seed: int = 0) -> AttnVariantLlamaForCausalLM:
    """A tiny random model whose weights are spread wide (logits far from ties, so greedy tokens are a stable check)."""
    config = AttnVariantLlamaConfig(**tiny_config_kwargs(eos_token_id=None, **variant_options))
    torch.manual_seed(seed)
    model = AttnVariantLlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):  # the shortcut's zero-init output too: it contributes
                module.weight.normal_(0.0, 0.3, generator=generator)
    return model


def _prompts(lengths=PROMPT_LENGTHS) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(3, VOCAB, (length,), generator=generator).tolist() for length in lengths]


def _greedy(max_new_tokens: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)


def _generate(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """generate()'s greedy tokens for one prompt alone (no padding): the reference."""
    with torch.no_grad():
        output = model.generate(torch.tensor([prompt]), generation_config=_greedy(max_new_tokens))
    return output[0, len(prompt) :].tolist()


@pytest.mark.parametrize("variant", list(CB_VARIANTS))
def test_generate_batch_equals_generate(variant):
    model = _model(CB_VARIANTS[variant])
    implementation = model.config._attn_implementation
    prompts = _prompts()
    results = model.generate_batch(
        prompts, generation_config=_greedy(7), continuous_batching_config=ContinuousBatchingConfig(**CB_CONFIG)
    )
    assert [result.error for result in results.values()] == [None] * len(prompts)
    assert [result.generated_tokens for result in results.values()] == [_generate(model, p, 7) for p in prompts]
    assert model.config._attn_implementation == implementation  # restored when the manager stops


@pytest.mark.parametrize("variant", ["softmax", "stickbreaking", "shortcut_depth"])
def test_manager_requests_join_while_others_decode(variant):
    """The manager API: a long request decodes while shorter ones (other lengths and max_new_tokens) join it."""
    model = _model(CB_VARIANTS[variant])
    prompts = _prompts((5, 11, 2))
    max_new_tokens = (24, 3, 9)
    manager = model.init_continuous_batching(
        generation_config=_greedy(4), continuous_batching_config=ContinuousBatchingConfig(**CB_CONFIG)
    )
    if variant == "stickbreaking":
        assert manager.continuous_batching_config.auto_switch_to_flash is False  # flash cannot run stick-breaking
    manager.start()
    try:
        first = manager.add_request(
            prompts[0], max_new_tokens=max_new_tokens[0], streaming=True, record_timestamps=True
        )
        for partial in manager.request_id_iter(first):
            if len(partial.generated_tokens) >= 2:
                break
        later = [
            manager.add_request(prompt, max_new_tokens=n, record_timestamps=True)
            for prompt, n in zip(prompts[1:], max_new_tokens[1:])
        ]
        results = {}
        for request_id in (first, *later):
            for result in manager.request_id_iter(request_id):
                results[request_id] = result
    finally:
        manager.stop(block=True)
    for request_id, prompt, n in zip((first, *later), prompts, max_new_tokens):
        assert results[request_id].error is None
        assert results[request_id].is_finished()
        assert results[request_id].generated_tokens == _generate(model, prompt, n)
    # The later requests really ran while the first was still decoding.
    assert max(results[request_id].timestamps[0] for request_id in later) < results[first].timestamps[-1]


@pytest.mark.parametrize("variant", ["shortcut_depth_context", "stickbreaking_shortcut"])
def test_depth_context_shortcut_is_refused_once_when_batching_starts(variant):
    model = _model(VARIANTS[variant])
    message = r"cannot run the `shortcut_mode`='depth_context' layer shortcut.*generate\(\), or .*shortcut_mode='depth'"
    with pytest.raises(ValueError, match=message):
        model.init_continuous_batching(generation_config=_greedy(3))
    with pytest.raises(ValueError, match=message):
        model.generate_batch(_prompts(), generation_config=_greedy(3))
    assert model.config._attn_implementation == "sdpa"


def test_stickbreaking_refuses_cuda_graphs_once():
    model = _model(CB_VARIANTS["stickbreaking"])
    with pytest.raises(ValueError, match="stick-breaking attention cannot run in CUDA graphs"):
        model.init_continuous_batching(
            generation_config=_greedy(3), continuous_batching_config=ContinuousBatchingConfig(use_cuda_graph=True)
        )


_REMOTE_CODE_BATCHING_CHILD = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

model_dir, prompts, cb_config, out_path = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
greedy = GenerationConfig(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
results = model.generate_batch(
    prompts, generation_config=greedy, continuous_batching_config=ContinuousBatchingConfig(**cb_config)
)
with torch.no_grad():
    generated = [model.generate(torch.tensor([p]), generation_config=greedy)[0, len(p):].tolist() for p in prompts]
assert not any(m.startswith("hf_attn_variants") for m in sys.modules), "hf_attn_variants leaked into the child"
json.dump({"errors": [r.error for r in results.values()], "batched": [r.generated_tokens for r in results.values()],
           "generated": generated}, open(out_path, "w"))
"""


@pytest.mark.parametrize("variant", ["softmax", "stickbreaking"])
def test_generate_batch_as_remote_code(tmp_path, variant, monkeypatch):
    """The saved checkpoint batches in a process that cannot import the package (its copied files alone)."""
    model = _model(CB_VARIANTS[variant])
    model.save_pretrained(tmp_path / "model")
    prompts = _prompts()
    out_path = tmp_path / "out.json"
    run_remote_code_child(
        _REMOTE_CODE_BATCHING_CHILD,
        [str(tmp_path / "model"), json.dumps(prompts), json.dumps(CB_CONFIG), str(out_path)],
        str(tmp_path),
    )
    child = json.loads(out_path.read_text())
    assert child["errors"] == [None] * len(prompts)
    assert child["batched"] == child["generated"]
    monkeypatch.setenv("HF_ATTN_VARIANTS_SB_BACKEND", "torch")  # the child's path: the package's kernels are hidden
    assert child["generated"] == [_generate(model, prompt, 6) for prompt in prompts]


# ----------------------------------------------------------------------------------------------------------------------
# The paged stick-breaking function against the float64 reference, per request
# ----------------------------------------------------------------------------------------------------------------------

# (past keys, new queries) per request. Past 0 with attend_current=False: the first query sees no key (o = 0,
# rem = 1). (0, 1): a request whose only row sees nothing; (4, 0): a request with nothing to compute this step.
MIXED_REQUESTS = [(0, 5), (7, 1), (3, 4), (4, 0), (0, 1), (12, 2)]
PREFILL_REQUESTS = [(0, 5), (0, 1), (0, 7)]  # no past keys, no padding: one varlen call on the Triton backend


def _packed(requests, padding, dtype, seed=0):
    """Packed query [1, HQ, total_q + padding, D] and keys/values [1, H, total_k + padding, D] of GQA requests, with
    cu_seq_lens that plateau over the padding (as continuous batching pads)."""
    generator = torch.Generator().manual_seed(seed)
    HQ, H, D, Dv = 4, 2, 8, 6
    total_q = sum(q for _, q in requests) + padding
    total_k = sum(p + q for p, q in requests) + padding
    query = torch.randn(1, HQ, total_q, D, generator=generator, dtype=torch.float64)
    key = torch.randn(1, H, total_k, D, generator=generator, dtype=torch.float64)
    value = torch.randn(1, H, total_k, Dv, generator=generator, dtype=torch.float64)
    cu_q, cu_k = [0], [0]
    for past, new in requests:
        cu_q.append(cu_q[-1] + new)
        cu_k.append(cu_k[-1] + past + new)
    if padding:
        cu_q.append(cu_q[-1])
        cu_k.append(cu_k[-1])
    cu = lambda bounds: torch.tensor(bounds, dtype=torch.int32)  # noqa: E731
    return query.to(dtype), key.to(dtype), value.to(dtype), cu(cu_q), cu(cu_k)


def _reference(query, key, value, cu_q, cu_k, scale, attend_current, remainder):
    """naive_stickbreaking_attn in float64 over each request's own keys; padding rows zero; weights block-diagonal."""
    query, key, value = query.double(), key.double(), value.double()
    output = torch.zeros(1, query.shape[2], query.shape[1], value.shape[-1], dtype=torch.float64)
    weights = torch.zeros(1, query.shape[1], query.shape[2], key.shape[2], dtype=torch.float64)
    groups = query.shape[1] // key.shape[1]
    for q0, q1, k0, k1 in zip(cu_q.tolist(), cu_q.tolist()[1:], cu_k.tolist(), cu_k.tolist()[1:]):
        if q1 == q0:
            continue
        o, rem, w = naive_stickbreaking_attn(
            query[:, :, q0:q1], key[:, :, k0:k1], value[:, :, k0:k1], scale=scale, attend_current=attend_current,
            return_weights=True,
        )
        if remainder == "value":  # the leftover stick goes to the query's own value
            own_value = value[:, :, k1 - (q1 - q0) : k1].repeat_interleave(groups, dim=1)
            o = o + rem[..., None] * own_value
        output[:, q0:q1] = o.transpose(1, 2)
        weights[:, :, q0:q1, k0:k1] = w
    return output, weights


def _module(backend, attend_current, remainder):
    return SimpleNamespace(config=SimpleNamespace(
        stickbreaking_backend=backend, stickbreaking_attend_current=attend_current, stickbreaking_remainder=remainder
    ))


@pytest.mark.parametrize("requests", [MIXED_REQUESTS, PREFILL_REQUESTS], ids=["mixed", "prefill"])
@pytest.mark.parametrize("remainder", ["none", "value"])
@pytest.mark.parametrize("attend_current", [False, True])
@pytest.mark.parametrize("backend", ["torch", "auto", "triton"])
def test_paged_stickbreaking_matches_float64_reference_per_request(backend, attend_current, remainder, requests):
    if backend == "triton":
        pytest.importorskip("triton")
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    dtype = torch.float32 if backend == "triton" else torch.float64  # Triton's dots take no float64
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    padding = 0 if requests is PREFILL_REQUESTS else 3
    query, key, value, cu_q, cu_k = (t.to(device) for t in _packed(requests, padding, dtype))
    scale = 0.7
    expected, _ = _reference(query, key, value, cu_q, cu_k, scale, attend_current, remainder)
    output, weights = paged_stickbreaking_attention_forward(
        _module(backend, attend_current, remainder), query, key, value, None, scaling=scale,
        cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k,
    )
    assert weights is None and output.dtype == dtype and output.shape == expected.shape
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(output.cpu().double(), expected, **tolerance)


@pytest.mark.parametrize("attend_current", [False, True])
def test_eager_paged_stickbreaking_returns_the_references_weights(attend_current):
    query, key, value, cu_q, cu_k = _packed(MIXED_REQUESTS, 3, torch.float64)
    expected, expected_weights = _reference(query, key, value, cu_q, cu_k, 0.7, attend_current, "none")
    output, weights = eager_paged_stickbreaking_attention_forward(
        _module("auto", attend_current, "none"), query, key, value, None, scaling=0.7,
        cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k,
    )
    torch.testing.assert_close(output, expected, rtol=0, atol=0)
    torch.testing.assert_close(weights, expected_weights, rtol=0, atol=0)


@pytest.mark.parametrize(
    "cu_q, cu_k, message",
    [
        (None, [0, 3], "needs `cu_seq_lens_q` and `cu_seq_lens_k`"),
        ([0, 3], [0, 2], r"queries \[0, 3\) and keys \[0, 2\)"),
        ([0, 2, 3], [0, 3], "must both start at 0 and match"),
    ],
)
def test_paged_stickbreaking_refuses_inconsistent_packing(cu_q, cu_k, message):
    query, key, value, _, _ = _packed([(0, 3)], 0, torch.float64)
    to_tensor = lambda bounds: None if bounds is None else torch.tensor(bounds)  # noqa: E731
    with pytest.raises(ValueError, match=message):
        paged_stickbreaking_attention_forward(
            _module("torch", False, "none"), query, key, value, None, cu_seq_lens_q=to_tensor(cu_q),
            cu_seq_lens_k=to_tensor(cu_k),
        )


# ----------------------------------------------------------------------------------------------------------------------
# Softmax on CPU: SDPA per packed request instead of all packed keys under a block-diagonal mask
# ----------------------------------------------------------------------------------------------------------------------


def test_paged_softmax_per_request_equals_sdpa_over_the_block_diagonal_mask():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from hf_attn_variants.models.attn_variant_llama.modeling_attn_variant_llama import paged_sdpa_per_request_forward

    query, key, value, cu_q, cu_k = _packed(MIXED_REQUESTS, 3, torch.float64)
    mask = torch.zeros(1, 1, query.shape[2], key.shape[2], dtype=torch.bool)  # what continuous batching builds
    rows = []
    for q0, q1, k0, k1 in zip(cu_q.tolist(), cu_q.tolist()[1:], cu_k.tolist(), cu_k.tolist()[1:]):
        for i in range(q1 - q0):  # query i of a request sits at key position (k1 - k0) - (q1 - q0) + i, sees it too
            mask[0, 0, q0 + i, k0 : k1 - (q1 - q0) + i + 1] = True
        rows += range(q0, q1)
    module = SimpleNamespace(num_key_value_groups=query.shape[1] // key.shape[1], is_causal=True)
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.7)
    output, weights = paged_sdpa_per_request_forward(
        module, query, key, value, mask, scaling=0.7, cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k
    )
    assert weights is None and output.shape == expected.shape
    torch.testing.assert_close(output[:, rows], expected[:, rows], rtol=1e-12, atol=1e-12)
    assert output[:, len(rows) :].eq(0).all()  # padding rows


def test_softmax_continuous_batching_runs_sdpa_per_request_on_cpu():
    from hf_attn_variants.models.attn_variant_llama.modeling_attn_variant_llama import paged_sdpa_per_request_forward

    model = _model(CB_VARIANTS["softmax"])
    attention = model.model.layers[0].self_attn
    assert attention.attention_function(paged=True) is paged_sdpa_per_request_forward
    assert attention.attention_function(paged=False) is not paged_sdpa_per_request_forward
    model.set_attn_implementation("eager")  # continuous batching's "paged|eager": transformers' own
    assert attention.attention_function(paged=True) is not paged_sdpa_per_request_forward
