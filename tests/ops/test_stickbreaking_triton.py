"""Triton stick-breaking kernels against the float64 reference (`naive_stickbreaking_attn`).

Without a GPU the kernels run in the Triton interpreter (~0.5 ms per tl op per program), so the CPU tier uses tiny
shapes and one block per sequence, plus a few cases with forced 16x16 blocks (T = 40) that exercise the loops.
Large shapes are GPU-only. Because the interpreter skips the GPU compiler's checks, one test also compiles every
kernel for sm_90 ahead of time (no GPU needed), with the launchers' own GPU block choices.
"""

import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    # must happen before triton is imported (a conftest may already have set it)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from hf_attn_variants.models.attn_variant_llama.stickbreaking_torch import naive_stickbreaking_attn  # noqa: E402
from hf_attn_variants.ops.stickbreaking import (  # noqa: E402
    decode_stickbreaking_attn,
    parallel_stickbreaking_attn,
)
from hf_attn_variants.ops.stickbreaking import decoding as sb_decoding  # noqa: E402
from hf_attn_variants.ops.stickbreaking import parallel as sb_parallel  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# relative RMS error allowed, per dtype and quantity
TOL = {
    torch.float32: dict(o=1e-4, rem=1e-4, dq=1e-4, dk=1e-4, dv=1e-4),
    torch.float16: dict(o=5e-3, rem=5e-3, dq=1e-2, dk=1e-2, dv=5e-3),
    torch.bfloat16: dict(o=2e-2, rem=2e-2, dq=3e-2, dk=3e-2, dv=2e-2),
}


@pytest.fixture(autouse=True)
def _fp32_is_fp32():
    # TF32 would make the fp32 comparison meaningless on GPU
    torch.backends.cuda.matmul.allow_tf32 = False
    yield


def rel_rms(ref: torch.Tensor, tri: torch.Tensor) -> float:
    ref, tri = ref.double(), tri.double()
    assert not torch.isnan(tri).any(), "NaN in kernel output"
    err = (ref - tri).pow(2).mean().sqrt()
    if err.item() <= 1e-9:
        return 0.0
    return (err / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def assert_close(name, ref, tri, tol):
    err = rel_rms(ref, tri)
    max_abs = (ref.double() - tri.double()).abs().max().item()
    assert err <= tol, f"{name}: relative RMS error {err:.3e} > {tol:.1e} (max abs diff {max_abs:.3e})"


def make_inputs(B, HQ, H, Q, K, D, Dv, dtype, layout="bhtd", seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "bthd":  # what a model holds before transposing: (B, T, H, D) -> strided (B, H, T, D) views
        q = torch.randn(B, Q, HQ, D, generator=g).transpose(1, 2)
        k = torch.randn(B, K, H, D, generator=g).transpose(1, 2)
        v = torch.randn(B, K, H, Dv, generator=g).transpose(1, 2)
    else:
        q, k, v = (torch.randn(B, HQ, Q, D, generator=g), torch.randn(B, H, K, D, generator=g),
                   torch.randn(B, H, K, Dv, generator=g))
    do = torch.randn(B, HQ, Q, Dv, generator=g)
    drem = torch.randn(B, HQ, Q, generator=g)
    q, k, v = (x.to(DEVICE, dtype).requires_grad_() for x in (q, k, v))
    return q, k, v, do.to(DEVICE, dtype), drem.to(DEVICE, dtype)


def run(fn, q, k, v, do, drem, **kw):
    for x in (q, k, v):
        x.grad = None
    o, rem = fn(q, k, v, **kw)
    ((o.float() * do.float()).sum() + (rem.float() * drem.float()).sum()).backward()
    return o, rem, q.grad.clone(), k.grad.clone(), v.grad.clone()


def reference(q, k, v, do, drem, **kw):
    """float64 reference on the same (already rounded) inputs, with autograd gradients."""
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    return run(naive_stickbreaking_attn, q64, k64, v64, do.double(), drem.double(), **kw)


def check_all(ref, tri, dtype):
    for name, r, t in zip(("o", "rem", "dq", "dk", "dv"), ref, tri):
        assert t.shape == r.shape, name
        assert_close(name, r, t, TOL[dtype][name])


@pytest.fixture
def blocks(monkeypatch):
    def force(bm_bn):
        monkeypatch.setattr(sb_parallel, "_FORCE_BLOCKS", bm_bn)
    return force


# (B, HQ, H, Q, K, D, Dv, dtype, attend_current, forced blocks, layout)
DENSE_CASES = [
    (2, 2, 2, 24, 24, 32, 32, torch.float32, False, None, "bhtd"),
    (2, 2, 2, 24, 24, 32, 32, torch.float32, True, None, "bhtd"),
    (1, 4, 2, 20, 20, 24, 40, torch.float32, False, None, "bthd"),  # GQA, odd D, Dv != D, strided views
    (1, 4, 2, 7, 30, 40, 24, torch.float32, True, None, "bhtd"),  # chunked prefill over a cache: Q < K
    (1, 4, 2, 40, 40, 24, 16, torch.float32, False, (16, 16), "bthd"),  # several query and key blocks
    (1, 2, 1, 29, 40, 16, 24, torch.float32, True, (16, 16), "bhtd"),
    (1, 2, 1, 16, 16, 256, 200, torch.float32, False, None, "bhtd"),  # largest head dim, masked Dv tile
    (1, 4, 2, 24, 24, 32, 32, torch.float16, False, None, "bhtd"),
    (1, 4, 2, 24, 24, 32, 32, torch.bfloat16, True, None, "bthd"),
]


@pytest.mark.parametrize(
    "B,HQ,H,Q,K,D,Dv,dtype,attend_current,bm_bn,layout",
    [pytest.param(*c, id="B{}-HQ{}-H{}-Q{}-K{}-D{}-Dv{}-{}-ac{}-blocks{}-{}".format(
        *c[:7], str(c[7])[6:], int(c[8]), c[9], c[10])) for c in DENSE_CASES],
)
def test_parallel_matches_reference(B, HQ, H, Q, K, D, Dv, dtype, attend_current, bm_bn, layout, blocks):
    blocks(bm_bn)
    q, k, v, do, drem = make_inputs(B, HQ, H, Q, K, D, Dv, dtype, layout)
    ref = reference(q, k, v, do, drem, attend_current=attend_current)
    tri = run(parallel_stickbreaking_attn, q, k, v, do, drem, attend_current=attend_current)
    assert tri[0].dtype == dtype and tri[1].dtype == dtype
    check_all(ref, tri, dtype)


@pytest.mark.parametrize("attend_current,bm_bn", [(False, None), (True, (16, 16))], ids=["ac0", "ac1-blocks16"])
def test_varlen_unequal_lengths(attend_current, bm_bn, blocks):
    blocks(bm_bn)
    lengths = [3, 17, 9]
    cu = torch.tensor([0, 3, 20, 29], dtype=torch.int32, device=DEVICE)
    q, k, v, do, drem = make_inputs(1, 4, 2, sum(lengths), sum(lengths), 24, 16, torch.float32, "bthd")
    tri = run(parallel_stickbreaking_attn, q, k, v, do, drem, attend_current=attend_current, cu_seqlens=cu)
    # reference: each sequence alone; gradients of the packed tensors are the concatenation
    outs = [[] for _ in range(5)]
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        seg = [x.detach()[:, :, s:e] for x in (q, k, v, do, drem)]
        for acc, r in zip(outs, reference(*seg, attend_current=attend_current)):
            acc.append(r)
    ref = [torch.cat(x, dim=2) for x in outs]
    check_all(ref, tri, torch.float32)


def test_attention_mask_left_padding_and_fully_masked_rows(blocks):
    blocks((16, 16))
    B, HQ, H, T = 2, 4, 2, 40
    q, k, v, do, drem = make_inputs(B, HQ, H, T, T, 24, 24, torch.float32)
    pad = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    pad[1, :5] = False  # left padding of 5 tokens in the second sequence
    mask = pad[:, None, None, :].expand(B, 1, T, T)  # (B, 1, Q, K), like transformers' sdpa_mask for padding
    ref = reference(q, k, v, do, drem, attention_mask=mask)
    tri = run(parallel_stickbreaking_attn, q, k, v, do, drem, attention_mask=mask)
    check_all(ref, tri, torch.float32)
    # rows 0..5 of the padded sequence see no key (row 0 sees nothing anyway): o = 0, rem = 1, no NaN
    o, rem = tri[0], tri[1]
    assert torch.equal(o[1, :, :6], torch.zeros_like(o[1, :, :6]))
    assert torch.equal(rem[1, :, :6], torch.ones_like(rem[1, :, :6]))


def test_attention_mask_per_head_random():
    B, HQ, H, T = 1, 4, 2, 24
    q, k, v, do, drem = make_inputs(B, HQ, H, T, T, 16, 16, torch.float32, seed=3)
    mask = torch.rand(B, HQ, T, T, generator=torch.Generator().manual_seed(1)).to(DEVICE) > 0.3
    mask[0, 1, 7] = False  # a fully masked row in the middle
    ref = reference(q, k, v, do, drem, attend_current=True, attention_mask=mask)
    tri = run(parallel_stickbreaking_attn, q, k, v, do, drem, attend_current=True, attention_mask=mask)
    check_all(ref, tri, torch.float32)
    assert tri[1][0, 1, 7].item() == 1.0


@pytest.mark.parametrize("Q", [1, 3])
@pytest.mark.parametrize("attend_current", [False, True], ids=["ac0", "ac1"])
def test_decode_matches_full_forward(Q, attend_current):
    B, HQ, H, K, D, Dv = 2, 4, 2, 40, 24, 40
    q, k, v, _, _ = make_inputs(B, HQ, H, K, K, D, Dv, torch.float32)
    q, k, v = q.detach(), k.detach(), v.detach()
    pad = torch.ones(B, K, dtype=torch.bool, device=DEVICE)
    pad[0, :6] = False
    full_mask = pad[:, None, None, :].expand(B, 1, K, K)
    o_full, rem_full = parallel_stickbreaking_attn(q, k, v, attend_current=attend_current, attention_mask=full_mask)
    o_ref, rem_ref = naive_stickbreaking_attn(q.double(), k.double(), v.double(), attend_current=attend_current,
                                              attention_mask=full_mask)
    for num_splits in (1, 3):  # 3 chunks of 16 keys: exercises the nearest-first combine
        o, rem = decode_stickbreaking_attn(q[:, :, -Q:], k, v, attend_current=attend_current,
                                           attention_mask=full_mask[:, :, -Q:], num_splits=num_splits)
        assert_close("o vs full", o_full[:, :, -Q:], o, 1e-5)
        assert_close("rem vs full", rem_full[:, :, -Q:], rem, 1e-5)
        assert_close("o vs ref", o_ref[:, :, -Q:], o, 1e-4)
        assert_close("rem vs ref", rem_ref[:, :, -Q:], rem, 1e-4)


def test_decode_several_row_blocks():
    # G * Q = 80 rows > 64: the (query head, query) rows of one kv head span two row blocks
    q, k, v, _, _ = make_inputs(1, 4, 2, 40, 40, 24, 16, torch.float32, "bthd")
    q, k, v = q.detach(), k.detach(), v.detach()
    o, rem = decode_stickbreaking_attn(q, k, v, attend_current=True, num_splits=2)
    o_ref, rem_ref = naive_stickbreaking_attn(q.double(), k.double(), v.double(), attend_current=True)
    assert_close("o", o_ref, o, 1e-4)
    assert_close("rem", rem_ref, rem, 1e-4)


def test_parallel_routes_small_q_to_decode(monkeypatch):
    monkeypatch.setattr(sb_parallel, "_DECODE_MIN_KEYS", 32)
    calls = []
    real = sb_decoding.decode_stickbreaking_attn

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sb_decoding, "decode_stickbreaking_attn", spy)
    q, k, v, _, _ = make_inputs(1, 4, 2, 2, 40, 16, 16, torch.float32)
    with torch.no_grad():
        o, rem = parallel_stickbreaking_attn(q, k, v)
    assert calls == [1]
    o_ref, rem_ref = naive_stickbreaking_attn(q.detach().double(), k.detach().double(), v.detach().double())
    assert_close("o", o_ref, o, 1e-4)
    assert_close("rem", rem_ref, rem, 1e-4)
    # with gradients required it must take the differentiable path
    parallel_stickbreaking_attn(q, k, v)[0].sum().backward()
    assert calls == [1] and q.grad is not None


def test_backward_is_deterministic(blocks):
    blocks((16, 16))
    q, k, v, do, drem = make_inputs(1, 4, 2, 40, 40, 16, 16, torch.float32)
    first = run(parallel_stickbreaking_attn, q, k, v, do, drem)
    second = run(parallel_stickbreaking_attn, q, k, v, do, drem)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_saturated_logits(dtype):
    """|z| up to 30: softplus at large |z| and the fp32 cumsum matter here (a bf16 cumsum loses ~10% per weight)."""
    B, HQ, H, T, D = 1, 2, 2, 32, 16
    q, k, v, do, drem = make_inputs(B, HQ, H, T, T, D, D, torch.float32, seed=5)
    z = (q.detach() @ k.detach().transpose(-1, -2)).abs().max().item()
    scale = 30.0 / z  # the largest |logit| is exactly 30
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    do, drem = do.to(dtype), drem.to(dtype)
    ref = reference(q, k, v, do, drem, scale=scale)
    tri = run(parallel_stickbreaking_attn, q, k, v, do, drem, scale=scale)
    # bf16 inputs, fp32 math: ~4e-3 in practice; a bf16 in-block cumsum would be off by ~10% on saturated rows
    tol = TOL[dtype] if dtype == torch.float32 else dict.fromkeys(TOL[dtype], 1e-2)
    for name, r, t in zip(("o", "rem", "dq", "dk", "dv"), ref, tri):
        assert_close(name, r, t, tol[name])


# The kernels' error budget at large logits, against the float64 reference. With the old hard softplus cutoff
# (softplus2(x) = x above x = 15) and beta = 2^(x - softplus2(x)) these shapes gave o 5e-6..9e-6 and dq/dk
# 3e-5..8e-5; an exact softplus with log2 beta formed directly gives <= 4e-7 and <= 8e-7 (PyTorch path: ~2.5e-6 on dq).
LARGE_LOGIT_TOL = dict(o=2e-6, rem=2e-6, dq=3e-6, dk=3e-6, dv=2e-6)


@pytest.mark.parametrize("zmax,bm_bn", [(30, None), (45, (16, 16)), (60, None), (60, (16, 16))],
                         ids=["z30", "z45-blocks16", "z60", "z60-blocks16"])
def test_large_logits_fp32_accuracy(zmax, bm_bn, blocks):
    blocks(bm_bn)
    q, k, v, do, drem = make_inputs(1, 2, 2, 32, 32, 16, 16, torch.float32, seed=6)
    scale = zmax / (q.detach() @ k.detach().transpose(-1, -2)).abs().max().item()  # the largest |logit| is zmax
    ref = reference(q, k, v, do, drem, scale=scale)
    tri = run(parallel_stickbreaking_attn, q, k, v, do, drem, scale=scale)
    for name, r, t in zip(("o", "rem", "dq", "dk", "dv"), ref, tri):
        assert_close(name, r, t, LARGE_LOGIT_TOL[name])
    o, rem = decode_stickbreaking_attn(q[:, :, -4:].detach(), k.detach(), v.detach(), scale=scale, num_splits=3)
    assert_close("decode o", ref[0][:, :, -4:], o, LARGE_LOGIT_TOL["o"])
    assert_close("decode rem", ref[1][:, :, -4:], rem, LARGE_LOGIT_TOL["rem"])


def test_custom_ops_registered_and_opcheck():
    for name in ("sb_parallel_fwd", "sb_parallel_bwd", "sb_decode"):
        assert hasattr(torch.ops.hf_attn_variants, name), name
    q, k, v, do, drem = make_inputs(1, 2, 1, 8, 8, 16, 16, torch.float32)
    q, k, v = q.detach(), k.detach(), v.detach()
    fwd_args = (q, k, v, None, None, 0.25, False, 8, 16, 16)
    torch.library.opcheck(torch.ops.hf_attn_variants.sb_parallel_fwd, fwd_args,
                          test_utils=("test_schema", "test_faketensor"))
    snap = torch.ops.hf_attn_variants.sb_parallel_fwd(*fwd_args)[2]
    torch.library.opcheck(torch.ops.hf_attn_variants.sb_parallel_bwd,
                          (do, drem, q, k, v, snap, None, None, 0.25, False, 8, 16, 16))
    torch.library.opcheck(torch.ops.hf_attn_variants.sb_decode, (q[:, :, -1:], k, v, None, 0.25, True, 2))


def test_torch_compile_traces_through():
    # aot_eager: traces the autograd.Function and the opaque custom ops like inductor would, without C++ codegen
    q, k, v, _, _ = make_inputs(1, 4, 2, 12, 12, 16, 16, torch.float32)

    def loss(q, k, v):
        o, rem = parallel_stickbreaking_attn(q, k, v, attend_current=True)
        return o.sin().sum() + rem.sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    grads = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    eager = torch.autograd.grad(loss(q, k, v), (q, k, v))
    for a, b in zip(grads, eager):
        torch.testing.assert_close(a, b)


@pytest.fixture
def no_launch(monkeypatch):
    """Any kernel launch fails the test: rejections must happen on the host, before the kernels see bad input."""
    class _NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("a kernel was launched before the input was rejected")

    for module, name in ((sb_parallel, "_sb_fwd_kernel"), (sb_parallel, "_sb_bwd_dq_kernel"),
                         (sb_parallel, "_sb_bwd_dkv_kernel"), (sb_decoding, "_sb_decode_kernel")):
        monkeypatch.setattr(module, name, _NoLaunch())


def _i32(*values):
    return torch.tensor(values, dtype=torch.int32)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(q=torch.zeros(2, 4, 8)), r"`q` must be a 4-D"),
        (dict(q=[[0.0]]), r"`q` must be a torch.Tensor, got list"),
        (dict(q=torch.zeros(1, 3, 8, 16)), "multiple of `k` heads"),
        (dict(q=torch.zeros(1, 4, 9, 16)), "must not exceed `k` length"),
        (dict(q=torch.zeros(1, 4, 8, 16, dtype=torch.float64)), "float16, bfloat16 or float32"),
        (dict(q=torch.zeros(1, 4, 8, 512), k=torch.zeros(1, 2, 8, 512)), "up to 256"),
        (dict(q=torch.zeros(1, 4, 8, 0), k=torch.zeros(1, 2, 8, 0)), r"from 1 up to 256 .* got D=0"),
        (dict(q=torch.zeros(1, 0, 8, 16), k=torch.zeros(1, 0, 8, 16), v=torch.zeros(1, 0, 8, 16)),
         "at least one head, got 0 query heads and 0 kv heads"),
        (dict(attention_mask=torch.zeros(1, 1, 8, 8)), "bool"),
        (dict(attention_mask=torch.zeros(1, 3, 8, 8, dtype=torch.bool)), r"must broadcast to \(B, HQ, Q, K\)"),
        (dict(scale=float("nan")), r"`scale` must be a finite number or None, got nan"),
        (dict(scale=float("inf")), r"`scale` must be a finite number or None, got inf"),
        (dict(scale=-float("inf")), r"got -inf"),
        (dict(scale="0.25"), r"got '0.25'"),
        (dict(q=torch.zeros(2, 4, 8, 16), k=torch.zeros(2, 2, 8, 16), v=torch.zeros(2, 2, 8, 16),
              cu_seqlens=_i32(0, 8)), "batch size 1"),
        (dict(cu_seqlens=torch.tensor([0.0, 8.0])), r"1-D int32 or int64 tensor .* got torch.float32"),
        (dict(cu_seqlens=_i32(0, 8).view(1, 2)), r"1-D int32 or int64 tensor .* shape \(1, 2\)"),
        (dict(cu_seqlens=_i32(0)), r"at least 2 entries, got torch.int32 with shape \(1,\)"),
        (dict(cu_seqlens=[0, 8]), r"`cu_seqlens` must be a torch.Tensor or None, got list"),
        (dict(cu_seqlens=_i32(1, 8)), r"must start at 0, got cu_seqlens\[0\] = 1 in \[1, 8\]"),
        (dict(cu_seqlens=_i32(0, 5, 3, 8)), r"non-decreasing, got cu_seqlens\[1\] = 5 > cu_seqlens\[2\] = 3"),
        # past the end: the kernels would write out of bounds (heap corruption under the interpreter)
        (dict(cu_seqlens=_i32(0, 3, 100)), r"end at the packed length T = 8 .* got cu_seqlens\[-1\] = 100"),
        # short of the end: rows 6 and 7 would be returned uninitialised
        (dict(cu_seqlens=_i32(0, 3, 6)), r"end at the packed length T = 8 .* got cu_seqlens\[-1\] = 6"),
        (dict(cu_seqlens=torch.arange(0, 41, dtype=torch.int32)),
         r"cu_seqlens\[-1\] = 40 in \[0, 1, 2, 3, 4, 5, 6, 7, \.\.\., 33, 34, 35, 36, 37, 38, 39, 40\]"),
        (dict(cu_seqlens=_i32(0, 8), attention_mask=torch.ones(8, 8, dtype=torch.bool)), "not supported together"),
        (dict(q=torch.zeros(1, 4, 4, 16), cu_seqlens=_i32(0, 4)), "same length, got 4 and 8"),
    ],
    ids=["ndim", "not-tensor", "gqa", "q>k", "dtype", "d>256", "d0", "heads0", "mask-dtype", "mask-shape",
         "scale-nan", "scale-inf", "scale-neginf", "scale-str", "cu-batch", "cu-dtype", "cu-2d", "cu-one-entry",
         "cu-list", "cu-start", "cu-decreasing", "cu-past-end", "cu-short-of-end", "cu-long-preview",
         "cu-with-mask", "cu-q-neq-k"],
)
def test_input_validation(kwargs, match, no_launch):
    args = dict(q=torch.zeros(1, 4, 8, 16), k=torch.zeros(1, 2, 8, 16), v=torch.zeros(1, 2, 8, 16))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        parallel_stickbreaking_attn(**args)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(q=torch.zeros(1, 4, 0, 16), k=torch.zeros(1, 2, 0, 16), v=torch.zeros(1, 2, 0, 16)),
         r"at least one batch row, one query and one cached key .* got B=1, Q=0, K=0"),
        (dict(q=torch.zeros(1, 4, 0, 16)), r"got B=1, Q=0, K=8"),
        (dict(q=torch.zeros(0, 4, 1, 16), k=torch.zeros(0, 2, 8, 16), v=torch.zeros(0, 2, 8, 16)),
         r"got B=0, Q=1, K=8"),
        (dict(num_splits=0), r"`num_splits` must be an int >= 1 or None, got 0"),
        (dict(num_splits=1.5), r"got 1.5"),
        (dict(scale=float("nan")), r"`scale` must be a finite number or None, got nan"),
        (dict(q=torch.zeros(1, 4, 9, 16)), "must not exceed `k` length"),
    ],
    ids=["k0", "q0", "b0", "splits0", "splits-float", "scale-nan", "q>k"],
)
def test_decode_input_validation(kwargs, match, no_launch):
    args = dict(q=torch.zeros(1, 4, 1, 16), k=torch.zeros(1, 2, 8, 16), v=torch.zeros(1, 2, 8, 16))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        decode_stickbreaking_attn(**args)


def test_cu_seqlens_int64_matches_int32():
    q, k, v, _, _ = make_inputs(1, 2, 1, 12, 12, 16, 16, torch.float32)
    q, k, v = q.detach(), k.detach(), v.detach()
    cu = [0, 5, 5, 12]  # an empty sequence in the middle is allowed
    o32, rem32 = parallel_stickbreaking_attn(q, k, v, cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=DEVICE))
    o64, rem64 = parallel_stickbreaking_attn(q, k, v, cu_seqlens=torch.tensor(cu, dtype=torch.int64, device=DEVICE))
    assert torch.equal(o32, o64) and torch.equal(rem32, rem64)


@pytest.mark.parametrize("shape", [(0, 4, 2, 8, 8), (1, 4, 2, 0, 8), (1, 4, 2, 0, 0)], ids=["B0", "Q0", "Q0-K0"])
def test_empty_inputs_give_empty_outputs(shape):
    # like the PyTorch path: empty batches or lengths are meaningful and launch nothing that could misbehave
    B, HQ, H, Q, K = shape
    q, k, v, do, drem = make_inputs(B, HQ, H, Q, K, 16, 24, torch.float32)
    o, rem, dq, dk, dv = run(parallel_stickbreaking_attn, q, k, v, do, drem)
    assert o.shape == (B, HQ, Q, 24) and rem.shape == (B, HQ, Q)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert not dk.any() and not dv.any()  # keys no query sees get zero gradient


_NO_TRITON_CHILD = r'''
import importlib.abc, sys

class _HideTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("No module named 'triton' (hidden by the test)")

sys.meta_path.insert(0, _HideTriton())
import hf_attn_variants.ops as ops
assert "hf_attn_variants.ops.stickbreaking.parallel" not in sys.modules
try:
    ops.parallel_stickbreaking_attn
except ImportError as e:
    assert "needs triton" in str(e), e
else:
    raise SystemExit("no ImportError without triton")
'''


def test_ops_import_without_triton():
    # ops/__init__ must import without triton and only fail, clearly, when a kernel is asked for
    result = subprocess.run([sys.executable, "-c", _NO_TRITON_CHILD], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


_SM90_COMPILE_CHILD = r'''
# Compile every kernel for sm_90 with the launchers' own GPU block choices; no GPU or driver is needed.
import sys
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hf_attn_variants.ops.stickbreaking import decoding, parallel

assert not parallel.IS_INTERPRET
PTR = dict(snap="*fp32", gsnap="*fp32", mask="*u8", cu_seqlens="*i32", acc_out="*fp32", lr_out="*fp32")
for dtype, tname, D, DV, flags in [
    (torch.bfloat16, "*bf16", 128, 128, dict(ATTEND_CURRENT=False, IS_VARLEN=False, HAS_MASK=True)),
    (torch.float32, "*fp32", 40, 24, dict(ATTEND_CURRENT=True, IS_VARLEN=True, HAS_MASK=False)),
    (torch.float16, "*fp16", 256, 256, dict(ATTEND_CURRENT=False, IS_VARLEN=False, HAS_MASK=False)),
]:
    block_m, block_n = parallel._pick_blocks(4096, 4096, D)
    meta = parallel._launch_meta(torch.empty(0, dtype=dtype), D, DV, block_m)
    options = dict(num_warps=meta.pop("num_warps"), num_stages=meta.pop("num_stages"))
    const = dict(G=2, D=D, DV=DV, BLOCK_M=block_m, BLOCK_N=block_n, **flags, **meta)
    for fn in (parallel._sb_fwd_kernel, parallel._sb_bwd_dq_kernel, parallel._sb_bwd_dkv_kernel,
               decoding._sb_decode_kernel):
        c = {k: v for k, v in const.items() if k in fn.arg_names}
        sig = {}
        for n in fn.arg_names:
            if n in c:
                sig[n] = "constexpr"
            elif n in PTR:
                sig[n] = PTR[n]
            elif n in ("q", "k", "v", "o", "rem", "do", "drem", "dq", "dk", "dv"):
                sig[n] = tname
            else:  # the scales are floats, every other runtime argument (strides, sizes) an int
                sig[n] = "fp32" if n.startswith("scale") else "i32"
        triton.compile(ASTSource(fn, sig, c), target=GPUTarget("cuda", 90, 32), options=options)
print("compiled")
'''


def test_kernels_compile_for_sm90():
    """The interpreter is lenient (no dot-shape or type checks): compile the real GPU configs ahead of time."""
    pytest.importorskip("triton.backends.nvidia")
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _SM90_COMPILE_CHILD], capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="large shapes need a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_large_gpu(dtype):
    B, HQ, H, T, D = 2, 8, 2, 1024, 128
    q, k, v, do, drem = make_inputs(B, HQ, H, T, T, D, D, dtype, "bthd")
    ref = reference(q, k, v, do, drem)
    tri = run(parallel_stickbreaking_attn, q, k, v, do, drem)
    check_all(ref, tri, dtype)
    o, rem = decode_stickbreaking_attn(q[:, :, -1:].detach(), k.detach(), v.detach())
    assert_close("decode o", ref[0][:, :, -1:], o, TOL[dtype]["o"])
