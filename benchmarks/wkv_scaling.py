"""Benchmark: the chunked Bi-WKV op (``workbench.ops.rwkv.wkv``) is linear in the number of tokens.

Times forward + backward of ``wkv`` on random inputs ([B, T, C], decay and bonus divided by T as in the spatial-mix
block) at T, 2T, 4T, 8T tokens (``--repeats`` runs after one warm-up; the fastest run is the one least disturbed by
other processes on a shared machine, so the ratios use it; the median is reported too) and reports the time ratio per
doubling of T (linear cost => about 2x; the direct O(T^2) formula => about 4x). For contrast the direct formula
(``wkv_reference``) is timed too at the sizes where its [B, T, T, C] matrix stays under ``--reference-max-mb``.
On CUDA it also reports the peak memory above the inputs. Writes JSON (``--out``, default
reports/bench/wkv_scaling.json) and prints it.

Usage: ``PYTHONPATH=. python benchmarks/wkv_scaling.py [--tokens 1024] [--channels 64] [--chunk 16] [--threads 1]``.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

from workbench.engine.bench import write_result
from workbench.ops.rwkv import wkv, wkv_reference


def timed(fn: Callable[[], None], device: torch.device, repeats: int) -> tuple[float, list[float]]:
    """(fastest seconds, all timings) of ``fn`` after one warm-up call."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=1024, help="T; also timed at 2T, 4T, 8T")
    parser.add_argument("--doublings", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-max-mb", type=float, default=512.0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = leave the default)")
    parser.add_argument("--out", default="reports/bench/wkv_scaling.json", help="JSON path ('' = print only)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(args.doublings + 1):
        t = args.tokens * 2 ** i
        b, c = args.batch, args.channels
        w = (torch.randn(c, generator=g) / t).to(device).requires_grad_()
        u = (torch.randn(c, generator=g) / t).to(device).requires_grad_()
        k = torch.randn(b, t, c, generator=g).to(device).requires_grad_()
        v = torch.randn(b, t, c, generator=g).to(device).requires_grad_()

        def step(op: Callable[..., torch.Tensor]) -> Callable[[], None]:
            def run() -> None:
                for p in (w, u, k, v):
                    p.grad = None
                op(w, u, k, v).sum().backward()
            return run

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        sec, times = timed(step(lambda *a: wkv(*a, chunk=args.chunk)), device, args.repeats)
        row = {"tokens": t, "seconds": sec, "seconds_median": statistics.median(times), "seconds_all": times}
        if device.type == "cuda":
            row["peak_memory_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        ref_mb = b * t * t * c * 4 / 2**20
        if ref_mb <= args.reference_max_mb:
            row["reference_seconds"] = timed(step(wkv_reference), device, args.repeats)[0]
        rows.append(row)
        print(f"T={t}: {sec:.4f} s" + (f" (direct formula {row['reference_seconds']:.4f} s)"
                                       if "reference_seconds" in row else ""), file=sys.stderr)
    for prev, row in zip(rows, rows[1:]):
        row["ratio_vs_half"] = row["seconds"] / prev["seconds"]
        if "reference_seconds" in row and "reference_seconds" in prev:
            row["reference_ratio_vs_half"] = row["reference_seconds"] / prev["reference_seconds"]
    ratios = [r["ratio_vs_half"] for r in rows[1:]]
    result = {
        "benchmark": "Bi-WKV forward+backward vs number of tokens",
        "op": "workbench.ops.rwkv.wkv", "batch": args.batch, "channels": args.channels, "chunk": args.chunk,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": args.repeats,
        "rows": rows, "mean_ratio_per_doubling": statistics.mean(ratios) if ratios else None,
        "expected_ratio": {"linear": 2.0, "quadratic": 4.0},
        "command": "python " + " ".join(sys.argv),
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
