"""GPU readiness check: the stick-breaking kernels at full size against the float64 reference, then their speed.

One run on one CUDA GPU (H100/H200), bounded to under 10 minutes in all:

1. correctness (budget 240 s): `parallel_stickbreaking_attn` / `decode_stickbreaking_attn` against
   `naive_stickbreaking_attn` in float64, on the kernels' own (rounded) inputs. GQA (32 query / 8 kv heads, D=128).
   Forward at T=4096 (bf16, fp32) and T=16384 (bf16; also with a "long stick", logits around -9 so each query spreads
   its weight over thousands of keys), packed varlen (`cu_seqlens`, 4 sequences summing to 16384), a padding mask
   (left and right padding, B=2). The float64 reference is O(T^2) in memory, so forward checks compare a random
   sample of ~256 query rows (plus the first and last): row i is computed alone from q[:, :, i:i+1] and the key
   prefix k/v[:, :, :i+1] (the reference puts query i at key position K - Q + i). Gradients (dq, dk, dv, through o
   and rem) are checked in full at T=2048 (dense bf16 and fp32, long stick, varlen, padding mask). Decode: Q in
   {1, 4, 16} new queries over a 16384-key cache, one with a padding mask.
   Every check reports the relative RMS error of each quantity and passes when all are within the tolerance of
   its dtype (the kernel tests' values: bf16 2e-2 for o, rem, dv and 3e-2 for dq, dk; fp32 1e-4).
2. kernel timings (budget 150 s): forward, forward+backward and decode (one query over a T-long cache) against
   SDPA with its flash backend and FlashAttention-2 (when `flash_attn` is importable), B=4 H=12 D=128 bf16,
   T in {1024, 4096, 16384}, `triton.testing.do_bench` (CUDA events): `bench_stickbreaking_gpu.time_kernels`.
3. model-level (budget 150 s): the functions of `bench_models.py` (softmax SDPA vs stick-breaking vs stick-breaking
   + depth shortcut, SmolLM2-135M config, random weights, bf16) on the GPU with CUDA synchronisation around every
   timed region: prefill T in {512, 2048}, dynamic-cache decode of 16 tokens after C in {1024, 4096}, a training
   step at T in {512, 2048}, 3 rounds each, and the keys each query visits before the stick runs out.

The budgets are cumulative deadlines from the start of the script (240 s, 390 s, 540 s), so time one part leaves
unused goes to the next; an item (a check, a T, a model benchmark) that would start after its part's deadline is
skipped and listed. A watchdog writes what has been measured and exits (status 124) at 590 s should anything hang.
Elapsed seconds are printed for every item and part. Exit status: 0, or 1 when a correctness check failed.

Writes `results.json` (everything) and `results.md` (Markdown tables ready to paste into the README) into --out.

Without CUDA it exits 0 at once with one line saying so. `--cpu-smoke` runs the whole pipeline on tiny shapes on the
CPU instead (the Triton interpreter, TRITON_INTERPRET=1 set before triton is imported): every code path runs and
both files are written, in well under a minute, but its timings say nothing about the GPU.

    python benchmarks/gpu_check.py [--out DIR] [--cpu-smoke] [--time-limit 540]
"""

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
import traceback

START = time.monotonic()
HERE = os.path.dirname(os.path.abspath(__file__))

# seconds per part on the GPU; the deadlines are cumulative (a part may use what an earlier one left)
BUDGETS = {"checks": 240, "kernels": 150, "models": 150}
HARD_LIMIT_MARGIN = 50  # the watchdog fires this long after the soft time limit
PART_TITLES = {"checks": "correctness vs float64 reference", "kernels": "kernel timings",
               "models": "model-level benchmark"}

PROFILES = {
    "cuda": dict(
        B=1, HQ=32, H=8, D=128, T_mid=4096, T_long=16384, T_grad=2048, rows=256,
        decode_B=2, decode_K=16384, decode_Q=(1, 4, 16),
        varlen=(1023, 1, 7360, 8000), varlen_grad=(300, 1, 1200, 547),
        pad=(500, 700), pad_grad=(200, 300),
        kernel_T=(1024, 4096, 16384), kernel_B=4, kernel_H=12, kernel_D=128,
        models=dict(prefill=[512, 2048], decode_context=[1024, 4096], decode_tokens=16, train_context=[512, 2048],
                    repeats=3, dtype="bfloat16"),
    ),
    "cpu-smoke": dict(
        B=1, HQ=4, H=2, D=16, T_mid=64, T_long=96, T_grad=48, rows=12,
        decode_B=2, decode_K=96, decode_Q=(1, 4),
        varlen=(20, 1, 45, 30), varlen_grad=(10, 1, 24, 13),
        pad=(8, 11), pad_grad=(5, 7),
        kernel_T=(32,), kernel_B=1, kernel_H=2, kernel_D=16,
        models=dict(prefill=[16], decode_context=[16], decode_tokens=2, train_context=[16], repeats=2,
                    dtype="float32"),
    ),
}

# relative RMS error allowed, per dtype and quantity (as in tests/ops/test_stickbreaking_triton.py)
TOLERANCES = {
    "bfloat16": dict(o=2e-2, rem=2e-2, dq=3e-2, dk=3e-2, dv=2e-2),
    "float32": dict(o=1e-4, rem=1e-4, dq=1e-4, dk=1e-4, dv=1e-4),
}
LONG_STICK_MEAN_LOGIT = -9.0


def log(message=""):
    print(f"[{time.monotonic() - START:6.1f} s] {message}" if message else "", flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# Part 1: correctness
# ----------------------------------------------------------------------------------------------------------------------


def rel_rms(ref, out):
    """Relative RMS error of `out` against `ref` (inf on NaN/inf; 0 when both are ~0)."""
    import torch

    ref, out = ref.double(), out.double()
    if not torch.isfinite(out).all():
        return math.inf
    err = (ref - out).pow(2).mean().sqrt().item()
    if err <= 1e-12:
        return 0.0
    return err / max(ref.pow(2).mean().sqrt().item(), 1e-30)


def make_qkv(B, HQ, H, Q, K, D, dtype, device, seed, long_stick=False):
    """q [B, HQ, Q, D], k and v [B, H, K, D] in `dtype`. `long_stick`: q and k share a direction u with opposite
    signs, so the logits s q.k are ~ N(-9, 1.6^2) and a query's weights spread over thousands of keys (random
    N(0, 1) inputs exhaust the stick within a few dozen keys, which would leave the long-range paths unchecked)."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, HQ, Q, D, device=device, generator=g)
    k = torch.randn(B, H, K, D, device=device, generator=g)
    v = torch.randn(B, H, K, D, device=device, generator=g)
    if long_stick:
        u = torch.randn(D, device=device, generator=g)
        u = u / u.norm()
        a = math.sqrt(-LONG_STICK_MEAN_LOGIT * math.sqrt(D))  # mean logit = -a^2 / sqrt(D)
        q, k = q + a * u, k - a * u
    return q.to(dtype), k.to(dtype), v.to(dtype)


def sample_rows(T, n, seed):
    import torch

    picked = torch.randperm(T, generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return sorted(set(picked) | {0, min(1, T - 1), T - 1})


def reference_rows(q, k, v, rows, attention_mask=None, attend_current=False):
    """float64 reference o, rem of the query rows `rows` of a full causal call: each row i alone, from q[:, :, i]
    and the key prefix [0, i] (query i sits at key position K - Q + i = i)."""
    import torch

    from hf_attn_variants.models.attn_variant_llama.stickbreaking_torch import naive_stickbreaking_attn

    outs, rems = [], []
    for i in rows:
        mask = None if attention_mask is None else attention_mask[..., i : i + 1, : i + 1]
        o, rem = naive_stickbreaking_attn(q[:, :, i : i + 1].double(), k[:, :, : i + 1].double(),
                                          v[:, :, : i + 1].double(), attend_current=attend_current,
                                          attention_mask=mask)
        outs.append(o)
        rems.append(rem)
    return torch.cat(outs, dim=2), torch.cat(rems, dim=2)


def run_with_grad(fn, q, k, v, do, drem, **kwargs):
    """o, rem, dq, dk, dv of sum(o * do) + sum(rem * drem)."""
    for x in (q, k, v):
        x.grad = None
    o, rem = fn(q, k, v, **kwargs)
    ((o.float() * do.float()).sum() + (rem.float() * drem.float()).sum()).backward()
    return o.detach(), rem.detach(), q.grad, k.grad, v.grad


def reference_full(q, k, v, do, drem, attention_mask=None, **kwargs):
    """float64 reference with autograd gradients, one batch element at a time (O(T^2) memory each)."""
    import torch

    from hf_attn_variants.models.attn_variant_llama.stickbreaking_torch import naive_stickbreaking_attn

    parts = []
    for b in range(q.shape[0]):
        q64, k64, v64 = (x.detach()[b : b + 1].double().requires_grad_() for x in (q, k, v))
        mask = None
        if attention_mask is not None:
            mask = attention_mask[b : b + 1] if attention_mask.shape[0] > 1 else attention_mask
        parts.append(run_with_grad(naive_stickbreaking_attn, q64, k64, v64, do[b : b + 1].double(),
                                   drem[b : b + 1].double(), attention_mask=mask, **kwargs))
        del q64, k64, v64
    return [torch.cat(x, dim=0) for x in zip(*parts)]


def padding_mask(B, T, pads, device, queries=None):
    """bool [B, 1, Q, T] (True = visible): batch element 0 right-padded by pads[0] tokens, element 1 left-padded by
    pads[1] (transformers' layout for a padded batch, broadcast over heads and queries)."""
    import torch

    keep = torch.ones(B, T, dtype=torch.bool, device=device)
    keep[0, T - pads[0] :] = False
    if B > 1:
        keep[1, : pads[1]] = False
    return keep[:, None, None, :].expand(B, 1, queries or T, T)


def _errors(names, refs, outs):
    return {name: rel_rms(r, t) for name, r, t in zip(names, refs, outs)}


def check_forward(p, device, dtype, T, B=None, long_stick=False, pads=None, attend_current=False, seed=0):
    import torch

    from hf_attn_variants.ops.stickbreaking import parallel_stickbreaking_attn

    B = B or p["B"]
    q, k, v = make_qkv(B, p["HQ"], p["H"], T, T, p["D"], dtype, device, seed, long_stick)
    mask = None if pads is None else padding_mask(B, T, pads, device)
    with torch.no_grad():
        o, rem = parallel_stickbreaking_attn(q, k, v, attend_current=attend_current, attention_mask=mask)
    rows = sample_rows(T, p["rows"], seed)
    ref = reference_rows(q, k, v, rows, mask, attend_current)
    index = torch.tensor(rows, device=device)
    picked = (o.index_select(2, index), rem.index_select(2, index))
    return dict(rows=len(rows), errors=_errors(("o", "rem"), ref, picked))


def check_varlen_forward(p, device, dtype, lengths, attend_current=True, seed=1):
    import torch

    from hf_attn_variants.ops.stickbreaking import parallel_stickbreaking_attn

    T = sum(lengths)
    q, k, v = make_qkv(1, p["HQ"], p["H"], T, T, p["D"], dtype, device, seed)
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    with torch.no_grad():
        o, rem = parallel_stickbreaking_attn(q, k, v, attend_current=attend_current, cu_seqlens=cu)
    refs, outs, n_rows = ([], []), ([], []), 0
    for s, e in zip(bounds[:-1], bounds[1:]):
        rows = sample_rows(e - s, max(2, round(p["rows"] * (e - s) / T)), seed + s)
        n_rows += len(rows)
        ref = reference_rows(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], rows, None, attend_current)
        index = torch.tensor([s + i for i in rows], device=device)
        for acc, x in zip(refs, ref):
            acc.append(x)
        outs[0].append(o.index_select(2, index))
        outs[1].append(rem.index_select(2, index))
    cat = lambda xs: torch.cat(xs, dim=2)  # noqa: E731
    return dict(rows=n_rows, errors=_errors(("o", "rem"), map(cat, refs), map(cat, outs)))


def _grad_inputs(q, k, v, seed):
    import torch

    g = torch.Generator(device=q.device).manual_seed(seed + 100)
    do = torch.randn(q.shape[:-1] + v.shape[-1:], device=q.device, generator=g).to(q.dtype)
    drem = torch.randn(q.shape[:-1], device=q.device, generator=g).to(q.dtype)
    return [x.requires_grad_() for x in (q, k, v)], do, drem


def check_grad(p, device, dtype, T, B=None, long_stick=False, pads=None, attend_current=False, seed=2):
    from hf_attn_variants.ops.stickbreaking import parallel_stickbreaking_attn

    B = B or p["B"]
    (q, k, v), do, drem = _grad_inputs(*make_qkv(B, p["HQ"], p["H"], T, T, p["D"], dtype, device, seed, long_stick),
                                       seed)
    mask = None if pads is None else padding_mask(B, T, pads, device)
    out = run_with_grad(parallel_stickbreaking_attn, q, k, v, do, drem, attend_current=attend_current,
                        attention_mask=mask)
    ref = reference_full(q, k, v, do, drem, attention_mask=mask, attend_current=attend_current)
    return dict(errors=_errors(("o", "rem", "dq", "dk", "dv"), ref, out))


def check_varlen_grad(p, device, dtype, lengths, attend_current=True, seed=3):
    import torch

    from hf_attn_variants.ops.stickbreaking import parallel_stickbreaking_attn

    T = sum(lengths)
    (q, k, v), do, drem = _grad_inputs(*make_qkv(1, p["HQ"], p["H"], T, T, p["D"], dtype, device, seed), seed)
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    out = run_with_grad(parallel_stickbreaking_attn, q, k, v, do, drem, attend_current=attend_current, cu_seqlens=cu)
    pieces = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        seg = [x.detach()[:, :, s:e] for x in (q, k, v, do, drem)]
        pieces.append(reference_full(*seg, attend_current=attend_current))
    ref = [torch.cat(x, dim=2) for x in zip(*pieces)]
    return dict(errors=_errors(("o", "rem", "dq", "dk", "dv"), ref, out))


def check_decode(p, device, dtype, Q, pads=None, attend_current=False, seed=4):
    import torch

    from hf_attn_variants.models.attn_variant_llama.stickbreaking_torch import naive_stickbreaking_attn
    from hf_attn_variants.ops.stickbreaking import decode_stickbreaking_attn

    B, K = p["decode_B"], p["decode_K"]
    q, k, v = make_qkv(B, p["HQ"], p["H"], Q, K, p["D"], dtype, device, seed)
    mask = None if pads is None else padding_mask(B, K, pads, device, queries=Q)
    with torch.no_grad():
        o, rem = decode_stickbreaking_attn(q, k, v, attend_current=attend_current, attention_mask=mask)
        ref = naive_stickbreaking_attn(q.double(), k.double(), v.double(), attend_current=attend_current,
                                       attention_mask=mask)
    return dict(errors=_errors(("o", "rem"), ref, (o, rem)))


def check_list(p):
    """(name, shape, dtype name, function, kwargs), most important first (later ones are skipped first)."""
    import torch

    bf16, fp32 = torch.bfloat16, torch.float32
    heads = f"HQ{p['HQ']}/H{p['H']} D{p['D']}"
    Tm, Tl, Tg, K = p["T_mid"], p["T_long"], p["T_grad"], p["decode_K"]
    vl, vg = p["varlen"], p["varlen_grad"]
    Qs = p["decode_Q"]
    checks = [
        (f"forward T={Tm}", f"B{p['B']} {heads} T{Tm}", bf16, check_forward, dict(T=Tm)),
        (f"forward T={Tl}", f"B{p['B']} {heads} T{Tl}", bf16, check_forward, dict(T=Tl)),
        (f"forward+backward T={Tg}", f"B{p['B']} {heads} T{Tg}", bf16, check_grad, dict(T=Tg)),
        (f"decode Q={Qs[0]} over K={K}", f"B{p['decode_B']} {heads} Q{Qs[0]} K{K}", bf16, check_decode,
         dict(Q=Qs[0])),
        (f"varlen forward ({len(vl)} seqs, {sum(vl)} tokens)", f"{heads} lengths {list(vl)}", bf16,
         check_varlen_forward, dict(lengths=vl)),
        (f"padding mask forward T={Tm}", f"B2 {heads} T{Tm} pads {list(p['pad'])}", bf16, check_forward,
         dict(T=Tm, B=2, pads=p["pad"])),
        (f"long stick forward T={Tl}", f"B{p['B']} {heads} T{Tl} z~N({LONG_STICK_MEAN_LOGIT:g},1.6)", bf16,
         check_forward, dict(T=Tl, long_stick=True, attend_current=True)),
        (f"forward T={Tm}", f"B{p['B']} {heads} T{Tm}", fp32, check_forward, dict(T=Tm)),
        (f"forward+backward T={Tg}", f"B{p['B']} {heads} T{Tg}", fp32, check_grad, dict(T=Tg)),
        (f"varlen forward+backward ({len(vg)} seqs, {sum(vg)} tokens)", f"{heads} lengths {list(vg)}", bf16,
         check_varlen_grad, dict(lengths=vg)),
        (f"padding mask forward+backward T={Tg}", f"B2 {heads} T{Tg} pads {list(p['pad_grad'])}", bf16, check_grad,
         dict(T=Tg, B=2, pads=p["pad_grad"])),
        (f"long stick forward+backward T={Tg}", f"B{p['B']} {heads} T{Tg} z~N({LONG_STICK_MEAN_LOGIT:g},1.6)", bf16,
         check_grad, dict(T=Tg, long_stick=True)),
    ]
    for Q in Qs[1:]:
        checks.append((f"decode Q={Q} over K={K}" + (" (attend_current)" if Q == Qs[1] else ""),
                       f"B{p['decode_B']} {heads} Q{Q} K{K}", bf16, check_decode,
                       dict(Q=Q, attend_current=Q == Qs[1])))
    checks.append((f"decode Q={Qs[-1]} over K={K} + padding mask", f"B{p['decode_B']} {heads} Q{Qs[-1]} K{K} pads "
                   f"{list(p['pad'])}", bf16, check_decode, dict(Q=Qs[-1], pads=p["pad"])))
    checks.append((f"decode Q={Qs[0]} over K={K}", f"B{p['decode_B']} {heads} Q{Qs[0]} K{K}", fp32, check_decode,
                   dict(Q=Qs[0])))
    return checks


def part_checks(ctx):
    import torch

    p, device = ctx["profile"], ctx["device"]
    results = ctx["results"]["checks"]
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 must mean fp32 (the kernels use "ieee" dots for it)
    try:
        for name, shape, dtype, fn, kwargs in check_list(p):
            dtype_name = str(dtype).replace("torch.", "")
            entry = dict(name=name, shape=shape, dtype=dtype_name, tolerances=TOLERANCES[dtype_name])
            if time.monotonic() > ctx["deadline"]:
                entry.update(status="skipped", passed=None)
                results.append(entry)
                ctx["skipped"].append(f"{name} ({dtype_name})")
                continue
            started = time.monotonic()
            try:
                entry.update(fn(p, device, dtype, **kwargs))
                entry["passed"] = all(err <= entry["tolerances"][q] for q, err in entry["errors"].items())
                entry["status"] = "pass" if entry["passed"] else "FAIL"
            except Exception as error:  # noqa: BLE001 - report and go on with the other checks
                entry.update(status="error", passed=False, error=f"{type(error).__name__}: {error}"[:500])
                traceback.print_exc()
            entry["seconds"] = round(time.monotonic() - started, 2)
            results.append(entry)
            errors = " ".join(f"{q} {e:.1e}" for q, e in entry.get("errors", {}).items())
            log(f"  {entry['status']:>5s}  {name} [{shape}, {dtype_name}]  {errors or entry.get('error')}  "
                f"({entry['seconds']:.1f} s)")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


# ----------------------------------------------------------------------------------------------------------------------
# Part 2: kernel timings
# ----------------------------------------------------------------------------------------------------------------------


def part_kernels(ctx):
    import torch
    from bench_stickbreaking_gpu import cuda_bench, flash_attn_or_none, time_kernels, wall_bench

    p, device = ctx["profile"], ctx["device"]
    _, fa_version = flash_attn_or_none()
    settings = dict(B=p["kernel_B"], H=p["kernel_H"], D=p["kernel_D"], dtype="bfloat16", T=list(p["kernel_T"]),
                    sdpa_backend="flash", timer="triton.testing.do_bench" if device.type == "cuda" else "wall clock",
                    flash_attn=fa_version if device.type == "cuda" else "not used on CPU")
    out = ctx["results"]["kernels"]
    out["settings"] = settings
    log(f"  B={settings['B']} H={settings['H']} D={settings['D']} bf16, flash_attn {settings['flash_attn']}; "
        "ms: median [p20, p80]")
    log("  | T | mode | stick-breaking | SDPA | FA2 | SB/SDPA | SB/FA2 |")
    rows, notes, used = time_kernels(
        list(p["kernel_T"]), p["kernel_B"], p["kernel_H"], p["kernel_D"], torch.bfloat16, device,
        bench=cuda_bench if device.type == "cuda" else wall_bench(reps=1, warmup=1), sdpa_backend="flash",
        deadline=ctx["deadline"], log=lambda line: log("  " + line),
    )
    out["rows"] = rows
    out["sdpa_backends_used"] = used
    ctx["skipped"].extend(notes)


# ----------------------------------------------------------------------------------------------------------------------
# Part 3: model-level benchmark (functions of bench_models.py, with CUDA synchronisation)
# ----------------------------------------------------------------------------------------------------------------------


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _ids(bench_models, model, length, device, seed=0):
    return bench_models.tokens(model, length, seed=seed).to(device)


def time_prefill(bench_models, model, length, device):
    import torch

    ids = _ids(bench_models, model, length, device)
    with torch.no_grad():
        _sync(device)
        start = time.perf_counter()
        model(ids, logits_to_keep=1)
        _sync(device)
    return time.perf_counter() - start


def time_decode(bench_models, model, context, steps, device):
    """Seconds per token of `steps` single-token steps with a dynamic cache after a prefill of `context` tokens."""
    import torch
    from transformers import DynamicCache

    ids = _ids(bench_models, model, context + steps, device)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :context], past_key_values=cache, use_cache=True, logits_to_keep=1)
        _sync(device)
        start = time.perf_counter()
        for t in range(context, context + steps):
            model(ids[:, t : t + 1], past_key_values=cache, use_cache=True, logits_to_keep=1)
        _sync(device)
    return (time.perf_counter() - start) / steps


def time_train_step(bench_models, model, length, optimizer, device):
    ids = _ids(bench_models, model, length, device, seed=1)
    model.train()
    _sync(device)
    start = time.perf_counter()
    loss = model(ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _sync(device)
    elapsed = time.perf_counter() - start
    model.eval()
    return elapsed


def _model_rounds(bench_models, models, settings, out, ctx, device):
    """The timed sections of bench_models.py's main(), each skipped once the part's deadline has passed."""
    import torch

    repeats = settings["repeats"]

    def report(section, key, summary, per_token=None):
        out[section][key] = {}
        for name, (s, r, a, b) in summary.items():
            entry = {"seconds": s, "ratio": r, "iqr": [a, b]}
            if per_token:
                entry["tokens_per_s"] = per_token / s
            out[section][key][name] = entry
            shown = f"{per_token / s:10.1f} tok/s" if per_token else f"{s * 1e3:9.2f} ms"
            log(f"  {section:8s} {key:>8s}  {name:32s} {shown}  time {r:5.2f}x softmax (IQR {a:.2f}-{b:.2f})")

    def due(label):
        if time.monotonic() > ctx["deadline"]:
            ctx["skipped"].append(f"model-level {label}")
            log(f"  skipped {label} (budget spent)")
            return False
        return True

    for length in settings["prefill"]:
        if due(f"prefill T={length}"):
            for model in models.values():
                time_prefill(bench_models, model, min(length, 64), device)  # warm-up (kernel compilation)
            summary = bench_models.interleaved(
                models, repeats, lambda n, m, length=length: time_prefill(bench_models, m, length, device))
            report("prefill", f"T={length}", summary)
    steps = settings["decode_tokens"]
    for context in settings["decode_context"]:
        if due(f"decode C={context}"):
            for model in models.values():  # warm-up at the real context: short caches take another kernel
                time_decode(bench_models, model, context, 1, device)
            summary = bench_models.interleaved(
                models, repeats, lambda n, m, context=context: time_decode(bench_models, m, context, steps, device))
            report("decode", f"C={context}", summary, per_token=1)
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-5) for name, m in models.items()}
    for length in settings["train_context"]:
        if due(f"train T={length}"):
            for name, model in models.items():
                time_train_step(bench_models, model, min(length, 64), optimizers[name], device)  # warm-up
            summary = bench_models.interleaved(
                models, repeats,
                lambda n, m, length=length: time_train_step(bench_models, m, length, optimizers[n], device))
            report("train", f"T={length}", summary, per_token=length)
    if settings["prefill"] and due("keys visited"):
        original = bench_models.tokens
        bench_models.tokens = lambda *a, **kw: original(*a, **kw).to(device)  # keys_visited builds its own ids
        try:
            out["keys_visited"] = kv = bench_models.keys_visited(models["stickbreaking"], max(settings["prefill"]))
        finally:
            bench_models.tokens = original
        log(f"  keys visited per query before the early exit (T={kv['context']}): median {kv['median']}, "
            f"p90 {kv['p90']}, max {kv['max']}")


def part_models(ctx):
    import tempfile

    import bench_models
    import torch

    p, device = ctx["profile"], ctx["device"]
    settings = dict(p["models"])
    out = ctx["results"]["models"]
    with tempfile.TemporaryDirectory() as tmp:
        if ctx["smoke"]:
            from hf_attn_variants import AttnVariantLlamaConfig
            from hf_attn_variants.testing import tiny_config_kwargs

            AttnVariantLlamaConfig(**tiny_config_kwargs()).save_pretrained(tmp)
            config, config_name = os.path.join(tmp, "config.json"), "tiny test config (2 layers, hidden 32)"
        else:
            config, config_name = bench_models.DEFAULT_CONFIG, os.path.basename(bench_models.DEFAULT_CONFIG)
        settings.update(config=config_name, weights="random", device=device.type)
        out["settings"] = settings
        args = argparse.Namespace(config=config, weights="random", dtype=settings["dtype"])
        started = time.monotonic()
        models = {name: m.to(device) for name, m in bench_models.build_variants(args).items()}
    log(f"  built {len(models)} variants of {config_name} ({settings['dtype']}) in {time.monotonic() - started:.1f} s")
    out.update(prefill={}, decode={}, train={})
    try:
        _model_rounds(bench_models, models, settings, out, ctx, device)
    finally:
        del models
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------------


def _ms(t):
    return "n/a" if t is None else f"{t[0]:.3f} [{t[1]:.3f}, {t[2]:.3f}]"


def _x(r):
    return "n/a" if r is None else f"{r:.2f}x"


def render_markdown(results):
    meta = results["meta"]
    lines = [f"## GPU check: {meta['device']} ({meta['date']})", ""]
    if meta["mode"] == "cpu-smoke":
        lines += ["*CPU smoke run: tiny shapes in the Triton interpreter. The timings say nothing about a GPU.*", ""]
    checks = [c for c in results["checks"] if c.get("status") != "skipped"]
    failed = [c for c in checks if not c.get("passed")]
    verdict = (f"**{len(checks) - len(failed)}/{len(checks)} correctness checks pass**" if checks
               else "**no correctness check ran**")
    if len(checks) < len(results["checks"]):
        verdict += f" ({len(results['checks']) - len(checks)} skipped)"
    lines += [f"torch {meta['torch']}, triton {meta['triton']}, transformers {meta['transformers']}, "
              f"flash_attn {meta['flash_attn']}, commit {meta['commit']}; `{meta['command']}` took "
              f"{meta.get('elapsed_s', float('nan')):.0f} s (limit {meta['time_limit_s']:.0f} s). {verdict}.", ""]

    lines += ["### Correctness against the float64 reference", "",
              "Relative RMS error of the outputs (o, rem) and of the gradients (dq, dk, dv, through o and rem) "
              "against `naive_stickbreaking_attn` in float64 on the same rounded inputs. Forward checks at long T "
              "compare a random sample of query rows; gradients are checked in full. Tolerance: bf16 2e-2 "
              "(o, rem, dv) and 3e-2 (dq, dk), fp32 1e-4.", "",
              "| check | shape | dtype | o | rem | dq | dk | dv | result |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c in results["checks"]:
        errs = c.get("errors", {})
        cells = [f"{errs[q]:.1e}" if q in errs else "" for q in ("o", "rem", "dq", "dk", "dv")]
        status = c.get("status", "?")
        if status == "error":
            status = f"error: {c['error'][:80]}"
        rows = f", {c['rows']} rows" if "rows" in c else ""
        lines.append(f"| {c['name']} | {c['shape']}{rows} | {c['dtype']} | " + " | ".join(cells) + f" | {status} |")
    lines.append("")

    k = results["kernels"]
    lines += ["### Kernel timings", ""]
    if k.get("settings"):
        s = k["settings"]
        lines += [f"B={s['B']} H={s['H']} D={s['D']} {s['dtype']}, causal; ms, median [p20, p80] of {s['timer']}. "
                  f"SDPA backend: {', '.join(k.get('sdpa_backends_used', [])) or s['sdpa_backend']}; "
                  f"FA2: flash_attn {s['flash_attn']}. Decode: one query over a T-long cache.", ""]
    lines += ["| T | mode | stick-breaking | SDPA | FA2 | SB/SDPA | SB/FA2 |", "|---|---|---|---|---|---|---|"]
    for r in k.get("rows", []):
        lines.append(f"| {r['T']} | {r['mode']} | {_ms(r['stickbreaking'])} | {_ms(r['sdpa'])} | {_ms(r['fa2'])} | "
                     f"{_x(r['sb_over_sdpa'])} | {_x(r['sb_over_fa2'])} |")
    lines.append("")

    m = results["models"]
    lines += ["### Model-level", ""]
    if m.get("settings"):
        s = m["settings"]
        lines += [f"`benchmarks/bench_models.py` variants, {s['config']}, {s['weights']} weights, {s['dtype']} on "
                  f"{s['device']}; {s['repeats']} interleaved rounds; ratio = median over rounds of variant time / "
                  f"softmax time (IQR). Decode: {s['decode_tokens']} dynamic-cache steps after C tokens; train: "
                  "forward + backward + AdamW step.", ""]
    lines += ["| benchmark | variant | time | throughput | time vs softmax (IQR) |", "|---|---|---|---|---|"]
    for section in ("prefill", "decode", "train"):
        for key, variants in m.get(section, {}).items():
            for name, e in variants.items():
                per = e["seconds"] * 1e3
                unit = "ms/token" if section == "decode" else "ms"
                tput = f"{e['tokens_per_s']:.1f} tok/s" if "tokens_per_s" in e else ""
                lines.append(f"| {section} {key} | {name} | {per:.2f} {unit} | {tput} | "
                             f"{e['ratio']:.2f}x ({e['iqr'][0]:.2f}-{e['iqr'][1]:.2f}) |")
    if m.get("keys_visited"):
        kv = m["keys_visited"]
        lines += ["", f"Keys visited per query before the stick runs out (T={kv['context']}, random weights): "
                  f"median {kv['median']}, p90 {kv['p90']}, max {kv['max']}."]
    lines.append("")

    lines += ["### Parts", "", "| part | budget (s) | deadline (s) | elapsed (s) | status |", "|---|---|---|---|---|"]
    for name, part in results["parts"].items():
        lines.append(f"| {PART_TITLES[name]} | {part['budget_s']:.0f} | {part['deadline_s']:.0f} | "
                     f"{part.get('elapsed_s', float('nan')):.1f} | {part.get('status', 'not run')} |")
    if results["skipped"] or results["notes"]:
        lines += ["", "Skipped / notes:", ""] + [f"- skipped: {s}" for s in results["skipped"]] + \
                 [f"- {n}" for n in results["notes"]]
    lines.append("")
    return "\n".join(lines)


_write_lock = threading.Lock()


def write_results(results, out_dir):
    with _write_lock:
        for _ in range(3):  # the watchdog may write while the main thread appends
            try:
                text = json.dumps(results, indent=1, default=str)
                markdown = render_markdown(json.loads(text))
                break
            except RuntimeError:
                time.sleep(0.1)
        else:
            return
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "results.json"), "w") as handle:
            handle.write(text + "\n")
        with open(os.path.join(out_dir, "results.md"), "w") as handle:
            handle.write(markdown)


def _meta(args, device, smoke):
    import datetime

    import torch
    import transformers
    import triton
    from bench_stickbreaking_gpu import flash_attn_or_none

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    return dict(
        mode="cpu-smoke" if smoke else "cuda", device=name,
        capability=".".join(map(str, torch.cuda.get_device_capability(device))) if device.type == "cuda" else None,
        torch=torch.__version__, triton=triton.__version__, transformers=transformers.__version__,
        cuda=torch.version.cuda, flash_attn=flash_attn_or_none()[1], commit=commit,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        command="python benchmarks/gpu_check.py" + (" --cpu-smoke" if smoke else ""),
        time_limit_s=args.time_limit,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(HERE, "..", "out", "gpu_check"),
                        help="folder for results.json and results.md (default: out/gpu_check)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny shapes on the CPU in the Triton interpreter (tests the pipeline, not the GPU)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="soft limit in seconds for the three parts together; their budgets scale with it "
                             f"(default {sum(BUDGETS.values())} on a GPU, 300 with --cpu-smoke)")
    args = parser.parse_args()
    smoke = args.cpu_smoke
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    sys.path.insert(0, HERE)  # bench_models, bench_stickbreaking_gpu

    import torch

    if not smoke and not torch.cuda.is_available():
        print("gpu_check: needs a CUDA GPU (torch.cuda.is_available() is False); nothing was checked. "
              "`--cpu-smoke` runs the pipeline on tiny CPU shapes.")
        return 0

    device = torch.device("cpu" if smoke else "cuda")
    if args.time_limit is None:
        args.time_limit = 300.0 if smoke else float(sum(BUDGETS.values()))
    scale = args.time_limit / sum(BUDGETS.values())
    results = dict(meta=_meta(args, device, smoke), parts={}, checks=[], kernels={}, models={}, skipped=[], notes=[])
    deadline = 0.0
    for name, budget in BUDGETS.items():
        deadline += budget * scale
        results["parts"][name] = dict(budget_s=budget * scale, deadline_s=deadline)
    out_dir = os.path.abspath(args.out)
    state = {"part": "startup"}

    def watchdog():
        results["notes"].append(f"watchdog: stopped at {time.monotonic() - START:.0f} s during the "
                                f"{state['part']} part (hard limit {args.time_limit + HARD_LIMIT_MARGIN:.0f} s)")
        results["meta"]["elapsed_s"] = time.monotonic() - START
        write_results(results, out_dir)
        print(f"gpu_check: hard time limit reached during {state['part']}; partial results in {out_dir}", flush=True)
        os._exit(124)

    timer = threading.Timer(max(1.0, args.time_limit + HARD_LIMIT_MARGIN - (time.monotonic() - START)), watchdog)
    timer.daemon = True
    timer.start()

    meta = results["meta"]
    log(f"gpu_check on {meta['device']}: torch {meta['torch']}, triton {meta['triton']}, flash_attn "
        f"{meta['flash_attn']}; soft limit {args.time_limit:.0f} s (startup took {time.monotonic() - START:.1f} s)")
    parts = {"checks": part_checks, "kernels": part_kernels, "models": part_models}
    for index, (name, fn) in enumerate(parts.items(), 1):
        part = results["parts"][name]
        state["part"] = name
        ctx = dict(profile=PROFILES["cpu-smoke" if smoke else "cuda"], device=device, results=results, smoke=smoke,
                   deadline=START + part["deadline_s"], skipped=results["skipped"])
        log(f"== part {index}/3: {PART_TITLES[name]} (budget {part['budget_s']:.0f} s, deadline "
            f"{part['deadline_s']:.0f} s) ==")
        started = time.monotonic()
        if started > ctx["deadline"]:
            part["status"] = "skipped (no time left)"
            results["skipped"].append(f"the whole {PART_TITLES[name]} part")
        else:
            try:
                fn(ctx)
                part["status"] = "done"
            except Exception as error:  # noqa: BLE001 - keep what the other parts measure
                traceback.print_exc()
                part["status"] = f"error: {type(error).__name__}: {error}"[:300]
        part["elapsed_s"] = time.monotonic() - started
        log(f"-- {PART_TITLES[name]}: {part['status']} in {part['elapsed_s']:.1f} s")
        write_results(results, out_dir)  # keep what is done if a later part hangs
    timer.cancel()

    meta["elapsed_s"] = time.monotonic() - START
    ran = [c for c in results["checks"] if c.get("status") != "skipped"]
    failed = [c for c in ran if not c.get("passed")]
    results["all_checks_passed"] = bool(ran) and not failed
    write_results(results, out_dir)
    log(f"{len(ran) - len(failed)}/{len(ran)} correctness checks pass; {len(results['skipped'])} items skipped; "
        f"total {meta['elapsed_s']:.1f} s; wrote {os.path.join(out_dir, 'results.json')} and results.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
