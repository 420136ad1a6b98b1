"""Benchmark: RankMatch orthogonal agent selection at the paper's scale (B = 8, N = 128 agents, 81x81 features).

81x81 is the size the issue fixes (e.g. a 641-pixel crop at output stride 8, or the quarter-resolution grid of a
321 crop). Features are random 256-channel ReLU maps (what the ASPP output looks like); the greedy selection's cost
does not depend on their values. The script times ``orthogonal_agents`` (median of ``--repeats`` runs after one
warm-up) and reports peak memory: CUDA ``max_memory_allocated`` above the inputs on GPU; on CPU the growth of the
process's peak RSS from the warm-up on (a lower bound when an earlier allocation already set the high-water mark),
next to the size of the input features and of the op's L2-normalised float32 copy. It also times the agent-level
correlation plus the rank distributions of one view, for scale. Prints one JSON object.

Usage: ``PYTHONPATH=. python benchmarks/rankmatch_agents.py [--device cpu|cuda] [--repeats 3] [--threads 1]``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

from workbench.engine.bench import peak_rss_mb
from workbench.ops.agents import agent_correlation, orthogonal_agents
from workbench.ops.ranking import rank_distributions


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, list[float], float]:
    """(median seconds, all timings, peak extra memory in MB) of ``fn`` after one warm-up call."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rss0 = peak_rss_mb()  # before the warm-up: on CPU its allocations set the high-water mark
    fn()
    sync()
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    extra = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else peak_rss_mb() - rss0
    return statistics.median(times), times, extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--agents", type=int, default=128)
    parser.add_argument("--size", type=int, default=81)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = leave the default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    b, c, s = args.batch, args.channels, args.size
    feats = torch.randn(b, c, s, s, generator=g).relu().to(device)
    first = torch.randint(s * s, (b,), generator=g).to(device)

    sec, times, extra = timed(lambda: orthogonal_agents(feats, args.agents, first=first), device, args.repeats)
    agents = orthogonal_agents(feats, args.agents, first=first)
    assert agents.shape == (b, args.agents) and all(len(set(row.tolist())) == args.agents for row in agents)
    input_mb = feats.numel() * feats.element_size() / 2**20

    def view() -> object:
        corr = agent_correlation(feats, agents)
        return rank_distributions(corr, corr, args.top_k)

    sec_view, _, extra_view = timed(view, device, args.repeats)
    result = {
        "benchmark": "rankmatch orthogonal agent selection",
        "batch": b, "agents": args.agents, "feature_size": [s, s], "channels": c, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": args.repeats,
        "orthogonal_seconds": sec, "orthogonal_seconds_all": times,
        "orthogonal_seconds_per_agent": sec / args.agents,
        "peak_extra_memory_mb": extra,
        "peak_memory_measure": "cuda max_memory_allocated above the inputs" if device.type == "cuda"
        else "growth of peak RSS from the warm-up on (lower bound)",
        "input_features_mb": input_mb,
        "normalised_copy_mb": b * s * s * c * 4 / 2**20,
        "correlation_and_rank_seconds": sec_view, "correlation_and_rank_peak_extra_mb": extra_view,
        "command": "python " + " ".join(sys.argv),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
