"""Wall time and peak memory of one piece of work (a pipeline stage, an experiment variant).

Why: a first paper-size run should say before it is scaled up what each stage and variant
costs. Peak resident memory is Linux's high-water mark (VmHWM), reset when the work starts
(writing 5 to /proc/self/clear_refs), so a variant's peak is its own and not the largest
of the variants before it; worker processes count through their own high-water mark
(RUSAGE_CHILDREN). On CUDA the peak of torch's allocator is reported as well.
"""
from __future__ import annotations

import re
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

GIB = 2**30
# What `stage_line` prints, for the tools that read a pipeline's output (stage, seconds, RSS, CUDA).
USAGE_LINE = re.compile(r"^stage (\S+): ([0-9.]+) s, peak RSS ([0-9.]+) GiB(?:, CUDA peak ([0-9.]+) GiB)?$",
                        re.M)


@dataclass(frozen=True)
class Usage:
    seconds: float
    peak_rss_gib: float
    cuda_peak_gib: float | None

    def line(self) -> str:
        cuda = "" if self.cuda_peak_gib is None else f", CUDA peak {self.cuda_peak_gib:.2f} GiB"
        return f"{self.seconds:.1f} s, peak RSS {self.peak_rss_gib:.2f} GiB{cuda}"

    def stage_line(self, stage: str) -> str:
        """The line a pipeline stage prints when it ends (parsed back by USAGE_LINE)."""
        return f"stage {stage}: {self.line()}"

    def as_dict(self) -> dict[str, float | None]:
        return {key: None if value is None else round(value, 3) for key, value in asdict(self).items()}


def _status_kib(field: str) -> int | None:
    """A `VmHWM`-style field of /proc/self/status in KiB (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not permitted: the peak then covers the process's whole life
        pass


def _peak_rss_gib() -> float:
    own = _status_kib("VmHWM")
    if own is None:  # ru_maxrss is in KiB on Linux, in bytes on macOS
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) * 1024 / GIB


def _cuda_peak_gib(reset: bool) -> float | None:
    """torch's CUDA allocator peak over all devices (reset it when asked); None without CUDA in use."""
    torch = sys.modules.get("torch")  # measuring must not import torch: only work that uses it has a peak
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    devices = range(torch.cuda.device_count())
    if reset:
        for device in devices:
            torch.cuda.reset_peak_memory_stats(device)
    return max(torch.cuda.max_memory_allocated(device) for device in devices) / GIB


@contextmanager
def measured() -> Iterator[list[Usage]]:
    """Measure the enclosed work; the list yielded holds its Usage once the block has ended."""
    result: list[Usage] = []
    _reset_peak_rss()
    _cuda_peak_gib(reset=True)
    start = time.perf_counter()
    yield result
    result.append(Usage(time.perf_counter() - start, _peak_rss_gib(), _cuda_peak_gib(reset=False)))
