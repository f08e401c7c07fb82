"""How many loader worker processes a training run gets by default (issue 16: "loader workers that keep up").

On a CPU device the training step's intra-op threads (``torch.get_num_threads()``) already keep every core busy
when they number as many as the cores. Loader workers then take their CPU time from those threads, and a worker
preempting one thread of a parallel region leaves the other spinning at its barrier. On the 2-core ACDC-CPU v1
machine, with 2 torch threads, loading in the training process (0 workers) against 2 workers per stream, interleaved
(``tools/benchmark_speed.py --compare 03e7853``, rows in ``docs/speed_round4_ablation.jsonl``): supervised 1.04x,
CML 0.97x, Cross-ALD 1.27x, GapMatch 1.04x, SS-Net 1.11x, VFD 1.00x. So workers get only the cores the step leaves
free; on a GPU device the step leaves the CPU to the loader.
"""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = ["default_num_workers", "check_num_workers", "MAX_DEFAULT_WORKERS"]

#: the most workers per stream chosen by default (the bundles' previous fixed value)
MAX_DEFAULT_WORKERS = 2


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def default_num_workers(device: torch.device | str = "cpu", streams: int = 2, threads: int | None = None) -> int:
    """Loader workers per stream.

    On a GPU device :data:`MAX_DEFAULT_WORKERS`. On a CPU device the cores this process may use, less the torch
    threads of every training process on this machine (``threads``, default ``torch.get_num_threads()``, times
    torchrun's ``LOCAL_WORLD_SIZE``), shared among those processes' ``streams`` loaders (2: labelled and
    unlabelled; 1 for a supervised run), at most :data:`MAX_DEFAULT_WORKERS`. 0 means the batches are loaded in the
    training process.
    """
    if torch.device(device).type != "cpu":
        return MAX_DEFAULT_WORKERS
    threads = torch.get_num_threads() if threads is None else int(threads)
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    free = _cores() - threads * local_ranks
    return max(0, min(MAX_DEFAULT_WORKERS, free // (local_ranks * max(1, int(streams)))))


def check_num_workers(value: Any, key: str = "num_workers") -> int:
    """``value`` as a worker count; raises ``ValueError`` naming ``key`` unless it is an integer >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"'{key}' must be an integer >= 0 (loader worker processes per stream), got {value!r}")
    return value
