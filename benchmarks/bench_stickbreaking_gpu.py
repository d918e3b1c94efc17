"""Stick-breaking Triton kernels vs FlashAttention-2 and SDPA (causal softmax) on one CUDA GPU.

Shapes follow the official kernel's reports: B=4, H=12, D=128, bf16, T in {1024, 4096, 16384}. Modes:
forward, forward+backward, and decode (one new query over a T-long cache). Every time is a median of
`triton.testing.do_bench` (20%/80% quantiles in brackets), and every ratio compares numbers measured in this run.
SDPA runs with its flash backend forced (`--sdpa-backend default` lets PyTorch choose; a forced backend that cannot
run a case falls back to the default, and the table says so). Before timing, the kernel is checked against the
float64 reference on a small shape; a red check stops the script. `benchmarks/gpu_check.py` runs the same timings
(`time_kernels`) after a full-size correctness check.

    python benchmarks/bench_stickbreaking_gpu.py [--T 1024 4096 16384] [--sdpa-backend flash|default]
"""

import argparse
import statistics
import sys
import time

import torch


def cuda_bench(fn):
    """(median, p20, p80) in ms of `triton.testing.do_bench` (CUDA events)."""
    import triton.testing

    med, lo, hi = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
    return med, lo, hi


def wall_bench(reps=3, warmup=1):
    """A timer for CPU tensors (the Triton interpreter): (median, p20, p80) in ms of `reps` calls after `warmup`."""

    def bench(fn):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        times.sort()
        pick = lambda p: times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
        return statistics.median(times), pick(0.2), pick(0.8)

    return bench



def _fmt(t):
    return "n/a" if t is None else f"{t[0]:.3f} [{t[1]:.3f}, {t[2]:.3f}]"


def _ratio(a, b):
    return "n/a" if a is None or b is None else f"{a[0] / b[0]:.2f}x"


def flash_attn_or_none():
    """(flash_attn_func, version) or (None, 'not installed')."""
    try:
        import flash_attn
        from flash_attn import flash_attn_func
    except ImportError:
        return None, "not installed"
    except Exception as error:  # noqa: BLE001 - e.g. a wheel built for another torch: an undefined symbol
        return None, f"not importable ({type(error).__name__}: {str(error)[:120]})"
    return flash_attn_func, getattr(flash_attn, "__version__", "installed")


def sdpa_bench(backend, bench, used):
    """`bench` of an SDPA call with `backend` ('flash' or 'default') forced around the whole timing (entering
    `sdpa_kernel` per call would add its overhead to the decode times). A case the forced backend rejects is timed
    with PyTorch's default choice; `used` collects the backends actually timed."""
    if backend == "default":
        def run(fn):
            used.add("default")
            return bench(fn)
        return run

    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"flash": SDPBackend.FLASH_ATTENTION}[backend]

    def run(fn):
        with sdpa_kernel([chosen]):
            try:
                fn()  # probe: raises when the forced backend cannot run this case
            except RuntimeError:
                pass
            else:
                used.add(backend)
                return bench(fn)
        used.add("default")
        return bench(fn)

    return run


def _time_one_length(T, B, H, D, dtype, device, bench, sdpa_timed, flash_attn_func):
    """[(mode, stick-breaking, SDPA, FA2 timings)] for one sequence length (its tensors are freed on return)."""
    import torch.nn.functional as F

    from hf_attn_variants.ops.stickbreaking import decode_stickbreaking_attn, parallel_stickbreaking_attn

    q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    qf, kf, vf = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    dof = do.transpose(1, 2).contiguous()

    def sb_fwd():
        return parallel_stickbreaking_attn(q, k, v)[0]

    def sdpa_fwd():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def fa_fwd():
        return flash_attn_func(qf, kf, vf, causal=True)

    def fwd_bwd(fn, inputs, grad):
        def run():
            for x in inputs:
                x.grad = None
            fn().backward(grad)
        return run

    measured = []
    with torch.no_grad():
        measured.append(("fwd", bench(sb_fwd), sdpa_timed(sdpa_fwd), bench(fa_fwd) if flash_attn_func else None))
    measured.append((
        "fwd+bwd",
        bench(fwd_bwd(sb_fwd, (q, k, v), do)),
        sdpa_timed(fwd_bwd(sdpa_fwd, (q, k, v), do)),
        bench(fwd_bwd(fa_fwd, (qf, kf, vf), dof)) if flash_attn_func else None,
    ))
    # decode: one new query over the T-long cache (the cache already holds the new token)
    q1, k1, v1 = q.detach()[:, :, -1:], k.detach(), v.detach()
    q1f, k1f, v1f = qf.detach()[:, -1:], kf.detach(), vf.detach()
    with torch.no_grad():
        measured.append((
            "decode",
            bench(lambda: decode_stickbreaking_attn(q1, k1, v1)),
            sdpa_timed(lambda: F.scaled_dot_product_attention(q1, k1, v1)),
            bench(lambda: flash_attn_func(q1f, k1f, v1f, causal=True)) if flash_attn_func else None,
        ))
    return measured


def time_kernels(Ts, B=4, H=12, D=128, dtype=torch.bfloat16, device="cuda", bench=None, sdpa_backend="flash",
                 deadline=None, log=print):
    """Time stick-breaking vs SDPA vs FA2 for forward, forward+backward and decode at each T.

    Returns (rows, notes, sdpa backends used): one row dict per (T, mode) with `stickbreaking`, `sdpa`, `fa2` as
    (median, p20, p80) ms or None, and the ratios. A T is skipped (with a note) once `time.monotonic()` has passed
    `deadline`, or when the previous T took longer than the time left.
    """
    bench = bench or cuda_bench
    flash_attn_func, _ = flash_attn_or_none()
    if torch.device(device).type != "cuda":
        flash_attn_func = None
    used = set()
    sdpa_timed = sdpa_bench(sdpa_backend, bench, used)
    rows, notes, previous = [], [], 0.0
    for T in Ts:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or previous > left:
                notes.append(f"kernel timings: T={T} and longer skipped ({max(left, 0):.0f} s of the budget left, "
                             f"the previous T took {previous:.0f} s)")
                break
        started = time.monotonic()
        for mode, sb, sd, fa in _time_one_length(T, B, H, D, dtype, device, bench, sdpa_timed, flash_attn_func):
            row = dict(T=T, mode=mode, stickbreaking=sb, sdpa=sd, fa2=fa,
                       sb_over_sdpa=None if sd is None else sb[0] / sd[0],
                       sb_over_fa2=None if fa is None else sb[0] / fa[0])
            rows.append(row)
            log(f"| {T} | {mode} | {_fmt(sb)} | {_fmt(sd)} | {_fmt(fa)} | {_ratio(sb, sd)} | {_ratio(sb, fa)} |")
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        previous = time.monotonic() - started
    return rows, notes, sorted(used)


def _sanity_check():
    from hf_attn_variants.models.attn_variant_llama.stickbreaking_torch import naive_stickbreaking_attn
    from hf_attn_variants.ops.stickbreaking import parallel_stickbreaking_attn

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 4, 256, 128, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    o, rem = parallel_stickbreaking_attn(q, k, v)
    o_ref, rem_ref = naive_stickbreaking_attn(q.double(), k.double(), v.double())
    err = ((o.double() - o_ref).norm() / o_ref.norm()).item()
    if not err < 2e-2:
        sys.exit(f"kernel check failed (relative error {err:.3e}); not reporting speeds")
    return err


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--B", type=int, default=4)
    parser.add_argument("--H", type=int, default=12)
    parser.add_argument("--D", type=int, default=128)
    parser.add_argument("--sdpa-backend", default="flash", choices=["flash", "default"])
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("No CUDA GPU found: this benchmark times Triton kernels on a GPU, so there is nothing to measure here.")
        return 0

    import triton

    _, fa_version = flash_attn_or_none()
    err = _sanity_check()
    B, H, D, dtype = args.B, args.H, args.D, torch.bfloat16
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"flash_attn {fa_version} | check rel err {err:.1e}")
    print(f"B={B} H={H} D={D} {str(dtype)[6:]}; times in ms: median [p20, p80]\n")
    print(f"| T | mode | stick-breaking | SDPA ({args.sdpa_backend}) | FA2 | SB/SDPA | SB/FA2 |")
    print("|---|---|---|---|---|---|---|")
    _, _, used = time_kernels(args.T, B, H, D, dtype, sdpa_backend=args.sdpa_backend)
    print(f"\nSDPA backends used: {', '.join(used)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
