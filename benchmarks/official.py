"""What the comparison scripts (benchmarks/compare_*.py) share to run an author's code beside ours.

Each imports the official modules from a checkout given on its command line, at run time: nothing of
theirs is in this repository. Their top-level names (`model`, `loss`, `open_clip`, ...) collide with
ours or with each other's, so they are imported inside `official_imports`, which swaps those entries
of sys.modules and puts ours back afterwards; their `.cuda()` calls stay on the CPU inside
`cuda_on_cpu` on a machine without CUDA.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
import types
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import packaging.version
import torch


def stub_pkg_resources() -> None:
    """setuptools' pkg_resources (gone from recent setuptools), which official CLIP loaders import for
    `packaging.version` only."""
    try:
        importlib.import_module("pkg_resources")
    except ImportError:
        sys.modules["pkg_resources"] = types.SimpleNamespace(packaging=packaging)  # type: ignore[assignment]


@contextlib.contextmanager
def official_imports(checkout: Path, modules: Sequence[str], stubs: Mapping[str, Any] | None = None,
                     workdir: bool = False) -> Iterator[None]:
    """While open, the top-level `modules` (and their submodules) resolve to `checkout`; `stubs` stand in for
    modules their code imports but the comparison never runs; `workdir` makes the checkout the working
    directory (code that opens files by relative path). On leaving, our modules, the path and torch's thread
    count (some official code sets it) come back."""
    def official(name: str) -> bool:
        return name.split(".")[0] in modules or name in (stubs or {}) or name == "pkg_resources"

    saved = {name: module for name, module in sys.modules.items() if official(name)}
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, str(checkout))
    sys.modules.update(stubs or {})
    stub_pkg_resources()
    threads = torch.get_num_threads()
    try:
        with contextlib.chdir(checkout) if workdir else contextlib.nullcontext():
            yield
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(str(checkout))
        for name in [name for name in sys.modules if official(name)]:
            del sys.modules[name]
        sys.modules.update(saved)


@contextlib.contextmanager
def cuda_on_cpu() -> Iterator[None]:
    """Without CUDA, `tensor.cuda()` and `tensor.to('cuda...')` leave the tensor on the CPU while open."""
    if torch.cuda.is_available():
        yield
        return
    original_cuda, original_to = torch.Tensor.cuda, torch.Tensor.to

    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        args = tuple("cpu" if isinstance(a, str) and a.startswith("cuda") else a for a in args)
        if isinstance(kwargs.get("device"), str) and kwargs["device"].startswith("cuda"):
            kwargs["device"] = "cpu"
        return original_to(self, *args, **kwargs)

    torch.Tensor.cuda, torch.Tensor.to = (lambda self, *a, **k: self), to  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.Tensor.to = original_cuda, original_to  # type: ignore[method-assign]
