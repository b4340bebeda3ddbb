"""Sliding-window inference with MONAI's window layout, computing only the windows that matter.

Window positions, padding and the constant blending are those of
``monai.inferers.sliding_window_inference`` (roi 96^3, overlap 0.5, mode "constant"), so
wherever every covering window is computed the result equals MONAI's.

Which windows are computed (``focus_radius``, ``survey_margin``); all are MONAI's own:
1. *Survey*: along each axis, the fewest of MONAI's window starts such that every voxel
   lies at least ``survey_margin`` voxels inside a chosen window (a face on the volume's
   own border does not count). With MONAI's 48-voxel stride that keeps every start but
   at most the one before the last: 32 of 75 windows on an MSD-sized scan (267 x 267 x
   166 after preprocessing), where a survey that only covers the volume takes 18.
2. *Seen*: the voxels at which at least one computed window's margin is positive (that
   window calls them spleen), whatever the other windows over them say.
3. *Focus until closed*: the *region* takes in every voxel within ``focus_radius`` (a
   cube) of a seen voxel; every MONAI window touching the region is computed, which can
   make more voxels seen; and so on until the region stops growing. Then every seen
   voxel, and every voxel within ``focus_radius`` of one, has all its windows: MONAI's
   average.

Guaranteed, for any network (exact up to float summation order, below):
* Every voxel the margin calls spleen has MONAI's margin: a positive average needs a
  positive window, so the voxel is seen.
* Every connected component (26-neighbours, preprocessed grid) of MONAI's positive
  margin that holds a seen voxel or comes within ``focus_radius`` of one is reproduced
  exactly. Proof: a region voxel of such a component has MONAI's positive value, so it
  is seen and its neighbours join the region; the region floods the component.
* The inverted mask: each voxel of the input grid is interpolated (trilinear, border
  clamped) from the 2 x 2 x 2 preprocessed voxels around it. If one of them is seen, all
  lie within 1 voxel of it, in the region (``focus_radius`` >= 1): the voxel gets
  MONAI's value and mask. If none is seen, every computed window is <= 0 on all of
  them: the mask is 0 there, as MONAI's unless a window not computed called one of them
  spleen. So the mask is MONAI's, or a subset of it, and equal to it wherever the rule
  below holds.

Not guaranteed: spleen that only windows left uncomputed see, i.e. voxels MONAI calls
spleen at which no computed window (no survey window, though every voxel lies at least
``survey_margin`` inside one) calls spleen, none within ``focus_radius`` of a seen voxel.
A component of MONAI's mask is found when one of its voxels is called spleen by a
window holding it at least ``survey_margin`` inside and the network's prediction there
depends only on the image within ``survey_margin`` voxels (every window holding it that
deep, one survey window among them, then predicts alike); a component made only of
predictions near window faces, or of a network that needs wider context (one that fires
only on a whole spleen, when no survey window holds it whole), can still be missed;
``focus_radius=None`` computes every window, MONAI's result everywhere.

The focus used to start from voxels where the *average* of the computed windows was
positive: a voxel that one computed window called spleen, outvoted by the others, kept
that partial average (<= 0) while MONAI's over all its windows could be > 0. Now one
positive window is enough to give a voxel all its windows.

Float summation order: the windows over a voxel are added up in another order than with
every window computed, which can change a sum's last bits (about 1e-7 of it); a voxel
whose interpolated value is that close to 0 can end on either side.
tests/unit/pipeline/test_windows.py builds the cases above. The cost: on the benchmark CT
with the yardstick weights, 72 of 75 windows (the average rule took 42): windows call
spleen near their faces all over the abdomen, and each such voxel needs all its windows.
Where whole windows see no spleen (air, legs, head) they are still skipped
(benchmarks/README.md, "Exact focus rule").
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from spleen_seg.config import RECIPE
from spleen_seg.errors import ConfigError

logger = logging.getLogger(__name__)

Runner = Callable[[np.ndarray], np.ndarray]  # (B, 1, *roi) float32 -> (B, 1, *roi) margin logits
Position = tuple[int, ...]
# The trilinear inversion reads the preprocessed voxels within 1 of each output voxel.
MIN_FOCUS_RADIUS = 1


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start indices along one axis, as MONAI's ``dense_patch_slices`` lays them out."""
    if size <= roi:
        return [0]
    interval = max(int(roi * (1 - overlap)), 1)
    count = int(np.ceil((size - roi) / interval)) + 1
    return sorted({min(i * interval, size - roi) for i in range(count)})


def _deep_span(start: int, size: int, roi: int, margin: int) -> tuple[int, int]:
    """[first, stop) of the voxels at least ``margin`` inside the window along one axis;
    a face on the volume's border does not count (nothing lies beyond it)."""
    return start + (margin if start > 0 else 0), start + roi - (margin if start + roi < size else 0)


def survey_starts(starts: list[int], size: int, roi: int, margin: int) -> list[int]:
    """The fewest of ``starts`` (one axis of length ``size``) whose windows hold every voxel
    at least ``margin`` voxels inside one of them; ``margin=0``: windows that just cover.

    Greedy: after each chosen window take the farthest start whose deep span still
    begins inside the deep spans chosen so far (optimal for covering a line by intervals).

    Raises:
        ConfigError: no subset of ``starts`` does it (``margin`` above half the overlap).
    """
    chosen = [starts[0]]
    reach = _deep_span(starts[0], size, roi, margin)[1]
    while reach < size:
        later = [s for s in starts if s > chosen[-1] and _deep_span(s, size, roi, margin)[0] <= reach]
        if not later:
            raise ConfigError(f"survey margin {margin} voxels: windows of {roi} at starts {starts} cannot hold "
                              f"every voxel that far inside; use at most half the overlap")
        chosen.append(max(later))
        reach = _deep_span(chosen[-1], size, roi, margin)[1]
    return chosen


def pad_to_roi(image: np.ndarray, roi: Sequence[int]) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Pad with 0 (symmetric, as MONAI) where an axis is shorter than the window."""
    pads = []
    for size, r in zip(image.shape, roi, strict=True):
        diff = max(r - size, 0)
        pads.append((diff // 2, diff - diff // 2))
    if not any(p for pair in pads for p in pair):
        return image, tuple(slice(None) for _ in image.shape)
    padded = np.pad(image, pads, mode="constant", constant_values=0.0)
    crop = tuple(slice(before, before + size) for (before, _), size in zip(pads, image.shape, strict=True))
    return padded, crop


@dataclass
class WindowStats:
    total: int = 0
    computed: int = 0
    seconds: float = 0.0
    survey: int = 0
    # Focus rounds until the region closed (0 with every window computed).
    rounds: int = 0


class _Accumulator:
    """Sum and count of window margins over the padded (X, Y, Z) grid; with ``track_seen``
    also ``seen``, the voxels some computed window calls spleen (margin > 0)."""

    def __init__(self, shape: tuple[int, ...], roi: Sequence[int], runner: Runner, batch_size: int, progress: bool,
                 track_seen: bool = False) -> None:
        self.sum = np.zeros(shape, dtype=np.float32)
        self.count = np.zeros(shape, dtype=np.uint8)
        self.seen = np.zeros(shape, dtype=bool) if track_seen else None
        self.roi = tuple(roi)
        self.runner = runner
        self.batch_size = batch_size
        self.progress = progress

    def average(self) -> np.ndarray:
        """Sum / count in place (every voxel is covered by at least one window)."""
        np.divide(self.sum, self.count, out=self.sum)
        return self.sum

    def box(self, start: Position) -> tuple[slice, ...]:
        return tuple(slice(s, s + r) for s, r in zip(start, self.roi, strict=True))

    def run(self, image: np.ndarray, positions: list[Position], label: str) -> None:
        from tqdm import tqdm

        bar = tqdm(total=len(positions), desc=f"windows ({label})", unit="win", disable=not self.progress, leave=False)
        chunks = [positions[begin : begin + self.batch_size] for begin in range(0, len(positions), self.batch_size)]
        batches = (np.ascontiguousarray(np.stack([image[self.box(p)] for p in chunk])[:, None], dtype=np.float32)
                   for chunk in chunks)
        # A runner with ``stream`` (backends.Runner) keeps computing the next windows while these are added up.
        stream = getattr(self.runner, "stream", None) or (lambda items: map(self.runner, items))
        for chunk, margins in zip(chunks, stream(batches), strict=True):
            for p, margin in zip(chunk, margins, strict=True):
                box = self.box(p)
                self.sum[box] += margin[0]
                self.count[box] += 1
                if self.seen is not None:
                    self.seen[box] |= margin[0] > 0
            bar.update(len(chunk))
        bar.close()


def true_span(mask: np.ndarray) -> tuple[list[int], list[int]] | None:
    """(first, last) index per axis of ``mask``'s True voxels ((X, Y, Z) bool); None if there are none.

    From per-axis projections, no index arrays (24 bytes per True voxel); the z projection
    reads only the (x, y) box, not the whole grid again.
    """
    columns = np.asarray(mask.any(axis=2))
    x_hits, y_hits = np.flatnonzero(columns.any(axis=1)), np.flatnonzero(columns.any(axis=0))
    if x_hits.size == 0:
        return None
    x, y = slice(int(x_hits[0]), int(x_hits[-1]) + 1), slice(int(y_hits[0]), int(y_hits[-1]) + 1)
    z_hits = np.flatnonzero(mask[x, y].any(axis=(0, 1)))
    return [x.start, y.start, int(z_hits[0])], [x.stop - 1, y.stop - 1, int(z_hits[-1])]


def _grow(mask: np.ndarray, radius: int) -> np.ndarray:
    """``mask`` dilated by a (2 * radius + 1)^3 cube; bool (X, Y, Z).

    Filtered only over the box of ``mask``'s voxels grown by ``radius``: nothing outside it
    changes, and the filter's mirrored border there reads only False voxels. On an
    MSD-sized scan the box is a few percent of the grid; the whole grid took 0.1 s a round,
    with the network idle.
    """
    from scipy.ndimage import maximum_filter

    grown = np.zeros_like(mask)
    span = true_span(mask)
    if span is None:
        return grown
    inside = tuple(slice(max(first - radius, 0), min(last + radius + 1, size))
                   for first, last, size in zip(*span, mask.shape, strict=True))
    grown[inside] = maximum_filter(mask[inside].view(np.uint8), size=2 * radius + 1).view(bool)
    return grown


def _survey_and_focus(padded: np.ndarray, acc: _Accumulator, axis_starts: list[list[int]], focus_radius: int,
                      survey_margin: int) -> tuple[int, int, int]:
    """Steps 1-3 of the module docstring on ``acc`` (built with ``track_seen``); returns
    (windows computed, survey windows, rounds)."""
    if acc.seen is None:
        raise ValueError("focused windows need an accumulator that tracks the voxels windows call spleen")
    survey = list(itertools.product(*[survey_starts(s, n, r, survey_margin)
                                       for s, n, r in zip(axis_starts, padded.shape, acc.roi, strict=True)]))
    acc.run(padded, survey, "survey")
    computed = set(survey)
    region = np.zeros(padded.shape, dtype=bool)
    rounds = 0
    while True:
        # The voxels the region gains, computed in the grown mask's own array: the three
        # grid-sized masks (seen, region, this) are all the focus allocates.
        gained = _grow(acc.seen, focus_radius)
        np.greater(gained, region, out=gained)
        if not gained.any():
            break
        region |= gained
        del gained
        rounds += 1
        focus = [p for p in itertools.product(*axis_starts) if p not in computed and region[acc.box(p)].any()]
        acc.run(padded, focus, f"focus {rounds}")
        computed.update(focus)
    return len(computed), len(survey), rounds


def spleen_margin(
    image: np.ndarray,
    runner: Runner,
    roi: Sequence[int],
    overlap: float,
    batch_size: int,
    focus_radius: int | None,
    progress: bool = False,
    survey_margin: int = RECIPE.inference.survey_margin,
) -> tuple[np.ndarray, WindowStats]:
    """Sliding-window spleen margin (logit difference) over a preprocessed (X, Y, Z) image.

    Returns the (X, Y, Z) float32 margin, MONAI's average of window outputs wherever
    all its windows were computed (see the module docstring for where that is), and
    statistics on the windows run. ``focus_radius=None`` computes every window.

    Raises:
        ConfigError: ``focus_radius`` below 1 (the inversion reads one voxel past the mask).
    """
    if focus_radius is not None and focus_radius < MIN_FOCUS_RADIUS:
        raise ConfigError(f"focus radius {focus_radius} voxels: the inversion interpolates from the voxels within "
                          f"1 of the mask, so the focus must reach at least {MIN_FOCUS_RADIUS} (None: every window)")
    start_time = time.perf_counter()
    padded, crop = pad_to_roi(image, roi)
    axis_starts = [window_starts(size, r, overlap) for size, r in zip(padded.shape, roi, strict=True)]
    stats = WindowStats(total=int(np.prod([len(s) for s in axis_starts])))
    acc = _Accumulator(padded.shape, roi, runner, batch_size, progress, track_seen=focus_radius is not None)
    if focus_radius is None:
        acc.run(padded, list(itertools.product(*axis_starts)), "all")
        stats.computed = stats.survey = stats.total
    else:
        stats.computed, stats.survey, stats.rounds = _survey_and_focus(padded, acc, axis_starts, focus_radius,
                                                                       survey_margin)
    margin = acc.average()
    stats.seconds = time.perf_counter() - start_time
    logger.debug("computed %d of %d windows (survey %d, %d focus rounds) in %.1f s", stats.computed, stats.total,
                 stats.survey, stats.rounds, stats.seconds)
    return margin[crop].astype(np.float32, copy=False), stats
