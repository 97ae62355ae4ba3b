"""What this process uses and what the machine can do: peak memory, whole and per phase (load, train, evaluate),
the CPU's name and its measured GEMM peak (for "% of peak" beside a timing).

Linux keeps one high-water mark of the resident set (``VmHWM``) and lets a process reset it (``/proc/self/clear_refs``
with ``5``), so each phase can report its own peak. A reset also lowers what ``getrusage`` reports, so the highest
mark seen before any reset is kept here and :func:`peak_rss_mb` is the peak of the whole process either way. Where
the reset is not available (not Linux) a phase's number is the peak so far, and says so.
"""

from __future__ import annotations

import contextlib
import platform
import resource
import time
from collections.abc import Iterator
from pathlib import Path

_before_resets_mb = 0.0


def phase_peak_mb() -> float:
    """The peak resident set since the last :func:`reset_peak_rss` (or the process start), in MB."""
    return _hwm_mb()


def _hwm_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_rss_mb() -> float:
    """The peak resident set of this process since it started, in MB."""
    return max(_hwm_mb(), _before_resets_mb)


def reset_peak_rss() -> bool:
    """Start a new high-water mark (returns False where the OS cannot)."""
    global _before_resets_mb
    _before_resets_mb = peak_rss_mb()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PhasePeaks:
    """``with peaks.phase("train"): ...`` records that phase's peak RSS (MB; the max over repeated phases)."""

    def __init__(self) -> None:
        self.mb: dict[str, float] = {}
        self.per_phase = True

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.per_phase = reset_peak_rss() and self.per_phase
        try:
            yield
        finally:
            self.mb[name] = round(max(self.mb.get(name, 0.0), _hwm_mb()), 1)

    def as_dict(self) -> dict[str, float | bool]:
        return {**self.mb, "per_phase": self.per_phase}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gemm_peak_gflops(dtype=None, n: int = 1024, reps: int = 3, rounds: int = 3) -> float:
    """The best of ``rounds`` timings of ``reps`` n x n x n matrix products, in GFLOP/s, with torch's current thread
    count: the arithmetic bound that "% of peak" numbers are measured against."""
    import torch

    dtype = dtype or torch.float32
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    c = torch.empty(n, n, dtype=dtype)
    torch.matmul(a, b, out=c)  # warm-up
    best = 0.0
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b, out=c)
        best = max(best, 2.0 * n**3 * reps / (time.perf_counter() - t) / 1e9)
    return best
