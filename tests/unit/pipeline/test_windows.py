"""Window layout and blending against MONAI's sliding_window_inference."""

import itertools

import numpy as np
import pytest
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval
from scipy.ndimage import uniform_filter

from spleen_seg.errors import ConfigError
from spleen_seg.pipeline.windows import spleen_margin, survey_starts, window_starts
from spleen_seg.training.phantom import make_phantom

ROI = (16, 16, 16)


@pytest.mark.parametrize("shape", [(40, 33, 16), (267, 267, 166), (96, 120, 97), (20, 17, 31)])
def test_window_starts_equal_monai_layout(shape):
    roi = (96, 96, 96) if max(shape) > 60 else ROI
    padded = tuple(max(s, r) for s, r in zip(shape, roi, strict=True))
    interval = _get_scan_interval(padded, roi, 3, (0.5, 0.5, 0.5))
    slices = dense_patch_slices(padded, roi, interval)
    expected = sorted({tuple(s.start for s in sl) for sl in slices})
    ours = sorted(np.array(np.meshgrid(*[window_starts(n, r, 0.5) for n, r in zip(padded, roi, strict=True)],
                                       indexing="ij")).reshape(3, -1).T.tolist())
    assert [tuple(p) for p in ours] == expected


def _deepest(chosen: list[int], size: int, roi: int) -> np.ndarray:
    """Per voxel of the axis, how far inside the chosen windows it lies at best (faces on the
    volume's border do not count)."""
    best = np.full(size, -1)
    for start in chosen:
        index = np.arange(start, start + roi)
        lower = index - start if start > 0 else np.full(roi, size)
        upper = start + roi - 1 - index if start + roi < size else np.full(roi, size)
        best[index] = np.maximum(best[index], np.minimum(lower, upper))
    return best


@pytest.mark.parametrize("size", [96, 120, 166, 192, 239, 267, 334, 500])
@pytest.mark.parametrize("margin", [0, 1, 8, 10, 11, 24])
def test_survey_starts_hold_every_voxel_deep_with_fewest_windows(size, margin):
    starts = window_starts(size, 96, 0.5)
    chosen = survey_starts(starts, size, 96, margin)
    assert set(chosen) <= set(starts) and chosen[0] == starts[0] and chosen[-1] == starts[-1]
    assert _deepest(chosen, size, 96).min() >= margin
    # Fewest: no subset of MONAI's starts with one window less does it.
    assert all(_deepest(list(subset), size, 96).min() < margin
               for subset in itertools.combinations(starts, len(chosen) - 1))


def test_survey_starts_on_the_msd_grid():
    starts = window_starts(267, 96, 0.5)
    assert starts == [0, 48, 96, 144, 171]
    assert survey_starts(starts, 267, 96, 0) == [0, 96, 171]  # covers once: the old survey
    assert survey_starts(starts, 267, 96, 8) == [0, 48, 96, 171]  # 171 - 96 leaves room for 10
    assert survey_starts(starts, 267, 96, 11) == starts
    assert survey_starts(window_starts(166, 96, 0.5), 166, 96, 8) == [0, 70]


def test_survey_margin_beyond_half_the_overlap_is_refused():
    with pytest.raises(ConfigError, match="survey margin 25 voxels"):
        survey_starts(window_starts(267, 96, 0.5), 267, 96, 25)


def _conv_runner():
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(1, 1, 5, padding=2).eval()

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return conv(torch.from_numpy(batch)).numpy()

    return conv, run


@pytest.mark.parametrize("shape", [(40, 35, 20), (12, 30, 18)])
def test_all_windows_equal_monai_sliding_window(shape):
    conv, run = _conv_runner()
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    with torch.no_grad():
        expected = sliding_window_inference(torch.from_numpy(image)[None, None], ROI, 3, conv, overlap=0.5)[0, 0].numpy()
    ours, stats = spleen_margin(image, run, ROI, 0.5, 3, focus_radius=None)
    assert ours.shape == shape
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    assert stats.computed == stats.total


def test_focused_windows_are_exact_near_the_positive_region():
    conv, run = _conv_runner()
    rng = np.random.default_rng(1)
    image = rng.random((64, 64, 48), dtype=np.float32) * 0.1
    image[40:52, 40:52, 30:40] = 3.0  # a bright blob: the only place the conv output is clearly positive
    full, _ = spleen_margin(image, run, ROI, 0.5, 4, focus_radius=None)
    focused, stats = spleen_margin(image, run, ROI, 0.5, 4, focus_radius=4, survey_margin=0)
    assert stats.computed < stats.total
    # Within the blob (plus 2 voxels) every window is computed: MONAI's exact average.
    near = np.zeros(image.shape, bool)
    near[38:54, 38:54, 28:42] = True
    np.testing.assert_allclose(focused[near], full[near], atol=1e-5)
    np.testing.assert_array_equal(focused > 0, full > 0)


# ----------------------------------------------------------------------------- focused windows under stress
# Focused windows against all windows on inputs built so that a survey can miss the spleen:
# the MSD-geometry grid (267 x 267 x 166 after preprocessing: 5 x 5 x 3 windows of 96^3),
# whose every-other-window survey had seams at x = 96 and y = 96, and networks whose output
# at a voxel depends on context far from it.
MSD_GRID = (267, 267, 166)
ROI_96 = (96, 96, 96)
SEAM = 96  # the face shared by the windows at 0 and 96 along x and y
DETECTOR_GAIN = 100.0  # one window that holds the object outweighs the others' -1


def _whole_object_detector(batch: np.ndarray) -> np.ndarray:
    """A network that reasons about the whole window: margin +GAIN on the bright voxels when
    the window holds all of the bright object (none of it on a face of the window), else -1."""
    out = np.full(batch.shape, -1.0, dtype=np.float32)
    for window, margin in zip(batch[:, 0], out[:, 0], strict=True):
        bright = window > 0.5
        faces = [bright.take(i, axis=a) for a in range(3) for i in (0, -1)]
        if bright.any() and not any(f.any() for f in faces):
            margin[bright] = DETECTOR_GAIN
    return out


def _local_network(context: int, threshold: float):
    """A one-layer convolutional network: the mean over a (2 * context + 1)^3 cube, zero padded
    at the window's faces as a CNN pads, minus ``threshold``. Near a face it sees less organ."""
    def run(batch: np.ndarray) -> np.ndarray:
        means = [uniform_filter(w, size=2 * context + 1, mode="constant") for w in batch[:, 0]]
        return (np.stack(means)[:, None] - threshold).astype(np.float32)

    return run


def _ball(centre: tuple[int, int, int], radius: float) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, n) for n in MSD_GRID)]
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2


def _phantom_spleen_at(centre: tuple[int, int, int]) -> np.ndarray:
    """A phantom's spleen (1.5 x 1.5 x 2 mm voxels, 42 x 37 x 40 box) centred at ``centre``
    on the MSD grid: 1 in the organ, faint noise elsewhere (no exact ties at margin 0)."""
    case = make_phantom(1, spacing_mm=(1.5, 1.5, 2.0), orientation="RAS")
    organ = case.spleen_mask[tuple(slice(i.min(), i.max() + 1) for i in np.nonzero(case.spleen_mask))]
    image = np.random.default_rng(0).random(MSD_GRID, dtype=np.float32) * 1e-3
    box = tuple(slice(c - n // 2, c - n // 2 + n) for c, n in zip(centre, organ.shape, strict=True))
    image[box] += organ
    return image


def _focused_and_full(image, runner, **kwargs):
    full, full_stats = spleen_margin(image, runner, ROI_96, 0.5, 4, focus_radius=None)
    focused, stats = spleen_margin(image, runner, ROI_96, 0.5, 4, focus_radius=8, **kwargs)
    assert full_stats.computed == full_stats.total == 75
    return full > 0, focused > 0, stats


def test_object_seen_whole_only_across_the_old_survey_seam():
    # A ball of radius 13 (9,171 voxels) on the seams of the old survey at x = y = 96: no
    # window of that survey holds it whole, the windows at x = y = 48 do.
    image = _ball((SEAM, SEAM, 78), 13).astype(np.float32)
    full, focused, stats = _focused_and_full(image, _whole_object_detector)
    assert int(full.sum()) == int((image > 0.5).sum()) == 9171
    np.testing.assert_array_equal(focused, full)
    assert stats.survey == 32 and stats.computed < stats.total
    # The old survey (every other window, no margin) misses it entirely.
    _, old_survey, old_stats = _focused_and_full(image, _whole_object_detector, survey_margin=0)
    assert old_stats.survey == 18 and int(old_survey.sum()) == 0


def test_spleen_across_the_seam_with_a_local_network():
    # One conv layer with a 33^3 kernel: the survey windows on either side of the seam see
    # too little of the organ; the window at x = y = 48 sees it all.
    image = _phantom_spleen_at((SEAM, SEAM, 83))
    full, focused, stats = _focused_and_full(image, _local_network(context=16, threshold=0.25))
    assert int(full.sum()) == 10997
    np.testing.assert_array_equal(focused, full)
    _, old_survey, _ = _focused_and_full(image, _local_network(context=16, threshold=0.25), survey_margin=0)
    assert int(old_survey.sum()) == 0


def test_focus_grows_until_no_positive_lies_outside_the_computed_region():
    # Here even the old survey sees part of the spleen, but focus windows reveal spleen more
    # than focus_radius from it: computed once, the old focus stage was 34 voxels off.
    image = _phantom_spleen_at((SEAM, SEAM, 60))
    full, focused, stats = _focused_and_full(image, _local_network(context=14, threshold=0.3), survey_margin=0)
    assert int(full.sum()) == 11163
    np.testing.assert_array_equal(focused, full)
    assert stats.rounds >= 2


@pytest.mark.parametrize("radius", [1, 3, 8])
def test_grow_equals_the_cube_filter_over_the_whole_grid(radius):
    """The dilation filtered only over the seeds' box equals scipy's filter over the whole grid,
    seeds on the grid's faces and corners included (where the filter mirrors the border)."""
    from scipy.ndimage import maximum_filter

    from spleen_seg.pipeline.windows import _grow

    rng = np.random.default_rng(radius)
    shapes = [(30, 25, 20), (9, 40, 13), (50, 50, 7)]
    for shape, count in itertools.product(shapes, [0, 1, 2, 5]):
        mask = np.zeros(shape, dtype=bool)
        for _ in range(count):
            mask[tuple(int(rng.integers(0, n)) for n in shape)] = True
        mask[(0, -1)[count % 2], 0, -1] = count > 2  # a corner seed
        expected = maximum_filter(mask.view(np.uint8), size=2 * radius + 1).view(bool)
        grown = _grow(mask, radius)
        assert np.array_equal(grown, expected), (shape, count)
        assert grown.sum() == expected.sum()


# ----------------------------------------------------------------------------- one positive window is enough
# A network that weighs context far away in the window: it calls the organ spleen in
# proportion to how much of a distant marker its window holds. On a (96, 96, 166) grid the
# windows along z start at 0, 48 and 70 and the survey leaves out 48; the organ (z 80..85)
# lies in all three, the marker is split so that the windows hold 70 %, 100 % and 30 % of it.
CONTEXT_GRID = (96, 96, 166)
ORGAN_VALUE = 0.5
MARKER_LEVEL = 0.9  # marker voxels are 1.0, everything else below this
CONTEXT_GAIN, CONTEXT_THRESHOLD = 1.0, 0.6  # margins 0.1, 0.4 and -0.3 on the organ


def _context_network(marker_voxels: int):
    """Margin ``GAIN * (share of the marker inside the window) - THRESHOLD`` on the organ's
    voxels (values near ORGAN_VALUE), -1 everywhere else."""
    def run(batch: np.ndarray) -> np.ndarray:
        out = np.full(batch.shape, -1.0, dtype=np.float32)
        for window, margin in zip(batch[:, 0], out[:, 0], strict=True):
            share = np.count_nonzero(window > MARKER_LEVEL) / marker_voxels
            margin[np.abs(window - ORGAN_VALUE) < 0.1] = CONTEXT_GAIN * share - CONTEXT_THRESHOLD
        return out

    return run


def _context_image() -> np.ndarray:
    image = np.zeros(CONTEXT_GRID, dtype=np.float32)
    image[20:30, 20:30, 80:86] = ORGAN_VALUE  # in the windows at z = 0, 48 and 70
    image[40:50, 40:50, 55:62] = 1.0  # 700 marker voxels in the windows at z = 0 and 48
    image[40:50, 40:50, 110:113] = 1.0  # 300 in those at z = 48 and 70
    return image


def test_a_voxel_one_computed_window_calls_spleen_gets_all_its_windows():
    # The survey's windows (z = 0 and 70) give the organ 0.1 and -0.3: their average, and the
    # average of those holding it 8 voxels inside, is -0.1. The window at 48 gives 0.4, so
    # MONAI's average over all three is +0.067: spleen. The old rule focused only where the
    # computed windows' average was positive, found none, and returned no spleen at all.
    image = _context_image()
    runner = _context_network(int((image > MARKER_LEVEL).sum()))
    full, full_stats = spleen_margin(image, runner, ROI_96, 0.5, 4, focus_radius=None)
    focused, stats = spleen_margin(image, runner, ROI_96, 0.5, 4, focus_radius=8)
    assert full_stats.total == 3 and stats.survey == 2
    assert int((full > 0).sum()) == 600
    np.testing.assert_array_equal(focused > 0, full > 0)
    np.testing.assert_allclose(focused[full > 0], 0.2 / 3, rtol=1e-6)
    assert stats.computed == 3


def test_the_inverted_mask_equals_all_windows_where_one_window_calls_spleen():
    # The same scan as a CT (HU) through the segmenter: preprocessing, windows, inversion.
    from spleen_seg.io.nifti import Geometry
    from spleen_seg.pipeline.backends import Runner
    from spleen_seg.pipeline.segmenter import Segmenter

    low, high = (-57.0, 164.0)  # the recipe's HU window: 0.5 <- 53.5 HU, 1.0 <- 164 HU and above
    hu = low + _context_image() * (high - low)
    hu[_context_image() == 0] = -1000.0
    geometry = Geometry(shape=CONTEXT_GRID, affine_ras=np.diag([1.5, 1.5, 2.0, 1.0]))
    runner = Runner(_context_network(1000), batch_size=4, backend="numpy")
    masks = {radius: Segmenter(runner=runner, progress=False, focus_radius=radius).predict(hu, geometry)
             for radius in (None, 8)}
    assert int(masks[None].sum()) == 600
    np.testing.assert_array_equal(masks[8], masks[None])


def test_a_focus_radius_below_one_voxel_is_refused():
    # The inversion reads the 2 x 2 x 2 voxels around each output voxel: the region must
    # reach at least one voxel past every seen voxel for the mask to be exact.
    with pytest.raises(ConfigError, match="focus radius 0"):
        spleen_margin(_context_image(), _context_network(1000), ROI_96, 0.5, 4, focus_radius=0)
