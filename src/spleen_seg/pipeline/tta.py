"""Flip test-time augmentation (TTA): the network's margin averaged over mirrored copies of the image.

As nnU-Net does, the network's logits (here their difference, the margin) are averaged over
the image and its mirror images along a chosen set of axes: with all three axes, the
identity and the 7 non-empty combinations of flips, 8 predictions. The axes are named by the
letters of the preprocessed grid, which is RAS-ordered: ``x`` left-right, ``y``
front-back, ``z`` head-feet.

The whole preprocessed image is mirrored and goes through the sliding window (and its
focused windows) as the plain inference does; the mirrored margin is mirrored back and
added. nnU-Net mirrors each window instead; the two are equal where the window layout is
itself mirror-symmetric, and otherwise differ only in which windows' outputs are blended
(a mirrored image is tiled from its other end). Mirroring the image keeps every prediction
whole on the preprocessed grid, so the agreement of the mirrored predictions is known per
voxel (:class:`FlipAgreement`, used by ``pipeline.quality``) without touching the window
accumulation. The bundle's ``inference.json`` does the same with :class:`MirroredInferer`
(override ``tta_axes``, e.g. ``--tta_axes xyz``).

The segmenter mirrors MSD-convention weights' inputs left-right and front-back (see
``Segmenter.mirror_xy``); flips commute with that, so the axes keep their names.

Mirroring helps only a network trained with mirrored copies: one trained without flips
(the bundle's recipe, the official weights) sees, mirrored left-right, a spleen on the
right and a liver on the left, and can return no spleen at all. So the weights' record
(the sidecar ``<weights>.json``: ``"trained_with_flips"``, optionally ``"safe_tta_axes"``)
decides, in :func:`check_tta_axes`, which every TTA caller goes through: ``load_segmenter``
(segment, compare, the Ray actors, library calls) and the bundle's :func:`bundle_inferer`.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spleen_seg.errors import ConfigError, WeightsError
from spleen_seg.pipeline.network import (
    FLIPS_KEY,
    SAFE_TTA_AXES_KEY,
    is_official_weights,
    read_weights_record,
    sidecar_path,
)
from spleen_seg.pipeline.windows import WindowStats

logger = logging.getLogger(__name__)

TTA_AXES = "xyz"
# The warning's first word in a case's report when TTA mirrors axes the weights were not trained on.
FLAG_TTA_UNTRAINED = "tta_without_flip_training"
# The sliding window on one (X, Y, Z) image: its margin and the windows it computed.
SlidingWindow = Callable[[np.ndarray], tuple[np.ndarray, WindowStats]]


def parse_tta_axes(text: str | Sequence[str]) -> str:
    """``"x,y"``, ``"xy"`` or ``"z"`` -> the axes in canonical order (``"xy"``); ``""`` -> ``""`` (no TTA).

    A sequence of letters is read the same (``monai.bundle run --tta_axes x,y`` passes a tuple).
    Raises ``ConfigError`` for a letter other than x, y, z or a repeated one.
    """
    text = text if isinstance(text, str) else ",".join(map(str, text))
    letters = [c for c in text.lower() if c not in ", "]
    unknown = sorted({c for c in letters if c not in TTA_AXES})
    if unknown or len(set(letters)) != len(letters):
        raise ConfigError(f"TTA axes must be distinct letters among x (left-right), y (front-back), z (head-feet), "
                          f"e.g. 'x,y' or 'xyz'; got '{text}'")
    return "".join(axis for axis in TTA_AXES if axis in letters)


def flip_combinations(axes: str | Sequence[str]) -> list[tuple[int, ...]]:
    """The identity ``()`` and every non-empty combination of the array axes named by ``axes``.

    ``"xyz"`` gives 8 tuples (identity + 7), ``"xy"`` 4, ``""`` only the identity.
    """
    indices = [TTA_AXES.index(axis) for axis in parse_tta_axes(axes)]
    return [combo for size in range(len(indices) + 1) for combo in itertools.combinations(indices, size)]


@dataclass(frozen=True)
class FlipRecord:
    """What a weights file's record says about mirroring.

    ``safe_axes``: the axes TTA may mirror without showing the network anatomy it never
    saw (all three when trained with flips and no axes are named). ``source``: where that
    came from, for messages.
    """

    trained_with_flips: bool
    safe_axes: str
    source: str


def weights_flip_record(weights: str | Path) -> FlipRecord:
    """The flips ``weights`` were trained with: the sidecar's ``"trained_with_flips"`` (and
    ``"safe_tta_axes"``), else the official weights (by md5) and weights with no record
    count as trained without flips, no axis safe.

    Raises:
        WeightsError: no such weights file.
        ConfigError: an unreadable sidecar, or one whose flip fields have the wrong type.
    """
    if not Path(weights).is_file():
        raise WeightsError(f"{weights}: weights file not found")
    record = read_weights_record(weights)
    sidecar = sidecar_path(weights)
    if FLIPS_KEY in record:
        trained = record[FLIPS_KEY]
        if not isinstance(trained, bool):
            raise ConfigError(f"{sidecar}: '{FLIPS_KEY}' must be true or false, got {trained!r}")
        declared = record.get(SAFE_TTA_AXES_KEY, TTA_AXES if trained else "")
        if not isinstance(declared, str):
            raise ConfigError(f"{sidecar}: '{SAFE_TTA_AXES_KEY}' must be a string of axes such as \"xy\", "
                              f"got {declared!r}")
        try:
            safe = parse_tta_axes(declared)
        except ConfigError as err:
            raise ConfigError(f"{sidecar}: '{SAFE_TTA_AXES_KEY}': {err}") from None
        return FlipRecord(trained_with_flips=trained, safe_axes=safe, source=f"recorded in {sidecar}")
    if is_official_weights(weights):
        return FlipRecord(False, "", "the model zoo's released weights, recognised by checksum")
    return FlipRecord(False, "", f"no record: no {sidecar.name} beside them and not a known checksum")


def check_tta_axes(weights: str | Path, axes: str, *, explicit: bool) -> str | None:
    """Whether flip TTA over ``axes`` may run with ``weights``; the one place that decides it.

    ``explicit``: the caller named the axes (``--tta-axes``, ``--tta_axes``, a library
    call); False for ``--tta``'s default of all three. Axes the weights' record declares
    safe run silently. Others run with the returned warning (for the case's report) when
    named explicitly, and are refused when they are only ``--tta``'s default. ``""``
    (no TTA) always returns None.

    Raises:
        ConfigError: ``--tta``'s default on weights not trained with flips on all three
            axes (one line: why, and how to proceed), or an invalid weights record.
    """
    axes = parse_tta_axes(axes)
    if not axes:
        return None
    record = weights_flip_record(weights)
    unsafe = "".join(axis for axis in axes if axis not in record.safe_axes)
    if not unsafe:
        return None
    trained = (f"trained with flips along {_axes_text(record.safe_axes)} only" if record.trained_with_flips
               else "not trained with flips")
    if not explicit:
        raise ConfigError(
            f"--tta refused: {weights} were {trained} ({record.source}); mirroring shows such a network anatomy it "
            f"never saw and can return an empty mask. Use --tta-axes on axes the weights declare safe "
            f"({_axes_text(record.safe_axes) or 'none declared'}), or weights trained with mirroring "
            f'(their {sidecar_path(weights).name} says "{FLIPS_KEY}": true)')
    return (f"{FLAG_TTA_UNTRAINED}: flip TTA along {_axes_text(unsafe)}, but {weights} were {trained} "
            f"({record.source}); the mirrored predictions can break the mask")


def _axes_text(axes: str) -> str:
    return ",".join(axes)


@dataclass(frozen=True)
class FlipAgreement:
    """How the mirrored predictions agree, per voxel of the preprocessed grid.

    ``positive_count``: uint8 (X, Y, Z), how many of the ``predictions`` mirrored margins are
    positive (call the voxel spleen) there; they agree where it is 0 or ``predictions``.
    """

    positive_count: np.ndarray
    predictions: int


def mirrored_margin(image: np.ndarray, sliding: SlidingWindow,
                    axes: str) -> tuple[np.ndarray, WindowStats, FlipAgreement | None]:
    """The margin of ``image`` averaged over its mirror images along ``axes`` (see the module docstring).

    ``image``: preprocessed (X, Y, Z) float32. ``sliding(image)`` returns the (X, Y, Z)
    float32 margin and its window statistics. Returns the mean margin (float32, same
    shape), the window statistics summed over the predictions, and their agreement (None
    without TTA, where ``sliding`` is called once on ``image`` itself).
    """
    combos = flip_combinations(axes)
    margin, stats = sliding(image)  # the identity comes first
    if len(combos) == 1:
        return margin, stats, None
    total = np.array(margin, dtype=np.float32)
    positive = (margin > 0).view(np.uint8).copy()
    for flip in combos[1:]:
        # A contiguous copy: the sliding window may hand the array to runtimes that refuse
        # negative strides; it is one image-sized copy at a time.
        mirrored, step = sliding(np.ascontiguousarray(np.flip(image, flip)))
        margin = np.flip(mirrored, flip)
        total += margin
        positive += margin > 0
        stats.total += step.total
        stats.computed += step.computed
        stats.seconds += step.seconds
    total *= np.float32(1.0 / len(combos))
    return total, stats, FlipAgreement(positive_count=positive, predictions=len(combos))


class MirroredInferer:
    """A MONAI inferer's output averaged over mirrored inputs: the bundle's flip TTA.

    ``inferer(inputs, network)`` maps (B, C, X, Y, Z) images to (B, 2, X, Y, Z) logits;
    this calls it on every mirror image of ``inputs`` along ``axes`` (spatial dims 2, 3,
    4 = x, y, z of the RAS-oriented image), mirrors each output back and averages the logits.
    """

    def __init__(self, inferer: Any, axes: str | Sequence[str]) -> None:
        self.inferer = inferer
        self.flips = flip_combinations(axes)

    def __call__(self, inputs: Any, network: Any, *args: Any, **kwargs: Any) -> Any:
        import torch

        total = self.inferer(inputs, network, *args, **kwargs)  # the identity comes first
        for flip in self.flips[1:]:
            dims = [2 + axis for axis in flip]
            total = total + torch.flip(self.inferer(torch.flip(inputs, dims), network, *args, **kwargs), dims)
        return total / len(self.flips)


def bundle_inferer(inferer: Any, axes: str | Sequence[str], weights: str | Path | None = None) -> Any:
    """``inferer`` itself when ``axes`` is empty (the bundle's default), else a :class:`MirroredInferer`.

    ``weights``: the checkpoint the bundle loads; TTA on axes its record does not declare
    safe is logged as a warning (``--tta_axes`` names the axes: see :func:`check_tta_axes`).
    """
    axes = parse_tta_axes(axes)
    if not axes:
        return inferer
    # A missing checkpoint is the bundle's CheckpointLoader's to report (it runs next).
    if weights is not None and Path(weights).is_file():
        warning = check_tta_axes(weights, axes, explicit=True)
        if warning is not None:
            logger.warning("%s", warning)
    return MirroredInferer(inferer, axes)
