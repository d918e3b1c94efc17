"""Stick-breaking Triton kernels vs FlashAttention-2 and SDPA (causal softmax) on one CUDA GPU.

Shapes follow the official kernel's reports: B=4, H=12, D=128, bf16, T in {1024, 4096, 16384}. Modes:
forward, forward+backward, and decode (one new query over a T-long cache). Every time is a median of
`triton.testing.do_bench` (20%/80% quantiles in brackets), and every ratio compares numbers measured in this run.
Before timing, the kernel is checked against the float64 reference on a small shape; a red check stops the script.

    python benchmarks/bench_stickbreaking_gpu.py [--T 1024 4096 16384]
"""

import argparse
import sys

import torch


def _bench(fn):
    import triton.testing

    med, lo, hi = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
    return med, lo, hi


def _fmt(t):
    return "n/a" if t is None else f"{t[0]:.3f} [{t[1]:.3f}, {t[2]:.3f}]"


def _ratio(a, b):
    return "n/a" if a is None or b is None else f"{a[0] / b[0]:.2f}x"


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
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("No CUDA GPU found: this benchmark times Triton kernels on a GPU, so there is nothing to measure here.")
        return 0

    import triton
    import torch.nn.functional as F

    from hf_attn_variants.ops.stickbreaking import decode_stickbreaking_attn, parallel_stickbreaking_attn

    try:
        from flash_attn import flash_attn_func
    except ImportError:
        flash_attn_func = None

    err = _sanity_check()
    B, H, D, dtype = args.B, args.H, args.D, torch.bfloat16
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"flash_attn {'yes' if flash_attn_func else 'not installed'} | check rel err {err:.1e}")
    print(f"B={B} H={H} D={D} {str(dtype)[6:]}; times in ms: median [p20, p80]\n")
    print("| T | mode | stick-breaking | SDPA | FA2 | SB/SDPA | SB/FA2 |")
    print("|---|---|---|---|---|---|---|")

    for T in args.T:
        q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        qf, kf, vf = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        dof = do.transpose(1, 2).contiguous()

        def sb_fwd():
            return parallel_stickbreaking_attn(q, k, v)[0]

        def sdpa_fwd():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def fa_fwd():
            return flash_attn_func(qf, kf, vf, causal=True)

        rows = []
        with torch.no_grad():
            rows.append(("fwd", _bench(sb_fwd), _bench(sdpa_fwd), _bench(fa_fwd) if flash_attn_func else None))

        def fwd_bwd(fn, inputs, grad):
            def run():
                for x in inputs:
                    x.grad = None
                fn().backward(grad)
            return run

        rows.append((
            "fwd+bwd",
            _bench(fwd_bwd(sb_fwd, (q, k, v), do)),
            _bench(fwd_bwd(sdpa_fwd, (q, k, v), do)),
            _bench(fwd_bwd(fa_fwd, (qf, kf, vf), dof)) if flash_attn_func else None,
        ))

        # decode: one new query over the T-long cache (the cache already holds the new token)
        q1, k1, v1 = q.detach()[:, :, -1:], k.detach(), v.detach()
        q1f, k1f, v1f = qf.detach()[:, -1:], kf.detach(), vf.detach()
        with torch.no_grad():
            rows.append((
                "decode",
                _bench(lambda: decode_stickbreaking_attn(q1, k1, v1)),
                _bench(lambda: F.scaled_dot_product_attention(q1, k1, v1)),
                _bench(lambda: flash_attn_func(q1f, k1f, v1f, causal=True)) if flash_attn_func else None,
            ))
        for mode, sb, sdpa, fa in rows:
            print(f"| {T} | {mode} | {_fmt(sb)} | {_fmt(sdpa)} | {_fmt(fa)} | {_ratio(sb, sdpa)} | {_ratio(sb, fa)} |")
        del q, k, v, qf, kf, vf, do, dof
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
