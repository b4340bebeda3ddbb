"""The phantom's anatomy: tissue labels painted on a world grid, and their CT numbers.

Positions are world RAS+ millimetres (nibabel convention: +x towards the patient's Right, +y Anterior, +z Superior),
so the patient's left is x < 0 and posterior is y < 0 relative to the body centre, which sits at world x = y = 0.
The painters work on a canonical RAS-ordered label grid; sizes inside them are millimetres or fractions of the
abdominal cavity's half-axes. ``training.phantom`` chooses the grid, calls ``paint_anatomy`` and ``render_hu``, and
flips the result into the requested orientation.

The spleen's HU overlaps the liver's, bowel wall's and muscle's on purpose: a network has to use shape and position,
not intensity alone, to find it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["SPLEEN", "SPLEEN_Z_REACH_MM", "Body", "Grid", "draw_body", "paint_anatomy", "render_hu"]

# Body outline: lateral half-width, and AP half-widths as fractions of it.
BODY_HALF_WIDTH_MM = (110.0, 140.0)
BODY_AP_ANT_FRACTION = (0.68, 0.82)
BODY_AP_POST_FRACTION = (0.62, 0.75)
BODY_Z_WOBBLE = (0.02, 0.05)
BODY_Z_PERIOD_MM = (300.0, 500.0)
SUBCUT_FAT_MM = (8.0, 28.0)
MUSCLE_WALL_MM = (8.0, 14.0)
# Spleen: target volume before clipping, accepted volume after, size and pose.
SPLEEN_TARGET_ML = (110.0, 330.0)
SPLEEN_ACCEPT_ML = (90.0, 380.0)
SPLEEN_ASPECT = {"thick": (0.45, 0.65), "length": (1.0, 1.4)}
SPLEEN_ANGLE_DEG = (212.0, 235.0)
SPLEEN_ROTATION_DEG = 20.0
# Three low-frequency radial bumps (relative amplitude, cycles across the organ) and the
# depth of the concave medial bite (hilum) as a fraction of the spleen's thickness.
SPLEEN_BUMP_AMP = (0.02, 0.08)
SPLEEN_BUMP_FREQ = (1.0, 2.0)
SPLEEN_BITE_DEPTH = (0.35, 0.6)
SPLEEN_FIT_TRIES = 5
SPLEEN_MIN_POSTERIOR_MM = 8.0
SPLEEN_RIM_VOXELS = 2
# Conservative craniocaudal half-extent (mm) of the largest spleen drawn, to keep it in view.
SPLEEN_Z_REACH_MM = 75.0
_INPLANE_CROSS = ndimage.generate_binary_structure(3, 1) & np.array([0, 1, 0], bool)[None, None, :]
_Z_PAIR = np.pad(np.ones((1, 1, 3), bool), ((1, 1), (1, 1), (0, 0)))
MM3_PER_ML = 1000.0
# Noise sigma after smoothing; the [1, 2, 1]/4 kernel in x and y scales white noise by 0.375, so draw it larger.
NOISE_SIGMA_HU = (8.0, 20.0)
SMOOTH_KERNEL = np.array([0.25, 0.5, 0.25], dtype=np.float32)
SMOOTH_NOISE_GAIN = 0.375
HU_CLIP = (-1024.0, 3071.0)

# Tissue labels; the first four are nested shells and are summed, so keep them 0..3.
AIR, SUBCUT_FAT, MUSCLE, VISCERAL_FAT = 0, 1, 2, 3
(LUNG, HEART, BOWEL_WALL, BOWEL_FLUID, GAS, KIDNEY, RENAL_SINUS, STOMACH_WALL, STOMACH_FLUID, LIVER, GALLBLADDER,
 AORTA, IVC, CANCELLOUS, CORTICAL, DISC, CANAL, RIB, SPLEEN) = range(4, 23)
N_LABELS = 23
# Per-case HU is drawn uniformly from these ranges (portal-venous contrast phase).
HU_RANGES: dict[int, tuple[float, float]] = {
    AIR: (-1000, -1000), SUBCUT_FAT: (-110, -95), MUSCLE: (40, 60), VISCERAL_FAT: (-95, -80), LUNG: (-870, -820),
    HEART: (35, 50), BOWEL_WALL: (40, 60), BOWEL_FLUID: (5, 30), GAS: (-1000, -990), KIDNEY: (150, 180),
    RENAL_SINUS: (-80, -40), STOMACH_WALL: (40, 60), STOMACH_FLUID: (5, 25), LIVER: (55, 70), GALLBLADDER: (0, 20),
    AORTA: (150, 200), IVC: (110, 150), CANCELLOUS: (300, 400), CORTICAL: (600, 750), DISC: (70, 100),
    CANAL: (15, 30), RIB: (400, 700), SPLEEN: (45, 65)}
SPLEEN_MINUS_LIVER_HU = (-10.0, 6.0)
# Labels the spleen may carve into: soft organs and fat, never bone, muscle or vessels.
SPLEEN_CARVES = (VISCERAL_FAT, KIDNEY, RENAL_SINUS, STOMACH_WALL, STOMACH_FLUID, GAS, LIVER, GALLBLADDER, BOWEL_WALL,
                 BOWEL_FLUID)
SOFT_CAVITY = (VISCERAL_FAT, BOWEL_WALL, BOWEL_FLUID, GAS)
# Ribs: spacing and thickness along z, descent per radian towards the front.
RIB_PERIOD_MM = (26.0, 34.0)
RIB_THICK_MM = (8.0, 11.0)
RIB_SLOPE_MM_PER_RAD = (25.0, 40.0)
RIB_ARC_RAD = (0.3, 2.3)
N_BOWEL_LOOPS = (10, 20)
BOWEL_GAS_PROB = 0.3


@dataclass(frozen=True)
class Body:
    half_width: float
    ap_ant: float
    ap_post: float
    wobble: float
    wobble_period: float
    wobble_phase: float
    fat: float
    muscle: float
    z_spleen: float


@dataclass(frozen=True)
class Grid:
    """World RAS mm coordinates of a canonical (RAS-ordered) grid, one 1D array per axis."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray

    def span(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice]:
        """Index slices covering world box [lo, hi] (mm), clipped to the grid."""
        axes = (self.x, self.y, self.z)
        return tuple(  # type: ignore[return-value]
            slice(int(np.searchsorted(a, lo[i])), int(np.searchsorted(a, hi[i], "right"))) for i, a in enumerate(axes))

    def local(self, sl: tuple[slice, slice, slice], centre: np.ndarray) -> list[np.ndarray]:
        """Broadcastable offsets (mm) from ``centre`` over the block ``sl``."""
        return [self.x[sl[0]][:, None, None] - np.float32(centre[0]),
                self.y[sl[1]][None, :, None] - np.float32(centre[1]),
                self.z[sl[2]][None, None, :] - np.float32(centre[2])]


def _rotation(angles_rad: np.ndarray) -> np.ndarray:
    """Rotation matrix from x, y, z Euler angles (applied in that order)."""
    cx, cy, cz = np.cos(angles_rad)
    sx, sy, sz = np.sin(angles_rad)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _ellipsoid(grid: Grid, centre: np.ndarray, semi_axes: np.ndarray, rotation: np.ndarray | None = None,
               perturb: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
               block: tuple[slice, slice, slice] | None = None) -> tuple[tuple[slice, slice, slice], np.ndarray]:
    """Boolean mask of a (rotated, optionally bumpy) ellipsoid over ``block`` (default: its bounding box).

    ``perturb`` = (amplitudes, wave vectors (K, 3), phases) scales the surface radius by
    1 + sum_k amp_k cos(pi * w_k . n + phase_k), n the unit direction in the ellipsoid's frame.
    """
    reach = float(np.max(semi_axes)) * (1.0 + (np.sum(perturb[0]) if perturb else 0.0))
    sl = grid.span(centre - reach, centre + reach) if block is None else block
    d = grid.local(sl, centre)
    rot = np.eye(3) if rotation is None else rotation
    # Body-frame coordinates u = R^T d, normalised by the semi-axes.
    u = [sum(np.float32(rot[j, i] / semi_axes[i]) * d[j] for j in range(3)) for i in range(3)]
    q = u[0] ** 2 + u[1] ** 2 + u[2] ** 2
    if perturb is None:
        return sl, np.less_equal(q, 1.0)
    amps, waves, phases = perturb
    inv_r = 1.0 / np.sqrt(np.maximum(q, 1e-6))
    radius = np.ones_like(q)
    for amp, w, ph in zip(amps, waves, phases, strict=True):
        radius += np.float32(amp) * np.cos(np.float32(np.pi) * (w[0] * u[0] + w[1] * u[1] + w[2] * u[2]) * inv_r + ph)
    return sl, np.less_equal(q, radius * radius)


def _paint(labels: np.ndarray, sl: tuple[slice, ...], mask: np.ndarray, label: int,
           allowed: tuple[int, ...] | None = None) -> np.ndarray:
    """Set ``label`` where ``mask`` (and the current label is in ``allowed``); return where."""
    block = labels[sl]
    if allowed is not None:
        lut = np.zeros(N_LABELS, dtype=bool)
        lut[list(allowed)] = True
        mask = mask & lut[block]
    block[mask] = label
    return mask


def _paint_prism(labels: np.ndarray, mask2d: np.ndarray, label: int,
                 zsel: np.ndarray | None = None, allowed: tuple[int, ...] | None = None) -> None:
    """Paint a z-extruded 2D (X, Y) mask, only on slices where ``zsel`` is True."""
    rows, cols = np.nonzero(np.any(mask2d, axis=1))[0], np.nonzero(np.any(mask2d, axis=0))[0]
    if rows.size == 0:
        return
    sl = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1), slice(None))
    zs = np.ones(labels.shape[2], bool) if zsel is None else zsel
    _paint(labels, sl, mask2d[sl[0], sl[1], None] & zs[None, None, :], label, allowed)


def draw_body(rng: np.random.Generator) -> Body:
    """Body outline and the spleen's craniocaudal anchor, independent of the voxel grid."""
    half_width = rng.uniform(*BODY_HALF_WIDTH_MM)
    return Body(
        half_width=half_width, ap_ant=half_width * rng.uniform(*BODY_AP_ANT_FRACTION),
        ap_post=half_width * rng.uniform(*BODY_AP_POST_FRACTION), wobble=rng.uniform(*BODY_Z_WOBBLE),
        wobble_period=rng.uniform(*BODY_Z_PERIOD_MM), wobble_phase=rng.uniform(0, 2 * np.pi),
        fat=rng.uniform(*SUBCUT_FAT_MM), muscle=rng.uniform(*MUSCLE_WALL_MM),
        # Scanner table position: the world z of the spleen centre is arbitrary.
        z_spleen=rng.uniform(-80.0, 80.0))


def _body_shells(labels: np.ndarray, grid: Grid, body: Body) -> dict[str, np.ndarray]:
    """Paint air, subcutaneous fat, muscle wall and visceral fat; return 2D shape maps."""
    scale = 1.0 + body.wobble * np.sin(2 * np.pi * (grid.z - body.z_spleen) / body.wobble_period + body.wobble_phase)
    scale2 = (scale * scale).astype(np.float32)

    def q2d(inset: float) -> np.ndarray:
        ap = np.where(grid.y >= 0, body.ap_ant, body.ap_post) - inset
        return ((grid.x / (body.half_width - inset)) ** 2)[:, None] + ((grid.y / ap) ** 2)[None, :]

    cav_inset = body.fat + body.muscle
    maps = {"outer": q2d(0.0), "fat_in": q2d(body.fat), "cavity": q2d(cav_inset),
            "rib_in": q2d(cav_inset + 2.0), "rib_out": q2d(cav_inset - body.muscle * 0.8), "scale2": scale2}
    # Nested shells: each inner ellipse adds one, giving labels 0..3 in one pass.
    labels += maps["outer"][:, :, None] <= scale2
    labels += maps["fat_in"][:, :, None] <= scale2
    labels += maps["cavity"][:, :, None] <= scale2
    return maps


def _paint_spine(labels: np.ndarray, grid: Grid, body: Body, rng: np.random.Generator) -> dict[str, float]:
    """Vertebral bodies with discs, spinal canal, posterior arch and paraspinal muscles."""
    x, y = grid.x[:, None], grid.y[None, :]
    cav_post = body.ap_post - body.fat - body.muscle
    r_vb = rng.uniform(16.0, 21.0)
    y_vb = -cav_post + r_vb + rng.uniform(4.0, 10.0)
    r_canal = rng.uniform(7.0, 9.0)
    y_canal = y_vb - r_vb - r_canal - 2.0
    skin_post = -body.ap_post + body.fat * 0.6
    for side in (-1.0, 1.0):
        para = ((x - side * 32.0) / 26.0) ** 2 + ((y - (y_canal - 14.0)) / 24.0) ** 2 <= 1
        _paint_prism(labels, para, MUSCLE, allowed=(SUBCUT_FAT, MUSCLE, VISCERAL_FAT))
    d_vb = np.sqrt(x ** 2 + (y - y_vb) ** 2)
    d_canal = np.sqrt(x ** 2 + (y - y_canal) ** 2)
    arch = (d_canal <= r_canal + 5.0) | ((np.abs(x) <= 4.0) & (y <= y_canal) & (y >= skin_post))
    period, phase = rng.uniform(28.0, 34.0), rng.uniform(0.0, 34.0)
    disc_z = np.mod(grid.z - phase, period) < rng.uniform(6.0, 9.0)
    _paint_prism(labels, arch, CORTICAL)
    _paint_prism(labels, d_canal <= r_canal, CANAL)
    _paint_prism(labels, d_vb <= r_vb, CORTICAL)
    _paint_prism(labels, d_vb <= r_vb - 2.5, CANCELLOUS)
    _paint_prism(labels, d_vb <= r_vb, DISC, zsel=disc_z)
    return {"y_vb": y_vb, "r_vb": r_vb}


def _paint_lower_muscles_and_colon(labels: np.ndarray, grid: Grid, body: Body,
                                   spine: dict[str, float], rng: np.random.Generator) -> None:
    """Psoas muscles and the ascending/descending colon below the kidneys."""
    x, y = grid.x[:, None], grid.y[None, :]
    z_low = body.z_spleen - rng.uniform(55.0, 75.0)
    cav_a = body.half_width - body.fat - body.muscle
    for side in (-1.0, 1.0):
        psoas = ((x - side * (spine["r_vb"] + 14.0)) / 15.0) ** 2 \
            + ((y - spine["y_vb"]) / 17.0) ** 2 <= 1
        _paint_prism(labels, psoas, MUSCLE, zsel=grid.z < z_low, allowed=SOFT_CAVITY)
        cx, r = side * cav_a * rng.uniform(0.68, 0.8), rng.uniform(13.0, 19.0)
        colon = (x - cx) ** 2 + (y - rng.uniform(-0.3, 0.0) * cav_a) ** 2
        top = body.z_spleen - rng.uniform(15.0, 40.0)
        _paint_prism(labels, colon <= r * r, BOWEL_WALL, zsel=grid.z < top, allowed=SOFT_CAVITY)
        inside = GAS if rng.uniform() < 0.5 else BOWEL_FLUID
        _paint_prism(labels, colon <= (r - 3.0) ** 2, inside, zsel=grid.z < top, allowed=(BOWEL_WALL,))


def _paint_lungs(labels: np.ndarray, grid: Grid, body: Body, maps: dict[str, np.ndarray],
                 rng: np.random.Generator) -> None:
    """Lung bases and heart above a domed diaphragm, which sits above the spleen."""
    z_left = body.z_spleen + SPLEEN_Z_REACH_MM + rng.uniform(0.0, 20.0)
    z_right = z_left + rng.uniform(5.0, 20.0)
    cav_a = body.half_width - body.fat - body.muscle
    side = np.clip(grid.x / cav_a, -1.0, 1.0)[:, None]
    # The dome is lowest at the periphery (costophrenic recesses).
    dome = z_left + (z_right - z_left) * (side + 1.0) / 2.0 - 25.0 * np.minimum(maps["cavity"], 1)
    k0 = int(np.searchsorted(grid.z, dome.min()))
    if k0 >= grid.z.size:
        return
    block = labels[:, :, k0:]
    above = (grid.z[None, None, k0:] > dome[:, :, None]) & (block == VISCERAL_FAT)
    heart2d = ((grid.x[:, None] + 10.0) / (0.5 * cav_a)) ** 2 \
        + ((grid.y[None, :] - 0.35 * body.ap_ant) / (0.45 * body.ap_ant)) ** 2 <= 1
    block[above] = LUNG
    block[above & heart2d[:, :, None]] = HEART


def _paint_bowel(labels: np.ndarray, grid: Grid, body: Body, rng: np.random.Generator) -> None:
    """Small-bowel loops (wall, fluid or gas) in the lower anterior abdomen."""
    cav_a = body.half_width - body.fat - body.muscle
    z_top = body.z_spleen - 20.0
    for _ in range(rng.integers(*N_BOWEL_LOOPS, endpoint=True)):
        centre = np.array([rng.uniform(-0.65, 0.65) * cav_a,
                           rng.uniform(-0.2, 0.6) * (body.ap_ant - body.fat - body.muscle),
                           z_top - rng.uniform(0.0, 120.0)])
        axes = rng.uniform([10.0, 10.0, 18.0], [18.0, 18.0, 35.0])
        rot = _rotation(rng.uniform(-np.pi, np.pi, 3))
        sl, wall = _ellipsoid(grid, centre, axes, rot)
        _paint(labels, sl, wall, BOWEL_WALL, allowed=(VISCERAL_FAT,))
        sl, lumen = _ellipsoid(grid, centre, axes - 3.0, rot)
        inside = GAS if rng.uniform() < BOWEL_GAS_PROB else BOWEL_FLUID
        _paint(labels, sl, lumen, inside, allowed=(BOWEL_WALL,))


def _paint_organs(labels: np.ndarray, grid: Grid, body: Body,
                  spine: dict[str, float], rng: np.random.Generator) -> None:
    """Kidneys, stomach with gas, liver with gallbladder, aorta and IVC."""
    cav_a = body.half_width - body.fat - body.muscle
    cav_ant, cav_post = body.ap_ant - body.fat - body.muscle, body.ap_post - body.fat - body.muscle
    z_kid = body.z_spleen - rng.uniform(30.0, 50.0)
    for side in (-1.0, 1.0):  # -1 = patient's left (x < 0)
        centre = np.array([side * rng.uniform(0.45, 0.55) * cav_a, -0.45 * cav_post,
                           z_kid - (rng.uniform(5.0, 20.0) if side > 0 else 0.0)])
        axes = rng.uniform([22.0, 26.0, 45.0], [28.0, 32.0, 58.0])
        # Hilum faces antero-medially; lower pole tilts laterally.
        rot = _rotation(np.array([0.0, side * rng.uniform(0.1, 0.25), -side * rng.uniform(0.3, 0.6)]))
        sl, outer = _ellipsoid(grid, centre, axes, rot)
        _paint(labels, sl, outer, KIDNEY, allowed=SOFT_CAVITY)
        hilum = centre + rot @ np.array([-side * axes[0] * 0.6, 0.0, 0.0])
        sl, sinus = _ellipsoid(grid, hilum, axes * np.array([0.5, 0.45, 0.55]), rot)
        _paint(labels, sl, sinus, RENAL_SINUS, allowed=(KIDNEY,))
    z_liver = body.z_spleen + rng.uniform(5.0, 25.0)
    lobes = [(np.array([0.38 * cav_a, 0.0, z_liver]),
              np.array([0.62 * cav_a, 0.85 * max(cav_ant, cav_post), rng.uniform(75.0, 95.0)])),
             (np.array([-0.12 * cav_a, 0.45 * cav_ant, z_liver + 15.0]),
              np.array([0.4 * cav_a, 0.3 * cav_ant, rng.uniform(35.0, 50.0)]))]
    for centre, axes in lobes:
        sl, lobe = _ellipsoid(grid, centre, axes, _rotation(rng.uniform(-0.2, 0.2, 3)))
        _paint(labels, sl, lobe, LIVER, allowed=SOFT_CAVITY)
    gb = np.array([0.25 * cav_a, 0.3 * cav_ant, z_liver - rng.uniform(40.0, 60.0)])
    sl, mask = _ellipsoid(grid, gb, rng.uniform([12.0, 12.0, 25.0], [18.0, 18.0, 40.0]))
    _paint(labels, sl, mask, GALLBLADDER, allowed=(LIVER, *SOFT_CAVITY))
    stomach = np.array([-0.35 * cav_a, 0.2 * cav_ant, body.z_spleen + rng.uniform(0.0, 25.0)])
    axes = rng.uniform([35.0, 25.0, 40.0], [48.0, 35.0, 55.0])
    rot = _rotation(rng.uniform(-0.3, 0.3, 3))
    sl, wall = _ellipsoid(grid, stomach, axes, rot)
    _paint(labels, sl, wall, STOMACH_WALL, allowed=SOFT_CAVITY)
    sl, lumen = _ellipsoid(grid, stomach, axes - 5.0, rot)
    lumen = _paint(labels, sl, lumen, STOMACH_FLUID, allowed=(STOMACH_WALL,))
    # Gas rises anteriorly in a supine patient: a level above which the lumen is air.
    level = stomach[1] + rng.uniform(-0.2, 0.5) * axes[1]
    _paint(labels, sl, lumen & (grid.y[sl[1]] > level)[None, :, None], GAS)
    _paint_vessels(labels, grid, spine, rng)


def _paint_vessels(labels: np.ndarray, grid: Grid, spine: dict[str, float], rng: np.random.Generator) -> None:
    """Aorta (left of midline, anterior to the spine) and IVC (right), full z."""
    x, y = grid.x[:, None], grid.y[None, :]
    r_ao = rng.uniform(10.0, 13.0)
    y_front = spine["y_vb"] + spine["r_vb"]
    aorta = (x + rng.uniform(5.0, 15.0)) ** 2 + (y - y_front - r_ao - 2.0) ** 2 <= r_ao ** 2
    ivc = ((x - rng.uniform(20.0, 28.0)) / 13.0) ** 2 + ((y - y_front - 10.0) / 9.0) ** 2 <= 1
    _paint_prism(labels, aorta, AORTA)
    _paint_prism(labels, ivc, IVC)


def _paint_ribs(labels: np.ndarray, grid: Grid, body: Body, maps: dict[str, np.ndarray],
                rng: np.random.Generator) -> None:
    """Obliquely descending rib arcs in the body wall, from the spleen level upwards."""
    period, thick = rng.uniform(*RIB_PERIOD_MM), rng.uniform(*RIB_THICK_MM)
    slope, phase = rng.uniform(*RIB_SLOPE_MM_PER_RAD), rng.uniform(0.0, period)
    # Lowest ribs: posteriorly near the kidneys, higher towards the costal margin.
    z_floor = body.z_spleen - rng.uniform(30.0, 45.0)
    k0 = int(np.searchsorted(grid.z, z_floor))
    if k0 >= grid.z.size:
        return
    scale2 = maps["scale2"][None, None, k0:]
    band = (maps["rib_in"][:, :, None] > scale2) & (maps["rib_out"][:, :, None] <= scale2)
    ix, iy, iz = np.nonzero(band)
    # Angle from the posterior midline, 0 at the spine and pi at the sternum.
    phi = np.arctan2(np.abs(grid.x[ix]), -grid.y[iy])
    z = grid.z[k0 + iz]
    keep = ((phi > RIB_ARC_RAD[0]) & (phi < RIB_ARC_RAD[1]) & (np.mod(z + slope * phi - phase, period) < thick)
            & (z > z_floor + 30.0 * phi))
    labels[ix[keep], iy[keep], k0 + iz[keep]] = RIB


def _draw_spleen_shape(rng: np.random.Generator, body: Body) -> dict[str, np.ndarray]:
    """Spleen centre, semi-axes, rotation, bumps and medial bite (world RAS mm)."""
    cav_a = body.half_width - body.fat - body.muscle
    cav_post = body.ap_post - body.fat - body.muscle
    volume_mm3 = rng.uniform(*SPLEEN_TARGET_ML) * MM3_PER_ML
    thick, length = rng.uniform(*SPLEEN_ASPECT["thick"]), rng.uniform(*SPLEEN_ASPECT["length"])
    # Semi-axes (radial thickness, tangential width, craniocaudal length) with the volume.
    width = (volume_mm3 / (4.0 / 3.0 * np.pi * thick * length)) ** (1.0 / 3.0)
    axes = np.array([thick * width, width, length * width])
    angle = np.deg2rad(rng.uniform(*SPLEEN_ANGLE_DEG))
    radial = np.array([np.cos(angle), np.sin(angle), 0.0])
    wall = np.array([cav_a * radial[0], cav_post * radial[1], 0.0])
    centre = wall - radial * (axes[0] + rng.uniform(0.0, 6.0))
    centre[2] = body.z_spleen + rng.uniform(-10.0, 10.0)
    # Local frame: thickness along the radial direction, width tangential, length along z.
    frame = np.column_stack([radial, [-radial[1], radial[0], 0.0], [0.0, 0.0, 1.0]])
    rot = _rotation(np.deg2rad(rng.uniform(-SPLEEN_ROTATION_DEG, SPLEEN_ROTATION_DEG, 3))) @ frame
    waves = rng.normal(size=(3, 3))
    return {
        "centre": centre, "axes": axes, "rot": rot, "amps": rng.uniform(*SPLEEN_BUMP_AMP, 3),
        "waves": waves / np.linalg.norm(waves, axis=1, keepdims=True) * rng.uniform(*SPLEEN_BUMP_FREQ, (3, 1)),
        "phases": rng.uniform(0, 2 * np.pi, 3), "bite_depth": np.array(rng.uniform(*SPLEEN_BITE_DEPTH))}


def _paint_spleen(labels: np.ndarray, grid: Grid, shape: dict[str, np.ndarray], voxel_mm3: float) -> None:
    """Bumpy ellipsoid minus a concave medial bite, rescaled and moved until volume and position are plausible."""
    axes, centre, rot = shape["axes"].copy(), shape["centre"].copy(), shape["rot"]
    for _ in range(SPLEEN_FIT_TRIES):
        sl, mask = _ellipsoid(grid, centre, axes, rot, (shape["amps"], shape["waves"], shape["phases"]))
        # Hilum: an ellipsoid centred medially whose surface cuts into the medial face.
        bite_axes = axes * np.array([1.2, 0.75, 0.75])
        offset = axes[0] * (1.0 - float(shape["bite_depth"])) + bite_axes[0]
        bite_centre = centre - rot[:, 0] * offset
        mask &= ~_ellipsoid(grid, bite_centre, bite_axes, rot, block=sl)[1]
        lut = np.zeros(N_LABELS, dtype=bool)
        lut[list(SPLEEN_CARVES)] = True
        mask &= lut[labels[sl]]
        volume_ml = mask.sum() * voxel_mm3 / MM3_PER_ML
        if volume_ml == 0:
            break
        target = float(np.clip(volume_ml, *SPLEEN_ACCEPT_ML))
        # Clipping by the body wall can push a big spleen forwards; keep it posterior.
        y_mean = float(np.dot(mask.sum(axis=(0, 2)), grid.y[sl[1]])) / mask.sum()
        shift = min(0.0, -SPLEEN_MIN_POSTERIOR_MM - y_mean)
        if volume_ml == target and shift == 0.0:
            break
        axes = axes * (target / volume_ml) ** (1.0 / 3.0)
        centre[1] += shift
    block = labels[sl]
    # A thin fat rim, as in real CT, gives an edge where spleen meets liver or stomach.
    rim = ndimage.binary_dilation(mask, structure=_INPLANE_CROSS, iterations=SPLEEN_RIM_VOXELS)
    rim = ndimage.binary_dilation(rim, structure=_Z_PAIR) & ~mask
    rim &= lut[block] & (block != VISCERAL_FAT)
    block[rim] = VISCERAL_FAT
    block[mask] = SPLEEN


def paint_anatomy(labels: np.ndarray, grid: Grid, body: Body, rng: np.random.Generator, voxel_mm3: float) -> None:
    """Paint the abdomen into ``labels`` (uint8 tissue labels, zeros, shape (X, Y, Z) on ``grid``'s RAS axes).

    The order of the painters is the order of the draws from ``rng``: changing it changes every phantom.
    """
    maps = _body_shells(labels, grid, body)
    spine = _paint_spine(labels, grid, body, rng)
    _paint_lungs(labels, grid, body, maps, rng)
    _paint_lower_muscles_and_colon(labels, grid, body, spine, rng)
    _paint_bowel(labels, grid, body, rng)
    _paint_organs(labels, grid, body, spine, rng)
    _paint_ribs(labels, grid, body, maps, rng)
    _paint_spleen(labels, grid, _draw_spleen_shape(rng, body), voxel_mm3)


def render_hu(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-case tissue HU, Gaussian noise and in-plane smoothing; int16 (X, Y, Z)."""
    lut = np.array([rng.uniform(*HU_RANGES[k]) for k in range(N_LABELS)], dtype=np.float32)
    lut[SPLEEN] = np.clip(lut[LIVER] + rng.uniform(*SPLEEN_MINUS_LIVER_HU), *HU_RANGES[SPLEEN])
    sigma = rng.uniform(*NOISE_SIGMA_HU) / SMOOTH_NOISE_GAIN
    hu = lut[labels]
    hu += rng.standard_normal(labels.shape, dtype=np.float32) * np.float32(sigma)
    # Smoothing correlates the noise and softens edges like a CT reconstruction kernel.
    for axis in (0, 1):
        ndimage.correlate1d(hu, SMOOTH_KERNEL, axis=axis, output=hu, mode="nearest")
    np.clip(hu, *HU_CLIP, out=hu)
    return np.rint(hu).astype(np.int16)
