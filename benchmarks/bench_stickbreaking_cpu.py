"""CPU benchmark: blockwise stick-breaking attention against causal SDPA (B1 H8 D64 fp32 by default).

Speed: median wall time of forward (no grad) and forward+backward, each case timed alternately with SDPA in the same
process so machine load hits both alike; the table shows the ratio of medians (ours / SDPA). `--threads 1 2 8` runs
every case at each of those torch thread counts (a row each).

Peak memory: torch has no CPU allocator statistics, so every (implementation, mode) case runs in a fresh subprocess:
it makes one tiny warm-up call, allocates q, k, v (and the cotangent), resets the peak-RSS counter (`5` into
/proc/self/clear_refs), runs the call once, and reports VmHWM (peak RSS) minus the RSS just before the call. That is
the extra memory the call needed, outputs and gradients included, as the OS saw it (allocator caching included).
Each subprocess runs at the row's thread count.

Inputs: "random" is randn q, k, v (logits ~ N(0, 1): the stick runs out after ~100 keys and the op stops early);
"long_stick" has logits ~ -8 (beta ~ 3e-4), so every key block is visited (the worst case for the op).
The forward and backward run as the package's C++ CPU kernels when they build; `HF_ATTN_VARIANTS_CPU_KERNEL=0` times
pure PyTorch.

Decode (`--decode K ...`): one new query over a cache of K keys in SmolLM2's layout (9 query heads over 3 kv heads,
D 64), no gradient, the op's decode path (the C++ `decode`, and pure PyTorch) against SDPA over the whole cache.

    python benchmarks/bench_stickbreaking_cpu.py --T 512 2048 8192 --repeats 5 [--threads 1 2 8] [--decode 1024 4096]
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from hf_attn_variants.models.attn_variant_llama.stickbreaking_torch import blockwise_stickbreaking_attn


B, H, D = 1, 8, 64


def make_inputs(T, inputs, requires_grad):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=generator) for _ in range(3))
    scale = None
    if inputs == "long_stick":
        q, k, scale = 1 + 0.1 * q, -1 + 0.1 * k, 8 / D  # z = s * q·k ~ -8
    return [x.requires_grad_(requires_grad) for x in (q, k, v)], scale


def _cpu_kernel_state():
    from hf_attn_variants.ops.stickbreaking_cpu import ENV_VAR, forward_kernel

    return "on" if forward_kernel() is not None else f"off ({ENV_VAR}=0 or no build)"


def stickbreaking_call(q, k, v, scale):
    return blockwise_stickbreaking_attn(q, k, v, scale=scale)[0]


def sdpa_call(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


IMPLEMENTATIONS = {"stickbreaking": stickbreaking_call, "sdpa": sdpa_call}


def run_once(call, q, k, v, scale, mode, grad_out=None):
    if mode == "fwd":
        with torch.no_grad():
            call(q, k, v, scale)
        return
    out = call(q, k, v, scale)
    out.backward(grad_out)
    for x in (q, k, v):
        x.grad = None


def time_ratio(T, inputs, mode, repeats):
    """Median times of both implementations, measured alternately; returns (ours_s, sdpa_s)."""
    (q, k, v), scale = make_inputs(T, inputs, requires_grad=(mode == "fwd+bwd"))
    grad_out = torch.randn(B, H, T, D)
    times = {name: [] for name in IMPLEMENTATIONS}
    for name, call in IMPLEMENTATIONS.items():  # warm-up
        run_once(call, q, k, v, scale, mode, grad_out)
    for _ in range(repeats):
        for name, call in IMPLEMENTATIONS.items():
            start = time.perf_counter()
            run_once(call, q, k, v, scale, mode, grad_out)
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["stickbreaking"]), statistics.median(times["sdpa"])


DECODE_HEADS, DECODE_KV_HEADS = 9, 3


def decode_times(K, inputs, repeats):
    """Median seconds of one decode step over K keys: (C++ decode, pure PyTorch decode, SDPA)."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, DECODE_HEADS, 1, D, generator=generator)
    k, v = (torch.randn(1, DECODE_KV_HEADS, K, D, generator=generator) for _ in range(2))
    scale = None
    if inputs == "long_stick":
        q, k, scale = 1 + 0.1 * q, -1 + 0.1 * k, 8 / D
    calls = {
        "cpp": lambda: blockwise_stickbreaking_attn(q, k, v, scale=scale),
        "torch": lambda: blockwise_stickbreaking_attn(q, k, v, scale=scale, cpu_kernel=False),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
    }
    times = {name: [] for name in calls}
    with torch.no_grad():
        for call in calls.values():
            call()
        for _ in range(repeats):
            for name, call in calls.items():
                start = time.perf_counter()
                for _ in range(20):
                    call()
                times[name].append((time.perf_counter() - start) / 20)
    return tuple(statistics.median(times[name]) for name in calls)


def _status_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_peak_here(implementation, T, inputs, mode):
    """Runs inside the fresh subprocess: peak RSS growth (MiB) of one call."""
    # A tiny call first, so one-time library set-up (thread pools, GEMM workspaces) is not counted.
    (q, k, v), scale = make_inputs(64, inputs, requires_grad=(mode == "fwd+bwd"))
    run_once(IMPLEMENTATIONS[implementation], q, k, v, scale, mode, torch.randn(B, H, 64, D))
    (q, k, v), scale = make_inputs(T, inputs, requires_grad=(mode == "fwd+bwd"))
    grad_out = torch.randn(B, H, T, D)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current RSS
    rss_before = _status_kib("VmRSS")
    run_once(IMPLEMENTATIONS[implementation], q, k, v, scale, mode, grad_out)
    return (_status_kib("VmHWM") - rss_before) / 1024


def peak_memory_mib(implementation, T, inputs, mode, threads):
    command = [sys.executable, __file__, "--measure-peak", json.dumps([implementation, T, inputs, mode]),
               "--threads", str(threads)]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return float(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=int, nargs="+", default=[512, 2048, 8192], help="sequence lengths")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed repetitions per case (median reported); 0 skips timing (memory only)")
    parser.add_argument("--inputs", nargs="+", default=["random", "long_stick"], choices=["random", "long_stick"])
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
                        help="torch intra-op thread counts (a row each)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--decode", type=int, nargs="*", default=[], help="also time decode over these cache lengths")
    parser.add_argument("--measure-peak", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads[0])

    if args.measure_peak:
        print(measure_peak_here(*json.loads(args.measure_peak)))
        return

    print(f"# stick-breaking (blockwise; C++ CPU kernels: {_cpu_kernel_state()}) vs SDPA(is_causal=True), CPU, "
          f"B{B} H{H} D{D} fp32")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()} ({os.cpu_count()} CPUs), "
          f"median of {args.repeats}; ratio = stick-breaking / SDPA\n")
    print("| T | inputs | threads | fwd ms (SDPA ms) | fwd ratio | fwd+bwd ms (SDPA ms) | fwd+bwd ratio "
          "| peak MiB fwd (SDPA) | fwd mem ratio | peak MiB fwd+bwd (SDPA) | fwd+bwd mem ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for T in args.T:
        for inputs in args.inputs:
            for threads in args.threads:
                torch.set_num_threads(threads)
                cells = [str(T), inputs, str(threads)]
                for mode in ("fwd", "fwd+bwd"):
                    if args.repeats == 0:
                        cells += ["-", "-"]
                        continue
                    ours, sdpa = time_ratio(T, inputs, mode, args.repeats)
                    cells += [f"{ours * 1e3:.1f} ({sdpa * 1e3:.1f})", f"{ours / sdpa:.2f}"]
                for mode in ("fwd", "fwd+bwd"):
                    if args.no_memory:
                        cells += ["-", "-"]
                        continue
                    ours = peak_memory_mib("stickbreaking", T, inputs, mode, threads)
                    sdpa = peak_memory_mib("sdpa", T, inputs, mode, threads)
                    cells += [f"{ours:.1f} ({sdpa:.1f})", f"{ours / sdpa:.2f}" if sdpa > 0 else "-"]
                print("| " + " | ".join(cells) + " |", flush=True)
    torch.set_num_threads(args.threads[0])
    if args.decode:
        print(f"\n# decode: 1 query, {DECODE_HEADS} query heads over {DECODE_KV_HEADS} kv heads, D{D}; ratio = time / SDPA")
        print("\n| K | inputs | C++ decode us | PyTorch decode us | SDPA us | C++ / SDPA | PyTorch / SDPA |")
        print("|---|---|---|---|---|---|---|")
        for K in args.decode:
            for inputs in args.inputs:
                cpp, pure, sdpa = decode_times(K, inputs, args.repeats)
                print(f"| {K} | {inputs} | {cpp * 1e6:.0f} | {pure * 1e6:.0f} | {sdpa * 1e6:.0f} | {cpp / sdpa:.2f} "
                      f"| {pure / sdpa:.2f} |", flush=True)


if __name__ == "__main__":
    main()
