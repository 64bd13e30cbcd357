"""Pin what makes torch's results depend on the machine rather than on the inputs.

CPU reductions and matrix products are split across threads, so the thread count changes the
rounding of sums (one stage trained with 1 and with 2 threads ends with weights 7e-5 apart);
some CUDA kernels (atomics, cuBLAS workspaces) are not deterministic at all. Stages call
`pin_runtime` before any computation, so the same command on another machine of the same
kind gives the same bits. Which CPU vector kernels run is pinned earlier, in moeclip.bench.launch.
"""
from __future__ import annotations

import os

from moeclip.errors import MoeclipError


def pin_runtime(threads: int | None, deterministic: bool) -> None:
    """Fix torch's CPU thread count (None keeps torch's default) and, if asked, its kernel choice."""
    import torch

    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
        torch.use_deterministic_algorithms(True, warn_only=True)
    if threads is not None:
        torch.set_num_threads(threads)


def resolve_device(device: str) -> str:
    """'auto' as the device this machine has: cuda when available, else cpu; other names unchanged, but a
    CUDA device that is not there is one clear error instead of a traceback from deep inside torch."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0) if device.partition(":")[2].isdigit() else 0
        if index >= torch.cuda.device_count():
            raise MoeclipError(f"device '{device}': torch sees {torch.cuda.device_count()} CUDA GPU(s) on this "
                               f"machine (use --device cpu or auto)")
    return device
