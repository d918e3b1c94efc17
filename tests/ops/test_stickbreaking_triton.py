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
    """|z| up to 30: softplus cutoff and fp32 cumsum matter here (the official bf16 cumsum loses ~10% per weight)."""
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


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(q=torch.zeros(2, 4, 8)), "`q` must be a 4-D"),
        (dict(q=torch.zeros(1, 3, 8, 16)), "multiple of `k` heads"),
        (dict(q=torch.zeros(1, 4, 9, 16)), "must not exceed `k` length"),
        (dict(q=torch.zeros(1, 4, 8, 16, dtype=torch.float64)), "float16, bfloat16 or float32"),
        (dict(q=torch.zeros(1, 4, 8, 512), k=torch.zeros(1, 2, 8, 512)), "up to 256"),
        (dict(attention_mask=torch.zeros(1, 1, 8, 8)), "bool"),
        (dict(q=torch.zeros(2, 4, 8, 16), k=torch.zeros(2, 2, 8, 16), v=torch.zeros(2, 2, 8, 16),
              cu_seqlens=torch.tensor([0, 8], dtype=torch.int32)), "batch size 1"),
        (dict(cu_seqlens=torch.tensor([0, 8])), "int32"),
    ],
    ids=["ndim", "gqa", "q>k", "dtype", "d>256", "mask-dtype", "cu-batch", "cu-dtype"],
)
def test_input_validation(kwargs, match):
    args = dict(q=torch.zeros(1, 4, 8, 16), k=torch.zeros(1, 2, 8, 16), v=torch.zeros(1, 2, 8, 16))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        parallel_stickbreaking_attn(**args)


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
