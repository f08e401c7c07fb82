"""Keep freed host memory in the training process for reuse (glibc ``malloc`` settings, issue 16).

A CPU training step allocates and frees the same activation and gradient buffers every iteration, many of them
megabytes large. With glibc's default settings, blocks that large are served by ``mmap`` and handed back to the
kernel when freed, or trimmed off the heap's top, so the next iteration touches fresh pages and takes one page fault
per 4 KiB: 17,795 faults and 0.042 s of kernel time per iteration of the supervised 4 + 4 step at 128x128 (2 threads,
``tools/benchmark_page_faults.py``, rows in ``docs/speed_page_faults.jsonl``). Raising the ``mmap`` threshold to its largest value and the trim threshold
far above a step's working set keeps those blocks in the heap, where the next iteration reuses them: 1-2 faults per
iteration in that benchmark. The peak resident memory of a run is about the same (the step needs those pages at its peak anyway), but
the process no longer returns memory to the system after the peak.

No library offers this from inside a run (PyTorch's caching allocator is CUDA-only; jemalloc or tcmalloc must be
preloaded with ``LD_PRELOAD`` before the interpreter starts, which a bundle config cannot do), so it is two ``mallopt``
calls. A user who preloads one of them, or sets glibc's own ``MALLOC_*`` / ``GLIBC_TUNABLES`` malloc settings, keeps
that choice: nothing is changed then.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

__all__ = ["reuse_freed_memory", "freed_memory_reused", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

logger = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: bytes; the largest mmap threshold glibc accepts on 64-bit systems (HEAP_MAX_SIZE / 2). Blocks above it (3D maps of
#: more than 32 MiB) are still mapped and unmapped per allocation.
MMAP_THRESHOLD = 32 * 1024 * 1024
#: bytes of free memory at the heap's top before glibc returns it to the system
TRIM_THRESHOLD = 1024 * 1024 * 1024

#: environment variables through which a user has already chosen the allocator or glibc's malloc settings
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")

_result: bool | None = None


def _reason_to_leave_alone() -> str | None:
    if not sys.platform.startswith("linux"):
        return f"not Linux ({sys.platform})"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return f"another allocator is preloaded (LD_PRELOAD={preload})"
    chosen = [k for k in _USER_SETTINGS if k in os.environ]
    if chosen or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return f"malloc settings chosen in the environment ({', '.join(chosen) or 'GLIBC_TUNABLES'})"
    return None


def reuse_freed_memory() -> bool:
    """Set glibc's ``M_MMAP_THRESHOLD`` to :data:`MMAP_THRESHOLD` and ``M_TRIM_THRESHOLD`` to :data:`TRIM_THRESHOLD`
    for this process; the first call decides, later calls return its result.

    The settings are process-wide and stay for the process's lifetime; they change where memory comes from, never a
    value computed with it. Returns whether they were applied: ``False`` (with a debug log line saying why, nothing
    changed) off Linux, without glibc (musl), with jemalloc/tcmalloc/mimalloc preloaded, or when the environment
    already sets glibc's malloc parameters.
    """
    global _result
    if _result is None:
        _result = _apply()
    return _result


def freed_memory_reused() -> bool:
    """Whether :func:`reuse_freed_memory` has applied its settings in this process (they cannot be undone)."""
    return _result is True


def _apply() -> bool:
    reason = _reason_to_leave_alone()
    if reason is not None:
        logger.debug("reuse_freed_memory: %s; allocator left as it is", reason)
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only: musl's mallopt accepts and ignores these settings
        mallopt = libc.mallopt
    except (OSError, AttributeError) as err:
        logger.debug("reuse_freed_memory: no glibc (%s); allocator left as it is", err)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        logger.debug("reuse_freed_memory: glibc refused M_MMAP_THRESHOLD; allocator left at its defaults")
        return False
    if mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        # the mmap threshold is already fixed (and glibc's dynamic threshold off); say so rather than "unchanged"
        logger.debug("reuse_freed_memory: glibc refused M_TRIM_THRESHOLD; only the mmap threshold was set")
        return False
    return True
