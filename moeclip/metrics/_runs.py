"""Run-length tallies of sorted scores: the compact state behind every exact metric here.

A ``Runs`` holds the distinct scores of one class in ascending order together with how
many pixels (or how much weight) sit at each score. Ranking metrics only depend on these
tallies, so ties are handled exactly and memory scales with the number of distinct scores
rather than with the number of pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor

_RLE_CHUNK = 1 << 24  # bounds the temporary boolean mask while run-length encoding
BLOCK = 1 << 18  # distinct scores per tally handled at once when merging or scanning tallies
_UINT32_LIMIT = np.iinfo(np.uint32).max
_FAN_IN = 8  # most tallies merged block-wise at once; more are merged hierarchically


@dataclass(frozen=True)
class Runs:
    """Distinct scores (ascending) and the count or summed weight at each one."""

    values: np.ndarray
    counts: np.ndarray

    @property
    def size(self) -> int:
        return int(self.values.size)

    def total(self) -> float:
        """Number of pixels (or total weight) tallied; exact for integer counts."""
        return self.counts.sum(dtype=np.float64)

    def slice(self, lo: np.generic, hi: np.generic | None) -> "Runs":
        """The runs with ``lo <= value < hi`` (``hi=None``: no upper bound)."""
        start = int(np.searchsorted(self.values, lo, side="left"))
        stop = self.size if hi is None else int(np.searchsorted(self.values, hi, side="left"))
        return Runs(self.values[start:stop], self.counts[start:stop])


def empty_runs() -> Runs:
    return Runs(np.empty(0, np.float32), np.empty(0, np.uint32))


def narrow_counts(counts: np.ndarray) -> np.ndarray:
    """Store integer counts as uint32 when they fit: 8 bytes per distinct score instead of 12."""
    if counts.dtype.kind in "iu" and (counts.size == 0 or counts.max() <= _UINT32_LIMIT):
        return counts.astype(np.uint32, copy=False)
    return counts


def validate(scores: ArrayLike, labels: ArrayLike, *, require_1d: bool) -> None:
    """Raise ValueError for mismatched shapes, non-finite scores or labels other than 0/1."""
    if tuple(scores.shape) != tuple(labels.shape):
        raise ValueError(f"scores and labels differ in shape: {tuple(scores.shape)} vs {tuple(labels.shape)}")
    if require_1d and len(scores.shape) != 1:
        raise ValueError(f"expected 1-D scores and labels, got shape {tuple(scores.shape)}")
    lib = torch if isinstance(scores, torch.Tensor) else np
    if _is_float(scores) and not bool(lib.isfinite(scores).all()):
        kind = "NaN" if bool(lib.isnan(scores).any()) else "+/-inf (scikit-learn rejects them too)"
        raise ValueError(f"scores contain {kind}")
    if not _is_bool(labels) and bool(((labels != 0) & (labels != 1)).any()):
        raise ValueError("labels must be bool or 0/1")


def as_array(x: ArrayLike | list) -> ArrayLike:
    """Tensors stay tensors (possibly on the GPU); anything else becomes a NumPy array."""
    return x if isinstance(x, torch.Tensor) else np.asarray(x)


def _is_float(x: ArrayLike) -> bool:
    return x.dtype.is_floating_point if isinstance(x, torch.Tensor) else x.dtype.kind == "f"


def _is_bool(x: ArrayLike) -> bool:
    return x.dtype == torch.bool if isinstance(x, torch.Tensor) else x.dtype == np.bool_


def require_both_classes(n_pos: float, n_neg: float) -> None:
    """Ranking metrics are undefined unless both classes occur; say which one is missing."""
    if n_pos == 0 and n_neg == 0:
        raise ValueError("no scores were given")
    if n_pos == 0:
        raise ValueError(f"only one class present: all {int(n_neg)} labels are negative (0), no positives")
    if n_neg == 0:
        raise ValueError(f"only one class present: all {int(n_pos)} labels are positive (1), no negatives")


def run_starts(sorted_values: np.ndarray) -> np.ndarray:
    """Indices where a new value begins in an ascending 1-D array.

    Scanned in chunks and stored as uint32 when possible, so the temporaries stay at
    4 bytes per distinct value.
    """
    n = sorted_values.size
    index_dtype = np.uint32 if n <= _UINT32_LIMIT else np.int64
    starts = [np.zeros(min(n, 1), index_dtype)]
    for lo in range(1, n, _RLE_CHUNK):
        hi = min(lo + _RLE_CHUNK, n)
        changed = sorted_values[lo:hi] != sorted_values[lo - 1 : hi - 1]
        starts.append(np.flatnonzero(changed).astype(index_dtype) + index_dtype(lo))
    return np.concatenate(starts)


def rle_sorted(sorted_values: np.ndarray) -> Runs:
    """Run-length encode an ascending 1-D array."""
    first = run_starts(sorted_values)
    counts = np.diff(first, append=first.dtype.type(sorted_values.size))
    return Runs(sorted_values[first], narrow_counts(counts))


def tally_owned(values: np.ndarray) -> Runs:
    """Runs of an unsorted 1-D array that nobody else references (it is sorted in place)."""
    values.sort()
    return rle_sorted(values)


def tally_torch(values: torch.Tensor) -> Runs:
    """Runs computed with torch ops, so the O(n log n) sort stays on the tensor's device."""
    uniq, counts = torch.unique_consecutive(torch.sort(values.flatten()).values, return_counts=True)
    return Runs(to_numpy(uniq), narrow_counts(to_numpy(counts)))


def tally(values: ArrayLike) -> Runs:
    """Runs of unsorted 1-D values that nobody else references: sorted on the GPU for CUDA tensors."""
    if isinstance(values, torch.Tensor) and values.is_cuda:
        return tally_torch(values)
    return tally_owned(to_numpy(values))


def split_tallies(scores: ArrayLike, labels: ArrayLike) -> tuple[Runs, Runs]:
    """(positive runs, negative runs) of scores split by a 0/1 or bool label array.

    CUDA tensors are sorted on the GPU; CPU tensors go through NumPy, whose SIMD sort of
    float32 is an order of magnitude faster than torch's CPU sort.
    """
    if isinstance(scores, torch.Tensor) and scores.is_cuda:
        mask = torch.as_tensor(labels, device=scores.device).bool()
        return tally_torch(scores[mask]), tally_torch(scores[~mask])
    values = to_numpy(scores).ravel()
    mask = to_numpy(labels).astype(bool, copy=False).ravel()
    return tally_owned(values[mask]), tally_owned(values[~mask])  # masking copies


def to_numpy(x: ArrayLike) -> np.ndarray:
    """Host NumPy view/copy; bfloat16 (which NumPy lacks) is widened to float32 exactly."""
    if not isinstance(x, torch.Tensor):
        return np.asarray(x)
    x = x.detach().cpu()
    return (x.float() if x.dtype == torch.bfloat16 else x).numpy()


def distinct_union(arrays: list[np.ndarray]) -> np.ndarray:
    """Sorted distinct values occurring in any of the ascending arrays."""
    merged = np.concatenate(arrays)
    merged.sort(kind="stable")  # timsort: linear-time merging of presorted runs
    return merged[run_starts(merged)]


def aligned_counts(a: Runs, b: Runs) -> tuple[np.ndarray, np.ndarray]:
    """float64 counts of ``a`` and ``b`` on the ascending union of their scores (0 where absent)."""
    grid = distinct_union([a.values, b.values])
    return _counts_on(grid, a), _counts_on(grid, b)


def _counts_on(grid: np.ndarray, runs: Runs) -> np.ndarray:
    out = np.zeros(grid.size, np.float64)
    out[np.searchsorted(grid, runs.values)] = runs.counts
    return out


def same_dtype(runs: list[Runs]) -> list[Runs]:
    """Give all tallies one score dtype, so block edges compare exactly with every tally."""
    dtype = np.result_type(*(r.values for r in runs))
    return [Runs(r.values.astype(dtype, copy=False), r.counts) for r in runs]


def block_bounds(runs: list[Runs], block: int = BLOCK) -> list[tuple[np.generic, np.generic | None]]:
    """Score intervals [lo, hi) holding at most ``block`` distinct scores of each tally.

    Processing one interval at a time keeps temporaries proportional to ``block``
    instead of to the whole tally. ``runs`` must share a dtype (see ``same_dtype``).
    """
    edges = distinct_union([r.values[::block] for r in runs])
    return list(zip(edges, [*edges[1:], None]))


def merge(runs: list[Runs], block: int = BLOCK) -> Runs:
    """Sum several tallies of the same class into one.

    Small inputs are merged in one go. Otherwise at most ``_FAN_IN`` tallies are merged
    at a time (bounding the per-block slicing work), block by block, into arrays
    preallocated for the worst case (no common scores) and shrunk in place: the peak is
    the inputs plus one output plus block temporaries.
    """
    runs = same_dtype([r for r in runs if r.size] or [empty_runs()])
    if len(runs) == 1:
        return runs[0]
    if sum(r.size for r in runs) <= block:
        return _merge_block(runs)
    if len(runs) > _FAN_IN:
        return merge([merge(runs[i : i + _FAN_IN], block) for i in range(0, len(runs), _FAN_IN)], block)
    return _merge_blockwise(runs, block)


def _merge_blockwise(runs: list[Runs], block: int) -> Runs:
    capacity = sum(r.size for r in runs)
    values = np.empty(capacity, runs[0].values.dtype)
    counts = np.empty(capacity, _merged_count_dtype(runs))
    filled = 0
    for lo, hi in block_bounds(runs, block):
        part = _merge_block([r.slice(lo, hi) for r in runs])
        values[filled : filled + part.size] = part.values
        counts[filled : filled + part.size] = part.counts
        filled += part.size
    values.resize(filled, refcheck=False)
    counts.resize(filled, refcheck=False)
    return Runs(values, counts)


def _merged_count_dtype(runs: list[Runs]) -> np.dtype:
    """float64 for weights; uint32 for counts when even their grand total fits in it."""
    if any(r.counts.dtype.kind == "f" for r in runs):
        return np.dtype(np.float64)
    return np.dtype(np.uint32 if sum(r.total() for r in runs) <= _UINT32_LIMIT else np.int64)


def _merge_block(runs: list[Runs]) -> Runs:
    return tally_weighted(np.concatenate([r.values for r in runs]), np.concatenate([r.counts for r in runs]))


def tally_weighted(values: np.ndarray, weights: np.ndarray) -> Runs:
    """Runs of unsorted 1-D values carrying a count or weight each: stable sort, then sum equal values."""
    order = np.argsort(values, kind="stable")
    values = values[order]
    first = run_starts(values)
    summed = np.add.reduceat(weights[order], first, dtype=np.float64 if weights.dtype.kind == "f" else np.int64)
    return Runs(values[first], narrow_counts(summed))


class RunStore:
    """Incrementally merged tallies of one class.

    Pending runs are merged into the compacted tally once they outgrow it (and
    ``min_pending`` entries), so the merge work is amortised O(n log n) and the stored
    size stays at about one entry (8 bytes) per distinct score, plus at most
    ``max(compacted size, min_pending)`` pending entries.
    """

    def __init__(self, min_pending: int = 1 << 22) -> None:
        self._min_pending = min_pending
        self._compacted = empty_runs()
        self._pending: list[Runs] = []
        self._pending_size = 0

    def add(self, runs: Runs) -> None:
        self._pending.append(runs)
        self._pending_size += runs.size
        if self._pending_size >= max(self._compacted.size, self._min_pending):
            self._compact()

    def result(self) -> Runs:
        self._compact()
        return self._compacted

    def nbytes(self) -> int:
        """Bytes held by the stored tallies (for reporting memory use)."""
        held = [self._compacted, *self._pending]
        return sum(r.values.nbytes + r.counts.nbytes for r in held)

    def _compact(self) -> None:
        if self._pending:
            self._compacted = merge([self._compacted, *self._pending])
            self._pending, self._pending_size = [], 0
