"""Tests for the PyTorch stick-breaking attention (reference, blockwise op) and its transformers glue. CPU only."""

import math
from types import SimpleNamespace

import pytest
import torch
import transformers
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from hf_attn_variants.models.attn_variant_llama import stickbreaking_torch
from hf_attn_variants.models.attn_variant_llama.stickbreaking_torch import (
    blockwise_stickbreaking_attn,
    naive_stickbreaking_attn,
    register_stickbreaking_attention,
    stickbreaking_attention_forward,
)


# Relative RMS error bounds, per dtype of the op under test, against a float64 reference.
TOLERANCES = {
    torch.float64: {"o": 1e-12, "rem": 1e-12, "dq": 1e-11, "dk": 1e-11, "dv": 1e-12},
    torch.float32: {"o": 1e-5, "rem": 1e-5, "dq": 1e-5, "dk": 1e-5, "dv": 1e-5},
}
QUANTITIES = ("o", "rem", "dq", "dk", "dv")


def relative_rms_error(ref, out):
    ref, out = ref.double(), out.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close(name, ref, out, tol):
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = relative_rms_error(ref, out)
    assert err <= tol, f"{name}: relative RMS error {err:.3e} > {tol:.1e}"


def make_qkv(B, HQ, H, Q, K, D, Dv=None, dtype=torch.float32, seed=0, std=1.0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, Q, D, generator=generator, dtype=torch.float64) * std
    k = torch.randn(B, H, K, D, generator=generator, dtype=torch.float64) * std
    v = torch.randn(B, H, K, Dv or D, generator=generator, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def outputs_and_grads(op, q, k, v, seed=1, cotangents=None, **kwargs):
    """Run `op`, backpropagate (do, drem) (random by default) through both outputs; return o, rem, dq, dk, dv."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o, rem = op(q, k, v, **kwargs)
    if cotangents is None:
        generator = torch.Generator().manual_seed(seed)
        cotangents = (torch.randn(o.shape, generator=generator, dtype=torch.float64),
                      torch.randn(rem.shape, generator=generator, dtype=torch.float64))
    do, drem = cotangents[0].to(o.dtype), cotangents[1].to(rem.dtype)
    dq, dk, dv = torch.autograd.grad([o, rem], [q, k, v], [do, drem])
    return {"o": o.detach(), "rem": rem.detach(), "dq": dq, "dk": dk, "dv": dv}


def causal_padding_mask(key_is_real, Q=None):
    """Bool (B, 1, Q, K) mask like transformers' sdpa_mask: causal (query i at key K - Q + i) and key not padding."""
    B, K = key_is_real.shape
    Q = Q or K
    causal = torch.arange(K)[None, :] <= torch.arange(K - Q, K)[:, None]
    return (causal[None] & key_is_real[:, None, :]).unsqueeze(1)


def brute_force_stickbreaking(q, k, v, scale, attend_current, visible):
    """Double loop straight from A_ij = beta_ij * prod_{j<l<i, l visible} (1 - beta_il), in float64."""
    B, HQ, Q, D = q.shape
    H, K = k.shape[1], k.shape[2]
    o = torch.zeros(B, HQ, Q, v.shape[-1], dtype=torch.float64)
    rem = torch.ones(B, HQ, Q, dtype=torch.float64)
    for b in range(B):
        for h in range(HQ):
            kv_head = h // (HQ // H)
            for i in range(Q):
                position = K - Q + i

                def sees(j):
                    in_band = j <= position if attend_current else j < position
                    return in_band and bool(visible[b, h, i, j])

                def beta(j):
                    return torch.sigmoid(scale * (q[b, h, i].double() @ k[b, kv_head, j].double()))

                for j in range(K):
                    if not sees(j):
                        continue
                    weight = beta(j)
                    for l in range(j + 1, K):
                        if sees(l):
                            weight = weight * (1 - beta(l))
                    o[b, h, i] += weight * v[b, kv_head, j].double()
                    rem[b, h, i] *= 1 - beta(j)
    return o, rem


@pytest.fixture(autouse=True)
def single_thread():
    """Shapes here are tiny; one thread keeps timings stable on a shared 2-core machine (2-thread ops stall there)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CPU_KERNELS = ("forward", "backward", "decode")


def pure_pytorch(monkeypatch):
    """Make the op run without the package's C++ kernels (what remote code without the package runs)."""
    for name in CPU_KERNELS:
        monkeypatch.setitem(stickbreaking_torch._CPU_KERNEL, name, None)


@pytest.fixture(params=["cpu_kernel", "torch"])
def forward_path(request, monkeypatch):
    """Run the op (forward, backward and decode) as the package's C++ kernels and as pure PyTorch."""
    if request.param == "torch":
        pure_pytorch(monkeypatch)
    else:
        from hf_attn_variants.ops.stickbreaking_cpu import ENV_VAR, enabled, forward_kernel

        if not enabled():
            pytest.skip(f"{ENV_VAR}=0")
        assert forward_kernel() is not None, "the C++ CPU kernel failed to build (see the logged warning)"
    return request.param


# ----------------------------------------------------------------------------------------------------------------------
# The reference against the product formula
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attend_current", [False, True], ids=["exclusive", "attend_current"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["causal", "masked"])
def test_naive_matches_brute_force_loop(attend_current, with_mask):
    B, HQ, H, Q, K, D, Dv = 2, 4, 2, 5, 7, 3, 2
    q, k, v = make_qkv(B, HQ, H, Q, K, D, Dv, dtype=torch.float64)
    visible = torch.ones(B, HQ, Q, K, dtype=torch.bool)
    if with_mask:
        visible = torch.rand(B, HQ, Q, K, generator=torch.Generator().manual_seed(3)) > 0.3
        visible[0, 1, 2] = False  # one fully masked row
    o, rem = naive_stickbreaking_attn(
        q, k, v, scale=0.7, attend_current=attend_current, attention_mask=visible if with_mask else None
    )
    o_loop, rem_loop = brute_force_stickbreaking(q, k, v, 0.7, attend_current, visible)
    torch.testing.assert_close(o, o_loop, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rem, rem_loop, rtol=1e-12, atol=1e-12)
    weight_sums = _weight_sums(q, k, 0.7, attend_current, visible if with_mask else None)
    torch.testing.assert_close(rem, 1 - weight_sums, rtol=1e-12, atol=1e-12)


def _weight_sums(q, k, scale, attend_current, mask):
    """sum_j A_ij, through the reference with v = ones: checks rem = 1 - sum_j A_ij."""
    ones = torch.ones(*k.shape[:-1], 1, dtype=k.dtype)
    o, _ = naive_stickbreaking_attn(q, k, ones, scale=scale, attend_current=attend_current, attention_mask=mask)
    return o[..., 0]


# ----------------------------------------------------------------------------------------------------------------------
# Blockwise against the reference
# ----------------------------------------------------------------------------------------------------------------------

BLOCKWISE_CASES = [
    # B, HQ, H, Q, K, D, Dv, block_size
    pytest.param(2, 4, 2, 37, 37, 16, 16, 8, id="B2-T37-HQ4-H2-D16-bs8"),
    pytest.param(1, 2, 2, 63, 63, 33, 17, 16, id="B1-T63-HQ2-H2-D33-Dv17-bs16"),
    pytest.param(1, 3, 1, 40, 40, 8, 5, 64, id="B1-T40-HQ3-H1-D8-bs64>T"),
    pytest.param(1, 2, 1, 1, 1, 4, 4, 16, id="B1-T1"),
    pytest.param(1, 2, 1, 7, 30, 6, 6, 4, id="B1-Q7-K30-cache"),
]


@pytest.mark.parametrize("B, HQ, H, Q, K, D, Dv, block_size", BLOCKWISE_CASES)
@pytest.mark.parametrize("attend_current", [False, True], ids=["exclusive", "attend_current"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_blockwise_matches_naive(B, HQ, H, Q, K, D, Dv, block_size, attend_current, dtype, forward_path):
    q, k, v = make_qkv(B, HQ, H, Q, K, D, Dv, dtype=dtype)
    ref = outputs_and_grads(naive_stickbreaking_attn, q.double(), k.double(), v.double(), attend_current=attend_current)
    out = outputs_and_grads(
        blockwise_stickbreaking_attn, q, k, v, attend_current=attend_current, block_size=block_size
    )
    for name in QUANTITIES:
        assert out[name].dtype == dtype
        assert_close(name, ref[name], out[name], TOLERANCES[dtype][name])


def test_fp32_naive_matches_fp64_naive():
    q, k, v = make_qkv(2, 4, 2, 29, 29, 12, 12)
    ref = outputs_and_grads(naive_stickbreaking_attn, q.double(), k.double(), v.double())
    out = outputs_and_grads(naive_stickbreaking_attn, q, k, v)
    for name in QUANTITIES:
        assert_close(name, ref[name], out[name], TOLERANCES[torch.float32][name])


@pytest.mark.parametrize("attend_current", [False, True], ids=["exclusive", "attend_current"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["causal", "masked"])
def test_blockwise_gradcheck(attend_current, with_mask, forward_path):
    q, k, v = make_qkv(1, 2, 1, 5, 6, 3, 2, dtype=torch.float64, seed=4)
    mask = None
    if with_mask:
        mask = torch.rand(1, 2, 5, 6, generator=torch.Generator().manual_seed(5)) > 0.25
    q, k, v = (x.requires_grad_() for x in (q, k, v))

    def op(q, k, v):
        return blockwise_stickbreaking_attn(q, k, v, attend_current=attend_current, attention_mask=mask, block_size=2)

    assert torch.autograd.gradcheck(op, (q, k, v), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("threads", [1, 2])
def test_blockwise_backward_is_deterministic(threads, forward_path):
    q, k, v = make_qkv(1, 4, 2, 150, 150, 16, 16)
    torch.set_num_threads(threads)
    first = outputs_and_grads(blockwise_stickbreaking_attn, q, k, v, block_size=32)
    second = outputs_and_grads(blockwise_stickbreaking_attn, q, k, v, block_size=32)
    for name in QUANTITIES:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("B, HQ, H", [(1, 4, 2), (2, 8, 8)], ids=["2-pairs-split-into-groups", "16-pairs"])
def test_cpu_kernel_gradients_are_identical_at_any_thread_count(B, HQ, H):
    """The C++ backward gives each task whole (batch, kv head) pairs (and, for few pairs, fixed groups of their query
    blocks): no per-thread dk/dv copies, so 1, 2 and 8 threads give bit-identical outputs and gradients."""
    require_cpu_kernels()
    q, k, v = make_qkv(B, HQ, H, 150, 150, 16, 16)
    mask = torch.rand(B, 1, 150, 150, generator=torch.Generator().manual_seed(2)) > 0.1
    results = []
    for threads in (1, 2, 8):
        torch.set_num_threads(threads)
        results.append(outputs_and_grads(blockwise_stickbreaking_attn, q, k, v, block_size=32, attention_mask=mask))
    for other in results[1:]:
        for name in QUANTITIES:
            assert torch.equal(results[0][name], other[name]), name


# ----------------------------------------------------------------------------------------------------------------------
# Masks, padding, packing and KV-cache rows
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", [naive_stickbreaking_attn, blockwise_stickbreaking_attn], ids=["naive", "blockwise"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_rows_equal_unpadded_runs(op, side, forward_path):
    T, pad = 19, 6
    q, k, v = make_qkv(2, 2, 1, T, T, 8)
    key_is_real = torch.ones(2, T, dtype=torch.bool)
    real = slice(pad, T) if side == "left" else slice(0, T - pad)
    key_is_real[1] = False
    key_is_real[1, real] = True
    kwargs = {"block_size": 8} if op is blockwise_stickbreaking_attn else {}
    padded = outputs_and_grads(op, q, k, v, attention_mask=causal_padding_mask(key_is_real), **kwargs)
    alone = outputs_and_grads(op, q[1:, :, real], k[1:, :, real], v[1:, :, real], **kwargs)
    assert_close("o", alone["o"][0], padded["o"][1, :, real], 1e-5)
    assert_close("rem", alone["rem"][0], padded["rem"][1, :, real], 1e-5)
    for name in ("o", "rem", "dq", "dk", "dv"):
        assert torch.isfinite(padded[name]).all(), name
    if side == "left":  # queries before the first real token see nothing at all
        assert torch.equal(padded["o"][1, :, :pad], torch.zeros_like(padded["o"][1, :, :pad]))
        assert torch.equal(padded["rem"][1, :, :pad], torch.ones_like(padded["rem"][1, :, :pad]))


@pytest.mark.parametrize("op", [naive_stickbreaking_attn, blockwise_stickbreaking_attn], ids=["naive", "blockwise"])
def test_fully_masked_rows_give_zeros_and_finite_grads(op, forward_path):
    q, k, v = make_qkv(1, 2, 1, 12, 12, 4)
    mask = torch.rand(1, 2, 12, 12, generator=torch.Generator().manual_seed(0)) > 0.5
    mask[0, 0, 3:7] = False
    out = outputs_and_grads(op, q, k, v, attention_mask=mask, attend_current=True)
    assert torch.equal(out["o"][0, 0, 3:7], torch.zeros(4, 4))
    assert torch.equal(out["rem"][0, 0, 3:7], torch.ones(4))
    for name in QUANTITIES:
        assert torch.isfinite(out[name]).all(), name


def test_packed_sequences_with_block_diagonal_mask(forward_path):
    lengths = [9, 14]
    T = sum(lengths)
    q, k, v = make_qkv(1, 2, 1, T, T, 8)
    sequence_id = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    same_sequence = sequence_id[:, None] == sequence_id[None, :]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    generator = torch.Generator().manual_seed(11)
    do, drem = torch.randn(1, 2, T, 8, generator=generator), torch.randn(1, 2, T, generator=generator)
    packed = outputs_and_grads(
        blockwise_stickbreaking_attn, q, k, v, cotangents=(do, drem),
        attention_mask=(same_sequence & causal)[None, None], block_size=8,
    )
    start = 0
    for length in lengths:
        rows = slice(start, start + length)
        alone = outputs_and_grads(
            blockwise_stickbreaking_attn, q[:, :, rows], k[:, :, rows], v[:, :, rows],
            cotangents=(do[:, :, rows], drem[:, :, rows]),
        )
        for name in ("o", "rem", "dq", "dk", "dv"):
            assert_close(name, alone[name], packed[name][:, :, rows], 1e-5)
        start += length


@pytest.mark.parametrize("Q", [1, 5], ids=["decode", "chunked_prefill"])
@pytest.mark.parametrize("attend_current", [False, True], ids=["exclusive", "attend_current"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["mask_none", "sdpa_mask"])
def test_cache_queries_equal_rows_of_full_forward(Q, attend_current, with_mask, forward_path):
    K = 23
    q, k, v = make_qkv(2, 4, 2, K, K, 8)
    key_is_real = torch.ones(2, K, dtype=torch.bool)
    key_is_real[1, :4] = False  # left padding in the second row
    full_mask = causal_padding_mask(key_is_real) if with_mask else None
    tail_mask = causal_padding_mask(key_is_real, Q) if with_mask else None
    for op, kwargs in ((naive_stickbreaking_attn, {}), (blockwise_stickbreaking_attn, {"block_size": 4})):
        o_full, rem_full = op(q, k, v, attend_current=attend_current, attention_mask=full_mask, **kwargs)
        o_tail, rem_tail = op(q[:, :, K - Q :], k, v, attend_current=attend_current, attention_mask=tail_mask, **kwargs)
        assert_close("o", o_full[:, :, K - Q :], o_tail, 1e-6)
        assert_close("rem", rem_full[:, :, K - Q :], rem_tail, 1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Low precision, long sequence, saturated logits
# ----------------------------------------------------------------------------------------------------------------------


def long_sequence_inputs(regime, T, D, dtype):
    """(q, k, v, scale) at length T: "saturated" has |z| up to ~1e4 (every beta is 0 or 1, the stick ends at the
    first positive logit); "long_stick" has z ~ -8 (beta ~ 3e-4), so the stick survives across all T keys and every
    key block contributes (no early exit), which stresses the running sums in low precision."""
    if regime == "saturated":
        q, k, v = make_qkv(1, 1, 1, T, T, D, dtype=dtype, std=100.0)
        return q, k, v, 1 / math.sqrt(D)
    q, k, v = make_qkv(1, 1, 1, T, T, D, dtype=torch.float64, std=0.1)
    return (q + 1).to(dtype), (k - 1).to(dtype), v.to(dtype), 0.5


@pytest.mark.parametrize("regime", ["saturated", "long_stick"])
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)], ids=["fp16", "bf16"])
def test_low_precision_long_sequence(regime, dtype, tol, forward_path):
    T, D, tail = 16384, 16, 64
    q, k, v, scale = long_sequence_inputs(regime, T, D, dtype)
    logits = scale * (q[0, 0, -tail:].double() @ k[0, 0].double().T)
    if regime == "saturated":
        assert logits.abs().max() > 5e3
    else:
        assert logits.max() < -3 and logits.min() > -14
    # Cotangents on the last rows only, so a (tail, T) float64 naive problem is an exact reference for every gradient
    # while the blockwise op still runs over all 16384 rows and keys.
    generator = torch.Generator().manual_seed(2)
    do, drem = torch.zeros(1, 1, T, D, dtype=torch.float64), torch.zeros(1, 1, T, dtype=torch.float64)
    do[:, :, -tail:] = torch.randn(1, 1, tail, D, generator=generator, dtype=torch.float64)
    drem[:, :, -tail:] = torch.randn(1, 1, tail, generator=generator, dtype=torch.float64)
    out = outputs_and_grads(blockwise_stickbreaking_attn, q, k, v, scale=scale, cotangents=(do, drem))
    for name in QUANTITIES:
        assert torch.isfinite(out[name]).all(), name
    ref = outputs_and_grads(
        naive_stickbreaking_attn, q[:, :, -tail:].double(), k.double(), v.double(), scale=scale,
        cotangents=(do[:, :, -tail:], drem[:, :, -tail:]),
    )
    out["o"], out["rem"], out["dq"] = (out[name][:, :, -tail:] for name in ("o", "rem", "dq"))
    if regime == "long_stick":
        for name in QUANTITIES:
            assert_close(name, ref[name], out[name], tol)
        return
    for name in ("o", "rem", "dv"):
        assert_close(name, ref[name], out[name], tol)
    # Saturated betas make the exact dq and dk ~0 (beta * (1 - beta) ~ e^-|z|), so a relative error is meaningless.
    # Bound the absolute error by 1e-5 of what a single key can contribute: s * |k| * (|do| |v| + |drem|).
    one_key_gradient = scale * k.double().abs().max() * (do.abs().max() * v.double().abs().max() + drem.abs().max())
    for name in ("dq", "dk"):
        error = (out[name].double() - ref[name]).abs().max()
        assert error <= 1e-5 * one_key_gradient, f"{name}: max error {error:.3e}, one-key bound {one_key_gradient:.3e}"


# ----------------------------------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------------------------------

BAD_INPUTS = [
    pytest.param({"q": torch.randn(2, 4, 8)}, r"`q` must have 4 dimensions", id="q-ndim"),
    pytest.param({"k": torch.randint(0, 3, (2, 2, 8, 4))}, r"`k` must be a floating-point", id="k-int"),
    pytest.param({"q": torch.randn(2, 3, 8, 4)}, r"`q` heads \(3\) must be a multiple of `k`/`v` heads \(2\)",
                 id="gqa"),
    pytest.param({"q": torch.randn(2, 4, 9, 4)}, r"`q` length \(9\) must not exceed `k` length \(8\)", id="Q>K"),
    pytest.param({"k": torch.randn(2, 2, 8, 5)}, r"`k` head_dim must equal `q` head_dim 4, got 5", id="D"),
    pytest.param({"v": torch.randn(2, 2, 7, 4)}, r"`v` must have the same heads and length as `k`", id="v-len"),
    pytest.param({"v": torch.randn(2, 2, 8, 4).double()}, r"must share one dtype", id="dtype-mix"),
    pytest.param({"attention_mask": torch.ones(2, 1, 8, 8)}, r"`attention_mask` must be a bool tensor",
                 id="mask-float"),
    pytest.param({"attention_mask": torch.ones(1, 2, 1, 8, 8, dtype=torch.bool)}, r"at most 4 dimensions",
                 id="mask-ndim"),
    pytest.param({"attention_mask": torch.ones(2, 1, 8, 7, dtype=torch.bool)}, r"does not broadcast", id="mask-shape"),
    pytest.param({"scale": float("nan")}, r"`scale` must be a finite number", id="scale"),
]


@pytest.mark.parametrize("op", [naive_stickbreaking_attn, blockwise_stickbreaking_attn], ids=["naive", "blockwise"])
@pytest.mark.parametrize("override, match", BAD_INPUTS)
def test_ops_reject_bad_inputs(op, override, match):
    args = {"q": torch.randn(2, 4, 8, 4), "k": torch.randn(2, 2, 8, 4), "v": torch.randn(2, 2, 8, 4)}
    args.update(override)
    with pytest.raises(ValueError, match=match):
        op(**args)


@pytest.mark.parametrize("block_size", [0, -3, 2.5, True])
def test_blockwise_rejects_bad_block_size(block_size):
    q, k, v = make_qkv(1, 1, 1, 4, 4, 2)
    with pytest.raises(ValueError, match=r"`block_size` must be a positive int"):
        blockwise_stickbreaking_attn(q, k, v, block_size=block_size)


# ----------------------------------------------------------------------------------------------------------------------
# The transformers attention function
# ----------------------------------------------------------------------------------------------------------------------


def fake_attention_module(HQ=4, Dv=8, **config):
    bias = torch.nn.Parameter(torch.randn(HQ, Dv, generator=torch.Generator().manual_seed(7)))
    return SimpleNamespace(config=SimpleNamespace(**config), stickbreaking_remainder_bias=bias)


@pytest.mark.parametrize("remainder", ["none", "value", "bias"])
@pytest.mark.parametrize("attend_current", [False, True], ids=["exclusive", "attend_current"])
@pytest.mark.parametrize("Q", [11, 3], ids=["prefill", "cached"])
def test_attention_forward_remainder_modes(remainder, attend_current, Q):
    B, HQ, H, K, D = 2, 4, 2, 11, 8
    q, k, v = make_qkv(B, HQ, H, Q, K, D)
    key_is_real = torch.ones(B, K, dtype=torch.bool)
    key_is_real[0, :2] = False
    mask = causal_padding_mask(key_is_real, Q)
    module = fake_attention_module(
        HQ, D, stickbreaking_remainder=remainder, stickbreaking_attend_current=attend_current,
        stickbreaking_backend="torch",
    )
    attn_output, attn_weights = stickbreaking_attention_forward(module, q, k, v, mask, scaling=0.3)
    assert attn_weights is None
    assert attn_output.shape == (B, Q, HQ, D) and attn_output.is_contiguous()

    o, rem = naive_stickbreaking_attn(q, k, v, scale=0.3, attend_current=attend_current, attention_mask=mask)
    if remainder == "value":
        own_value = v[:, :, K - Q :].repeat_interleave(HQ // H, dim=1)
        o = o + rem[..., None] * own_value
    elif remainder == "bias":
        o = o + rem[..., None] * module.stickbreaking_remainder_bias.detach()[None, :, None, :]
    torch.testing.assert_close(attn_output, o.transpose(1, 2), rtol=1e-5, atol=1e-6)

    if remainder == "bias":
        attn_output.sum().backward()
        assert module.stickbreaking_remainder_bias.grad is not None
        torch.testing.assert_close(module.stickbreaking_remainder_bias.grad, rem.sum((0, 2))[:, None].expand(HQ, D))


def test_attention_forward_mask_kinds_scale_precedence_and_defaults():
    q, k, v = make_qkv(2, 4, 2, 9, 9, 8)
    key_is_real = torch.ones(2, 9, dtype=torch.bool)
    key_is_real[1, :3] = False
    bool_mask = causal_padding_mask(key_is_real)
    additive_mask = torch.zeros(bool_mask.shape).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    stock = SimpleNamespace(config=SimpleNamespace())  # a stock Llama config carries no stickbreaking_* fields
    from_bool, _ = stickbreaking_attention_forward(stock, q, k, v, bool_mask, scaling=0.5, output_attentions=True)
    from_float, _ = stickbreaking_attention_forward(stock, q, k, v, additive_mask, scaling=0.5)
    torch.testing.assert_close(from_bool, from_float, rtol=0, atol=0)
    o, _ = naive_stickbreaking_attn(q, k, v, scale=0.5, attention_mask=bool_mask)
    torch.testing.assert_close(from_bool, o.transpose(1, 2), rtol=1e-5, atol=1e-6)

    causal_only, _ = stickbreaking_attention_forward(stock, q, k, v, None)
    o, _ = naive_stickbreaking_attn(q, k, v, scale=1 / math.sqrt(8))
    torch.testing.assert_close(causal_only, o.transpose(1, 2), rtol=1e-5, atol=1e-6)

    configured = SimpleNamespace(config=SimpleNamespace(stickbreaking_scale=0.125))
    from_config, _ = stickbreaking_attention_forward(configured, q, k, v, None, scaling=0.5)
    o, _ = naive_stickbreaking_attn(q, k, v, scale=0.125)
    torch.testing.assert_close(from_config, o.transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_attention_forward_backend_selection(monkeypatch):
    q, k, v = make_qkv(1, 2, 1, 5, 5, 4)
    module = fake_attention_module(2, 4, stickbreaking_backend="triton")
    monkeypatch.delenv("HF_ATTN_VARIANTS_SB_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"`stickbreaking_backend='triton'` needs CUDA tensors"):
        stickbreaking_attention_forward(module, q, k, v, None)
    monkeypatch.setenv("HF_ATTN_VARIANTS_SB_BACKEND", "torch")  # the environment overrides the config
    out, _ = stickbreaking_attention_forward(module, q, k, v, None)
    assert torch.isfinite(out).all()
    monkeypatch.setenv("HF_ATTN_VARIANTS_SB_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"must be one of \('auto', 'torch', 'triton'\), got 'cuda'"):
        stickbreaking_attention_forward(module, q, k, v, None)


@pytest.mark.parametrize(
    "module_config, call_kwargs, match",
    [
        pytest.param({"stickbreaking_remainder": "sum"}, {}, r"`stickbreaking_remainder` must be one of",
                     id="remainder"),
        pytest.param({}, {"dropout": 0.1}, r"`dropout` is not supported", id="dropout"),
        pytest.param({"stickbreaking_backend": "xla"}, {}, r"`stickbreaking_backend` .* got 'xla'", id="backend"),
    ],
)
def test_attention_forward_rejects_bad_settings(module_config, call_kwargs, match):
    q, k, v = make_qkv(1, 2, 1, 5, 5, 4)
    with pytest.raises(ValueError, match=match):
        stickbreaking_attention_forward(SimpleNamespace(config=SimpleNamespace(**module_config)), q, k, v, None,
                                        **call_kwargs)


def test_attention_forward_bias_mode_needs_the_parameter():
    q, k, v = make_qkv(1, 2, 1, 5, 5, 4)
    module = SimpleNamespace(config=SimpleNamespace(stickbreaking_remainder="bias"))
    with pytest.raises(ValueError, match=r"needs `module.stickbreaking_remainder_bias` of shape \(2, 4\), got None"):
        stickbreaking_attention_forward(module, q, k, v, None)
    with pytest.raises(ValueError, match=r"`q` length \(6\) must not exceed `k` length \(5\)"):
        stickbreaking_attention_forward(module, torch.randn(1, 2, 6, 4), k, v, None)


# ----------------------------------------------------------------------------------------------------------------------
# Registration and a stock Llama model
# ----------------------------------------------------------------------------------------------------------------------


def test_registration_is_idempotent():
    register_stickbreaking_attention()
    register_stickbreaking_attention()
    assert AttentionInterface().get_interface("stickbreaking", None) is stickbreaking_attention_forward
    assert transformers.AttentionInterface().get_interface("stickbreaking", None) is stickbreaking_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["stickbreaking"] is sdpa_mask


@pytest.fixture(scope="module")
def tiny_stock_llama():
    config = LlamaConfig(
        vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, attn_implementation="stickbreaking").eval()
    assert model.config._attn_implementation == "stickbreaking"
    return model


def test_stock_llama_left_padded_batch_matches_unpadded_runs(tiny_stock_llama):
    ids = torch.tensor([[5, 17, 33, 8, 61, 12, 40], [0, 0, 0, 23, 9, 71, 14]])
    attention_mask = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        batch = tiny_stock_llama(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids).logits
        alone_padded = tiny_stock_llama(input_ids=ids[1:, 3:]).logits
        alone_full = tiny_stock_llama(input_ids=ids[:1]).logits
    assert torch.isfinite(batch).all()
    torch.testing.assert_close(batch[1:, 3:], alone_padded, rtol=0, atol=1e-5)
    torch.testing.assert_close(batch[:1], alone_full, rtol=0, atol=1e-5)


def test_stock_llama_greedy_generate_with_cache_equals_without(tiny_stock_llama):
    ids = torch.tensor([[5, 17, 33, 8, 61, 12], [0, 0, 23, 9, 71, 14]])
    attention_mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    common = dict(input_ids=ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = tiny_stock_llama.generate(**common, use_cache=True)
        uncached = tiny_stock_llama.generate(**common, use_cache=False)
    assert torch.equal(cached, uncached)


# --- decode path: few queries, no gradient --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "HQ, H, Q, K, Dv, attend_current, std, first_chunk",
    [
        pytest.param(4, 2, 1, 1, 8, True, 1.0, 256, id="K1"),
        pytest.param(4, 2, 1, 37, 8, False, 1.0, 256, id="Q1-one-chunk"),
        pytest.param(6, 2, 1, 700, 5, False, 0.05, 16, id="Q1-long-stick-many-chunks"),
        pytest.param(6, 3, 3, 300, 8, True, 0.3, 16, id="Q3-band-chunks-attend-current"),
        pytest.param(4, 4, 16, 16, 8, False, 1.0, 4, id="Q16-equals-K"),
        pytest.param(4, 1, 16, 500, 7, False, 0.05, 32, id="Q16-MQA-odd-Dv"),
    ],
)
@pytest.mark.parametrize("with_mask", [False, True], ids=["causal", "padding"])
def test_decode_path_matches_reference(monkeypatch, HQ, H, Q, K, Dv, attend_current, std, first_chunk, with_mask,
                                       forward_path):
    """No-grad calls with Q <= 16 take the decode path (C++ or chunked PyTorch): exact to the float64 reference."""
    from hf_attn_variants.models.attn_variant_llama import stickbreaking_torch

    monkeypatch.setattr(stickbreaking_torch, "DECODE_FIRST_CHUNK", first_chunk)
    monkeypatch.setattr(stickbreaking_torch, "DECODE_KERNEL_BLOCK_SIZE", first_chunk)
    q, k, v = make_qkv(2, HQ, H, Q, K, 16, Dv, dtype=torch.float64, std=std)
    if std < 0.1:  # small logits: beta ~ 1/2, and a negative offset makes the stick reach far keys
        q = q - 0.6 * k.mean(dim=2, keepdim=True).repeat_interleave(HQ // H, dim=1)[..., :1]
    mask = None
    if with_mask:
        mask = (torch.rand(2, 1, 1, K, generator=torch.Generator().manual_seed(3)) > 0.3).expand(2, 1, Q, K)
        mask = mask.clone()
        mask[1, :, :, :] = False  # a fully masked batch row gives zeros and rem = 1
    ref_o, ref_rem = naive_stickbreaking_attn(q, k, v, attend_current=attend_current, attention_mask=mask)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        with torch.no_grad():
            o, rem = blockwise_stickbreaking_attn(
                q.to(dtype), k.to(dtype), v.to(dtype), attend_current=attend_current, attention_mask=mask
            )
        assert_close(f"o {dtype}", ref_o, o, tol)
        assert_close(f"rem {dtype}", ref_rem, rem, tol)
    if with_mask:
        assert not o[1].any() and torch.all(rem[1] == 1)


def test_decode_path_extreme_logits_and_bf16():
    q, k, v = make_qkv(1, 4, 2, 2, 200, 16, std=3.0, dtype=torch.float64)  # |z| up to ~100
    ref_o, ref_rem = naive_stickbreaking_attn(q, k, v)
    with torch.no_grad():
        o, rem = blockwise_stickbreaking_attn(q.float(), k.float(), v.float())
        o16, _ = blockwise_stickbreaking_attn(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert_close("o", ref_o, o, 1e-5)
    assert_close("rem", ref_rem, rem, 1e-5)
    assert o16.dtype == torch.bfloat16 and relative_rms_error(ref_o, o16) < 2e-2


def test_decode_path_is_used_only_without_gradients(monkeypatch):
    from hf_attn_variants.models.attn_variant_llama import stickbreaking_torch

    calls = []
    original = stickbreaking_torch._decode_stickbreaking_attn
    monkeypatch.setattr(stickbreaking_torch, "_decode_stickbreaking_attn", lambda *a: calls.append(1) or original(*a))
    q, k, v = make_qkv(1, 2, 2, 4, 30, 8)
    with torch.no_grad():
        blockwise_stickbreaking_attn(q, k, v)
    assert calls == [1]
    got = outputs_and_grads(blockwise_stickbreaking_attn, q, k, v)  # with gradients: the blockwise autograd op
    ref = outputs_and_grads(naive_stickbreaking_attn, q.double(), k.double(), v.double())
    assert calls == [1]
    for name in QUANTITIES:
        assert_close(name, ref[name], got[name], 1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# The C++ CPU forward (hf_attn_variants.ops.stickbreaking_cpu) against pure PyTorch and the float64 reference
# ----------------------------------------------------------------------------------------------------------------------

KERNEL_CASES = [
    # B, HQ, H, Q, K, D, Dv, block_size, std
    pytest.param(2, 6, 2, 45, 45, 33, 17, 8, 1.0, id="GQA3-D33-Dv17-bs8"),
    pytest.param(1, 2, 2, 9, 40, 8, 8, 4, 1.0, id="Q9-K40-cache-bs4"),
    pytest.param(1, 1, 1, 1, 1, 4, 4, None, 1.0, id="T1"),
    pytest.param(1, 4, 1, 70, 70, 16, 16, 16, 30.0, id="MQA-extreme-logits"),
    pytest.param(2, 2, 1, 300, 300, 8, 8, None, 0.05, id="T300-default-blocks-long-stick"),
]


def kernel_cases(test):
    """KERNEL_CASES x attend_current x mask kinds x fp32/fp64."""
    for mark in reversed((
        pytest.mark.parametrize("B, HQ, H, Q, K, D, Dv, block_size, std", KERNEL_CASES),
        pytest.mark.parametrize("attend_current", [False, True], ids=["exclusive", "attend_current"]),
        pytest.mark.parametrize("mask_kind", [None, "padding", "random"]),
        pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"]),
    )):
        test = mark(test)
    return test


def require_cpu_kernels():
    from hf_attn_variants.ops.stickbreaking_cpu import ENV_VAR, enabled, forward_kernel

    if not enabled():
        pytest.skip(f"{ENV_VAR}=0")
    assert forward_kernel() is not None, "the C++ CPU kernel failed to build (see the logged warning)"


def kernel_case_inputs(B, HQ, H, Q, K, D, Dv, std, mask_kind, dtype):
    q, k, v = make_qkv(B, HQ, H, Q, K, D, Dv, dtype=dtype, std=std)
    if std < 0.1:  # logits near -8: the stick survives every key block
        q, k = q + 1, k - 1
    mask = None
    if mask_kind == "padding":
        key_is_real = torch.ones(B, K, dtype=torch.bool)
        key_is_real[-1, : K // 3] = False
        mask = causal_padding_mask(key_is_real, Q)  # (B, 1, Q, K): broadcast over heads
    elif mask_kind == "random":
        mask = torch.rand(B, HQ, Q, K, generator=torch.Generator().manual_seed(3)) > 0.3
        mask[..., : max(1, Q // 4), :] = False  # fully masked rows too
    return q, k, v, mask


@kernel_cases
def test_cpu_kernel_forward_matches_torch_and_reference(B, HQ, H, Q, K, D, Dv, block_size, std, attend_current,
                                                        mask_kind, dtype, monkeypatch):
    """The C++ forward (with gradients on) and decode (Q <= 16, no gradients) against PyTorch and float64."""
    require_cpu_kernels()
    q, k, v, mask = kernel_case_inputs(B, HQ, H, Q, K, D, Dv, std, mask_kind, dtype)
    kwargs = dict(attend_current=attend_current, attention_mask=mask, block_size=block_size)
    with torch.no_grad():
        ref_o, ref_rem = naive_stickbreaking_attn(q.double(), k.double(), v.double(), attend_current=attend_current,
                                                  attention_mask=mask)
        if Q > 16:  # the decode path (Q <= 16, no grad) has its own kernel: go through the blockwise op with grad on
            q.requires_grad_(True)
        with torch.enable_grad():
            o, rem = blockwise_stickbreaking_attn(q, k, v, **kwargs)
            pure_pytorch(monkeypatch)
            o_torch, rem_torch = blockwise_stickbreaking_attn(q, k, v, **kwargs)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    # At |z| ~ 1e3 the reference's own log-space rounding (~3e-11 in fp64) dominates; both paths agree far closer.
    ref_tol = tol * (100 if std > 10 else 1)
    for name, ref, out, other in (("o", ref_o, o, o_torch), ("rem", ref_rem, rem, rem_torch)):
        assert out.dtype == dtype
        assert_close(name, ref, out.detach(), ref_tol)
        assert_close(name + " vs torch", other.detach(), out.detach(), tol)
    if mask_kind == "random":  # rows that see nothing: exactly zero output, full stick
        assert torch.equal(o[..., : max(1, Q // 4), :].detach(), torch.zeros_like(o[..., : max(1, Q // 4), :]))
        assert torch.equal(rem[..., : max(1, Q // 4)].detach(), torch.ones_like(rem[..., : max(1, Q // 4)]))


@kernel_cases
def test_cpu_kernel_backward_matches_torch_and_reference(B, HQ, H, Q, K, D, Dv, block_size, std, attend_current,
                                                         mask_kind, dtype, monkeypatch):
    """dq, dk, dv of the C++ backward against the PyTorch backward and autograd on the float64 reference."""
    require_cpu_kernels()
    q, k, v, mask = kernel_case_inputs(B, HQ, H, Q, K, D, Dv, std, mask_kind, dtype)
    kwargs = dict(attend_current=attend_current, attention_mask=mask)
    ref = outputs_and_grads(naive_stickbreaking_attn, q.double(), k.double(), v.double(), **kwargs)
    out = outputs_and_grads(blockwise_stickbreaking_attn, q, k, v, block_size=block_size, **kwargs)
    pure_pytorch(monkeypatch)
    torch_out = outputs_and_grads(blockwise_stickbreaking_attn, q, k, v, block_size=block_size, **kwargs)
    tol = 1e-11 if dtype == torch.float64 else 1e-5
    # At |z| ~ 1e3 every gradient is ~e^-20 of the cotangents: the farther-key sums (row total minus the nearer g)
    # are then pure rounding unless clamped (both backwards clamp them; unclamped they were off by 10x in fp32).
    tol = tol * (100 if std > 10 else 1)
    for name in ("dq", "dk", "dv"):
        assert out[name].dtype == dtype
        assert torch.isfinite(out[name]).all(), name
        assert_close(name, ref[name], out[name], tol)
        assert_close(name + " vs torch", torch_out[name], out[name], tol)


@pytest.mark.parametrize("attend_current", [False, True], ids=["exclusive", "attend_current"])
def test_cpu_kernel_backward_gradcheck_gqa_mask(attend_current):
    require_cpu_kernels()
    q, k, v = make_qkv(1, 4, 2, 7, 9, 3, 2, dtype=torch.float64, seed=6)
    mask = torch.rand(1, 1, 7, 9, generator=torch.Generator().manual_seed(7)) > 0.3
    q, k, v = (x.requires_grad_() for x in (q, k, v))

    def op(q, k, v):
        return blockwise_stickbreaking_attn(q, k, v, attend_current=attend_current, attention_mask=mask, block_size=3)

    assert torch.autograd.gradcheck(op, (q, k, v), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("layout", ["static-cache-slice", "transposed"])
def test_cpu_kernel_decode_reads_strided_caches(layout, monkeypatch):
    """The C++ decode reads a static cache's slice in place and copies only what has no contiguous last dim."""
    require_cpu_kernels()
    q, k, v = make_qkv(2, 6, 3, 2, 400, 16, 8, std=0.05, seed=9)
    q, k = q + 1, k - 1  # a long stick: several decode blocks
    if layout == "static-cache-slice":
        k_buffer, v_buffer = torch.zeros(2, 3, 512, 16), torch.zeros(2, 3, 512, 8)
        k_buffer[:, :, :400], v_buffer[:, :, :400] = k, v
        k_in, v_in = k_buffer[:, :, :400], v_buffer[:, :, :400]
    else:
        k_in, v_in = (x.transpose(-1, -2).contiguous().transpose(-1, -2) for x in (k, v))  # last-dim stride K
    mask = (torch.rand(2, 1, 1, 400, generator=torch.Generator().manual_seed(3)) > 0.2).expand(2, 1, 2, 400)
    ref_o, ref_rem = naive_stickbreaking_attn(q.double(), k.double(), v.double(), attention_mask=mask)
    with torch.no_grad():
        o, rem = blockwise_stickbreaking_attn(q, k_in, v_in, attention_mask=mask)
    assert_close("o", ref_o, o, 2e-6)
    assert_close("rem", ref_rem, rem, 2e-6)
    assert ref_rem.max() < 0.9  # the stick was really spent over many keys


def test_cpu_kernel_propagates_nan_like_torch(monkeypatch):
    from hf_attn_variants.ops.stickbreaking_cpu import enabled

    if not enabled():
        pytest.skip("CPU kernel disabled")
    q, k, v = make_qkv(1, 2, 1, 40, 40, 8)
    q[0, 1, 20] = float("nan")
    o, rem = blockwise_stickbreaking_attn(q.requires_grad_(), k, v, block_size=8)
    with torch.no_grad():
        o_decode, rem_decode = blockwise_stickbreaking_attn(q[:, :, 18:22], k[:, :, :22], v[:, :, :22])
    pure_pytorch(monkeypatch)
    o_torch, rem_torch = blockwise_stickbreaking_attn(q, k, v, block_size=8)
    assert torch.equal(o.isnan(), o_torch.isnan()) and torch.equal(rem.isnan(), rem_torch.isnan())
    assert o.isnan().any() and not o[0, 0].isnan().any()
    with torch.no_grad():
        o_decode_torch, _ = blockwise_stickbreaking_attn(q[:, :, 18:22], k[:, :, :22], v[:, :, :22])
    assert torch.equal(o_decode.isnan(), o_decode_torch.isnan()) and o_decode[0, 1, 2].isnan().all()


def test_torch_backend_and_env_var_keep_pure_pytorch(monkeypatch):
    """`stickbreaking_backend="torch"` never calls the C++ kernel; HF_ATTN_VARIANTS_CPU_KERNEL=0 disables it."""
    from hf_attn_variants.ops import stickbreaking_cpu

    calls = []
    for name in CPU_KERNELS:
        monkeypatch.setitem(stickbreaking_torch._CPU_KERNEL, name, lambda *args: calls.append(args) or (None, None))
    q, k, v = make_qkv(1, 2, 1, 20, 20, 4)
    module = fake_attention_module(2, 4, stickbreaking_backend="torch")
    monkeypatch.delenv("HF_ATTN_VARIANTS_SB_BACKEND", raising=False)
    with torch.enable_grad():
        out, _ = stickbreaking_attention_forward(module, q.requires_grad_(), k, v, None)
        out.sum().backward()
    with torch.no_grad():
        decoded, _ = stickbreaking_attention_forward(module, q[:, :, -1:], k, v, None)
    assert torch.isfinite(out).all() and torch.isfinite(decoded).all() and not calls
    monkeypatch.setenv(stickbreaking_cpu.ENV_VAR, "0")
    assert stickbreaking_cpu.forward_kernel() is None
    assert stickbreaking_cpu.backward_kernel() is None and stickbreaking_cpu.decode_kernel() is None
