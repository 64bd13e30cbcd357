"""The `moeclip` console command: pins the CPU kernels, then runs pipeline stages warm when it can.

CPU results depend on which vector kernels torch, MKL and oneDNN pick for the processor at hand
(AVX2 or AVX-512, Intel or AMD code paths), so two machines of the same architecture could print
different demo numbers. Every `moeclip` process therefore asks all three for their AVX2 paths,
unless the environment already says otherwise. Stage commands then go to a warm process
(`moeclip.bench.warm`) that has torch, open_clip and MLflow imported already, and run from
`moeclip.bench.stages.cli` without the rest of the command line: a stage imports its own code only.
"""
from __future__ import annotations

import os
import sys

from moeclip.bench import warm

# Set before torch is imported: each library reads its variable once, at start-up.
CPU_KERNEL_PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
STAGE_COMMAND = "stage"


def main() -> None:
    for name, value in CPU_KERNEL_PINS.items():
        os.environ.setdefault(name, value)
    if sys.argv[1:2] == [STAGE_COMMAND] and warm.enabled():
        status = warm.run_command(sys.argv[1:])
        if status is not None:
            raise SystemExit(status)
    run_here(sys.argv[1:])


def run_here(argv: list[str]) -> None:
    """Run `moeclip <argv>` in this process (a warm child calls this too)."""
    if argv[:1] == [STAGE_COMMAND]:
        from moeclip.bench.stages.cli import run as run_stage

        run_stage(argv[1:])
        return
    from moeclip.bench.cli import run

    run()
