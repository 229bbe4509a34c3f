"""Synthetic pelvic anatomy and its MR appearance: one weekly T2-like scan as (image, label, affine) arrays.

Geometry, as the real study's headers (DESIGN.md): every volume is stored in LPS order, (x, y, z) = (right->left,
anterior->posterior, inferior->superior), 256 x 256 x 128 voxels of about 1.68 x 1.68 x 1.56 mm (the spacing is
per scan, phantom.py draws it; about a 430 x 430 x 200 mm field of view); the affine maps it to RAS+ world mm
(`nib.aff2axcodes` gives L, P, S), and vol[:, j, :] is a coronal plane, as the real 2D slices are. Anatomy is
built from analytic shapes (phantom_shapes.py) whose signed depth in mm gives both the label (depth > 0) and a
partial-volume blend at the boundary; then a smooth multiplicative bias field and Rician noise are applied.
Intensities are T2-like raw units (fat ~800, urine ~1350, muscle ~300). phantom.py writes these volumes in the
real study's layouts.

The prostate is meant to stay hard: a tilted, tapered, lobulated gland (per-patient shape, pushed and indented by
the rectum from week to week) whose mottled transition zone and brighter peripheral zone overlap in intensity with
what surrounds it: periprostatic tissue with the same texture, a bright venous plexus, the levator ani, the bladder
neck, the urethral sphincter below the apex and the seminal vesicles above the base (all labelled body or bladder).
Its capsule shows on part of the surface only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from phantom_shapes import Canvas, Frame, capsule_depth, ellipsoid_depth, local_axes, noise_field, rotation, swept_depth

VOLUME_SHAPE = (256, 256, 128)  # x right->left, y anterior->posterior, z inferior->superior (LPS)
MEDIAN_SPACING = (1.68, 1.68, 1.56)  # mm along x, y, z: the real scans' median (public audit of all 211 headers)
BACKGROUND, BODY, BONE, BLADDER, RECTUM, PROSTATE = range(6)
# T2-weighted tissue means in raw MR units (before gain, bias and noise).
FAT, MUSCLE, URINE, WALL, MARROW, CORTEX, GAS = 800.0, 300.0, 1350.0, 310.0, 650.0, 60.0, 10.0


@dataclass(frozen=True)
class Gland:
    """Per-patient prostate shape (mm, degrees) and appearance (intensities as factors of the transition zone's)."""

    radii: tuple[float, float, float]  # half-axes: left-right, along the long axis (apex -> base), antero-posterior
    tilt: tuple[float, float, float]  # rotation (degrees) about x (long axis leans back towards the base), y, z
    taper: float  # the base is 1 + taper times wider than the middle, the apex 1 - taper
    asym: float  # left lobe (1 + asym) against right lobe (1 - asym)
    flat: float  # the posterior half is flatter by this factor
    harmonics: tuple[float, ...]  # mm: low-order bumps and dents of the surface
    median_lobe: float  # radius (mm) of a median lobe bulging into the bladder base, 0 for none
    t2: float  # transition zone mean
    pz: float  # peripheral zone / t2 (brighter)
    pz_mm: float  # peripheral zone thickness
    envelope: float  # periprostatic tissue / t2 (close to 1: a faint boundary)
    envelope_mm: float  # its mean thickness
    capsule: float  # noise level above which the dark capsule shows (higher: less of it)
    vesicle: float  # seminal vesicle fluid / t2
    vesicle_mm: float  # seminal vesicle half-length
    levator_mm: float  # gap between the gland's side and the levator ani
    neck_mm: float  # extra bladder-wall thickness at the bladder neck


@dataclass(frozen=True)
class PatientAnatomy:
    """Per-patient anatomy in mm, in a frame centred on the prostate (x left, y superior, z anterior)."""

    position: tuple[float, float, float]  # prostate centre (left, superior, anterior) in mm from the volume centre
    body_radii: tuple[float, float]  # trunk half-axes at the hips (left-right, antero-posterior)
    body_z: float  # trunk centre along z, relative to the prostate
    waist: float  # waist / hip ratio of the left-right half-axis
    fat: float  # subcutaneous fat thickness
    hip: float  # femoral head centre distance from the midline
    head_radius: float
    pelvis_scale: float
    gland: Gland
    bladder_radii: tuple[float, float, float]
    bladder_fill: float  # typical filling (volume factor)
    rectum_radius: float
    gain: float
    lump_seed: int


def _make_gland(u) -> Gland:
    """Sizes from ~20 to ~80 ml (median ~40 ml over 150 volumes); `u(lo, hi)` draws a uniform float."""
    width = u(22, 31)
    t2 = u(330, 420)
    return Gland(
        radii=(width, width * u(0.72, 1.02), width * u(0.6, 0.82)), tilt=(-u(5, 35), u(-8, 8), u(-8, 8)),
        taper=u(0.08, 0.3), asym=u(-0.12, 0.12), flat=u(1.1, 1.45), harmonics=tuple(u(-2.5, 2.5) for _ in range(7)),
        median_lobe=max(0.0, u(-12, 12)), t2=t2, pz=u(1.25, 1.75), pz_mm=u(4, 11), envelope=u(0.95, 1.12),
        envelope_mm=u(1, 8), capsule=u(-0.4, 0.8), vesicle=u(1.2, 1.8), vesicle_mm=u(11, 18), levator_mm=u(1, 7),
        neck_mm=u(3, 7))


def make_patient(rng: np.random.Generator) -> PatientAnatomy:
    """Draw one patient's anatomy; all values are plain floats (keeps the volume maths in float32)."""
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    return PatientAnatomy(
        position=(u(-5, 5), u(-18, -6), u(4, 16)), body_radii=(u(172, 198), u(118, 136)), body_z=u(-12, -4),
        waist=u(0.82, 0.95), fat=u(10, 32), hip=u(84, 96), head_radius=u(21, 25), pelvis_scale=u(0.94, 1.06),
        gland=_make_gland(u), bladder_radii=(u(40, 50), u(28, 36), u(30, 38)), bladder_fill=u(0.6, 1.2),
        rectum_radius=u(12, 16), gain=u(0.85, 1.15), lump_seed=int(rng.integers(2**31)))


# ---------------------------------------------------------------- anatomy


def _paint_body(cv: Canvas, pa: PatientAnatomy) -> None:
    """Trunk narrowing to the waist and closing at the buttocks, two thighs; fat layer, muscle with fat septa."""
    f, (a, c) = cv.frame, pa.body_radii
    knots = [-135, -118, -95, -60, 30, 120, 260]
    rx = [0, 0.5 * a, 0.82 * a, a, a, pa.waist * a, pa.waist * a]
    rz = [0, 0.55 * c, 0.88 * c, c, c, 0.95 * c, 0.9 * c]
    depth = swept_depth(f, (slice(None),) * 3, knots, [0] * 7, [pa.body_z] * 7, rx, rz)
    r = 0.47 * a
    for side in (-1, 1):
        xs = [side * (0.5 * a - 14), side * (0.5 * a - 4), side * 0.5 * a, side * 0.5 * a]
        box = f.box((min(0, side * a * 1.1), -260, -c), (max(0, side * a * 1.1), -49, c))
        if box:
            thigh = swept_depth(f, box, [-260, -120, -50, -49], xs, [12] * 4, [0.82 * r, r, r, 0],
                                [0.8 * r, 0.95 * r, r, 0])
            np.maximum(depth[box], thigh, out=depth[box])
    depth += _skin_lumps(f, pa.lump_seed) + 0.6 * cv.tex
    posterior = 1 + 0.6 * np.clip((pa.body_z - f.Zr) / c, 0, 1)  # thicker fat over the buttocks
    fat_depth = pa.fat * posterior * (1 + 0.25 * cv.coarse + 0.08 * cv.tex) - depth
    muscle = MUSCLE * (1 + 0.08 * cv.tex)
    septa = 0.8 * np.exp(-(((cv.coarse - 0.6) / 0.06) ** 2))  # fat planes between muscles: a level set
    fat_share = np.maximum(np.clip(0.5 + fat_depth / 2.5, 0, 1), septa)
    cv.paint((slice(None),) * 3, depth, muscle + fat_share * (FAT * (1 + 0.04 * cv.tex) - muscle), BODY, soft=1.5)


def _skin_lumps(f: Frame, seed: int) -> np.ndarray:
    """A few broad bumps (mm) of the skin surface, fixed per patient in anatomical coordinates."""
    rng = np.random.default_rng(seed)
    lumps = 0
    for _ in range(3):
        wx, wy, wz = 2 * np.pi / rng.uniform(60, 160, 3)
        px, py = rng.uniform(0, 2 * np.pi, 2)
        lumps = lumps + float(rng.uniform(1.5, 3.5)) * (np.sin(wx * f.Xr + px) * np.cos(wy * f.Yr + wz * f.Zr + py))
    return lumps.astype(np.float32)


def _bone_primitives(pa: PatientAnatomy) -> list[tuple]:
    """Pelvic bones and proximal femurs as (kind, parameters...) in the prostate-centred frame (mm)."""
    s, h, rh = pa.pelvis_scale, pa.hip, pa.head_radius
    prims: list[tuple] = [("swept", [-16, 0, 20, 45, 70, 95, 120, 122], [0] * 8,  # sacrum and coccyx, concave forwards
                           [-40, -50, -60, -70, -73, -65, -48, -48], [0, 10, 20, 32, 42, 52, 60, 0],
                           [0, 6, 9, 12, 15, 19, 23, 0]),
                          ("ell", (0, 150, -38), (26, 14, 20), None), ("ell", (0, 182, -34), (25, 14, 19), None)]
    for side in (-1, 1):
        def p(x, y, z, side=side):
            return (side * x * s, y * s, z * s)

        head = p(h, 22, 2)
        prims += [
            ("ell", head, (rh, rh, rh), None),
            ("cup", head, rh + 1.6, rh + 13, side),
            ("cap", head, p(h + 34, 6, -6), 14, 15),  # femoral neck
            ("ell", p(h + 40, 10, -10), (15, 22, 18), None),  # greater trochanter
            ("cap", p(h + 34, 0, -6), p(h + 16, -220, 10), 15, 13),  # femoral shaft
            ("ell", p(h + 16, -32, -14), (9, 10, 9), None),  # lesser trochanter
            ("cap", p(h - 6, 36, -10), p(h + 4, 84, -36), 20, 16),  # iliac body
            ("ell", p(h + 22, 104, -34), (7, 42, 60), rotation(1, side * 30) @ rotation(2, -side * 25)),  # wing
            ("cap", p(h - 20, 14, 20), p(15, 2, 44), 11, 10),  # superior pubic ramus
            ("ell", p(13, -8, 46), (11.5, 21, 12), None),  # pubic body at the symphysis
            ("cap", p(14, -24, 40), p(56, -46, -22), 9, 8),  # inferior pubic and ischial ramus
            ("cap", p(h - 14, 12, -20), p(58, -40, -30), 16, 14),  # ischium
        ]
    return prims


def _primitive(frame: Frame, prim: tuple):
    """(box, depth) of one primitive over its bounding box, or None when it is outside the volume."""
    kind, *p = prim
    if kind == "ell":
        centre, radii, rot = p
        ext = max(radii) + 2
        box = frame.box(np.subtract(centre, ext), np.add(centre, ext))
        return box and (box, ellipsoid_depth(*frame.at(box), centre, radii, rot))
    if kind == "cap":
        a, b, ra, rb = p
        ext = max(ra, rb) + 2
        box = frame.box(np.minimum(a, b) - ext, np.maximum(a, b) + ext)
        return box and (box, capsule_depth(*frame.at(box), a, b, ra, rb))
    if kind == "cup":  # acetabulum: a shell around the femoral head, open laterally
        centre, r_in, r_out, side = p
        box = frame.box(np.subtract(centre, r_out + 2), np.add(centre, r_out + 2))
        if not box:
            return None
        X, Y, Z = frame.at(box)
        dist = np.sqrt((X - centre[0]) ** 2 + (Y - centre[1]) ** 2 + (Z - centre[2]) ** 2)
        medial = side * centre[0] + 8 - side * X
        return box, np.minimum(np.minimum(r_out - dist, dist - r_in), medial)
    knots, xc, zc, rx, rz = p
    ext = max(max(rx), max(rz)) + 2
    box = frame.box((min(xc) - ext, knots[0] - 2, min(zc) - ext), (max(xc) + ext, knots[-1] + 2, max(zc) + ext))
    return box and (box, swept_depth(frame, box, knots, xc, zc, rx, rz))


def _paint_bones(cv: Canvas, pa: PatientAnatomy) -> None:
    """Union of the bone primitives: dark cortex 2 mm thick around fatty marrow; the label covers the whole bone."""
    depth = np.full(cv.image.shape, -10, np.float32)
    for prim in _bone_primitives(pa):
        found = _primitive(cv.frame, prim)
        if found:
            np.maximum(depth[found[0]], found[1], out=depth[found[0]])
    near = np.nonzero(depth > -1)
    d, tex = depth[near], cv.tex[near]
    marrow = MARROW * (1 + 0.15 * tex)
    value = CORTEX + (marrow - CORTEX) * np.clip((d - 2.0) / 1.5, 0, 1)
    alpha = np.clip(0.5 + d / 1.2, 0, 1)
    cv.image[near] += alpha * (value - cv.image[near])
    cv.label[tuple(i[d > 0] for i in near)] = BONE


def _paint_bowel(cv: Canvas, pa: PatientAnatomy) -> None:
    """Abdominal cavity above the bladder: bowel loops of fluid, wall and gas (label body)."""
    a, c = pa.body_radii
    knots, zc = [70, 110, 300], [22, 24, 26]
    rx, rz = [0, pa.waist * a - 40, pa.waist * a - 30], [0, c - 55, c - 45]
    box = cv.frame.box((-a, 60, -c), (a, 300, c))
    if box:
        depth = swept_depth(cv.frame, box, knots, [0] * 3, zc, rx, rz) + 4 * cv.coarse[box]
        t = cv.tex[box]
        bowel = np.where(t < -2.2, GAS, 520 + 260 * np.tanh(1.5 * t + 0.8 * cv.coarse[box]))
        cv.paint(box, depth, bowel, soft=3.0)


def _paint_pelvic_fat(cv: Canvas, pa: PatientAnatomy) -> None:
    """Fat around the pelvic organs and in the ischio-anal fossae (bright on T2, label body)."""
    s = pa.pelvis_scale
    for centre, radii in [((0, 18, -6), (44 * s, 70, 46)), ((-30 * s, -32, -26), (20, 30, 24)),
                          ((30 * s, -32, -26), (20, 30, 24))]:
        box = cv.frame.box(np.subtract(centre, radii), np.add(centre, radii))
        if box:
            depth = ellipsoid_depth(*cv.frame.at(box), centre, radii) + 3 * cv.tex[box]
            cv.paint(box, depth, FAT * (0.95 + 0.05 * cv.tex[box]), soft=3.0)


@dataclass(frozen=True)
class WeekState:
    """What changes from one weekly scan to the next: pose, deformation, organ filling, gas, scanner gain."""

    position: tuple[float, float, float]
    pitch: float  # radians, rotation about the left-right axis
    disp: tuple  # displacement amplitudes (mm), wave numbers (1/mm), phases
    bias: tuple[float, ...]  # log-bias gradients left, superior, anterior; brightening to the edges, superior fall-off
    bladder: float  # volume factor
    rectum: float  # radius factor; a fuller rectum pushes the gland forwards and presses into its back
    gas: tuple[float, float] | None  # (centre y, half-length) of a gas pocket in the rectum, mm
    prostate_shift: tuple[float, float, float]
    prostate_scale: float
    tilt: float  # degrees added to the gland's sagittal tilt
    gap: float  # mm of fascia between the rectal wall and the gland
    gain: float
    noise: float  # Rician sigma in raw units


def _draw_week(pa: PatientAnatomy, week: int, rng: np.random.Generator) -> WeekState:
    """A fixed number of draws whatever the outcome, so every later draw is reproducible."""
    n, u = rng.normal(size=16), rng.uniform(size=16)
    return WeekState(
        position=tuple(float(p + 2.5 * d) for p, d in zip(pa.position, n[:3])), pitch=float(np.radians(1.5) * n[3]),
        disp=(tuple(1.0 + 2.0 * u[:3]), tuple(2 * np.pi / (120 + 130 * u[3:5])), tuple(2 * np.pi * u[5:8])),
        bias=tuple(float(v) for v in (*(0.12 * n[11:14]), 0.2 + 0.25 * u[12], 0.1 + 0.2 * u[13])),
        bladder=float(np.clip(pa.bladder_fill * np.exp(0.35 * n[4]), 0.35, 1.8)), rectum=float(0.8 + 0.55 * u[8]),
        gas=(float(-5 + 65 * u[9]), float(8 + 17 * u[10])) if u[11] < 0.5 else None,
        prostate_shift=tuple(float(v) for v in 1.5 * n[5:8]), prostate_scale=float(1 - 0.01 * week * abs(n[8])),
        tilt=float(3 * n[14]), gap=float(0.3 + 2.5 * u[14]), gain=float(pa.gain * (1 + 0.05 * n[9])),
        noise=float(15 + 2 * n[10]))


def _gland_pose(pa: PatientAnatomy, ws: WeekState) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """This week's gland: centre (3,) mm, rotation (3, 3) from frame to gland axes (left-right, apex -> base,
    back -> front), radii (mm). A fuller rectum pushes it forwards and up."""
    g = pa.gland
    push = 0.3 * (ws.rectum - 1) * pa.rectum_radius
    centre = np.add(ws.prostate_shift, (0.0, 0.4 * push, push))
    rot = rotation(0, g.tilt[0] + ws.tilt) @ rotation(1, g.tilt[1]) @ rotation(2, g.tilt[2])
    return centre, rot, tuple(r * ws.prostate_scale for r in g.radii)


def _from_gland(pose, point) -> tuple[float, float, float]:
    """A point in gland axes (mm) -> frame coordinates (mm)."""
    return tuple(float(v) for v in pose[0] + pose[1].T @ np.asarray(point, dtype=float))


def _gland_box(frame: Frame, pose, margin: float):
    """Voxel box holding the gland (whatever its tilt, taper and bumps) and `margin` mm around it, or None."""
    ext = 1.35 * max(pose[2]) + margin
    return frame.box(np.subtract(pose[0], ext), np.add(pose[0], ext))


def _gland_depth(lx, ly, lz, g: Gland, radii, tex):
    """Signed depth (mm) of the gland from gland-axis coordinates, with its normalised height uy (-1 apex .. 1 base)
    and antero-posterior position nz (-1 back .. 1 front). Ellipsoid tapering to the apex, flattened at the back,
    lobes of unequal size, low-order bumps and dents, small irregularities from the texture; maybe a median lobe."""
    rx, ry, rz = radii
    uy = np.clip(ly / ry, -1, 1)
    sx = rx * (1 + g.taper * uy) * np.where(lx > 0, np.float32(1 + g.asym), np.float32(1 - g.asym))
    sz = rz * (1 + 0.5 * g.taper * uy) / np.where(lz < 0, np.float32(g.flat), np.float32(1))
    nx, ny, nz = lx / sx, ly / ry, lz / sz
    q = np.sqrt(nx**2 + ny**2 + nz**2) + 1e-6
    depth = (1 - q) * q / (np.sqrt((nx / sx) ** 2 + (ny / ry) ** 2 + (nz / sz) ** 2) + 1e-6)
    ex, ey, ez, h = nx / q, ny / q, nz / q, g.harmonics
    depth += (h[0] * ex * ey + h[1] * ey * ez + h[2] * ex * ez + h[3] * (ex * ex - ez * ez) + h[4] * (ey * ey - 0.33)
              + 3 * h[5] * ex * ey * ez + h[6] * ez * (ex * ex - ey * ey) + 0.7 * tex)
    if g.median_lobe > 0:  # benign hyperplasia of the middle lobe, bulging up into the bladder
        m = g.median_lobe
        depth = np.maximum(depth, ellipsoid_depth(lx, ly, lz, (0, 0.85 * ry, 0.1 * rz), (1.1 * m, m, m)))
    return depth, uy, nz


def _rectum_shape(pa: PatientAnatomy, ws: WeekState, pose) -> tuple[list, ...]:
    """(knots, xc, zc, rx, rz) of the rectum for swept_depth: it follows the sacrum, its front wall `ws.gap` mm
    behind the gland's back, and a fuller rectum presses a few mm into the gland (which is cut back to make room)."""
    r = pa.rectum_radius * ws.rectum
    press = 1 + 5 * (ws.rectum - 0.8) / 0.55
    z0 = float(pose[0][2]) - (pose[2][2] / pa.gland.flat + ws.gap + 0.85 * r) + press
    knots, xc = [-80, -62, -32, 0, 40, 80, 108, 112], [0, 0, 0, 0, 3, -3, 0, 0]
    zc = [-70, -62, -42, z0, z0 - 8, -40, -32, -32]
    rx, rz = [0, 5, 9, 1.25 * r, 1.4 * r, 1.15 * r, 0.9 * r, 0], [0, 4, 7, 0.85 * r, r, 0.9 * r, 0.75 * r, 0]
    return knots, xc, zc, rx, rz


def _paint_rectum(cv: Canvas, pa: PatientAnatomy, ws: WeekState) -> None:
    """Rectum behind the prostate, following the sacrum: intermediate wall, mottled faeces, sometimes gas."""
    knots, xc, zc, rx, rz = shape = _rectum_shape(pa, ws, _gland_pose(pa, ws))
    r = pa.rectum_radius * ws.rectum
    box = cv.frame.box((-2 * r, -82, -75), (2 * r, 114, zc[3] + r + 4))
    if box is None:
        return
    X, Y, Z = cv.frame.at(box)
    depth, tex = swept_depth(cv.frame, box, *shape), cv.tex[box]
    content = 420 * (1 + 0.3 * tex)
    cv.paint(box, depth, content + (WALL * (1 + 0.08 * tex) - content) * np.clip((3.2 - depth) / 1.2, 0, 1), RECTUM)
    if ws.gas is not None:  # the patient lies supine: gas rises to the anterior side of the lumen
        yg, half = ws.gas
        zg, rzg = float(np.interp(yg, knots, zc)), float(np.interp(yg, knots, rz))
        gas = ellipsoid_depth(X, Y, Z, (0, yg, zg + 0.5 * rzg), (0.9 * np.interp(yg, knots, rx), half, 0.6 * rzg))
        cv.paint(box, np.minimum(gas, depth - 2.5), GAS, soft=1.0)


def _paint_bladder(cv: Canvas, pa: PatientAnatomy, ws: WeekState) -> None:
    """Urine-filled bladder resting on the gland's base; it grows upwards and forwards as it fills. Thin dark wall,
    thicker at the bladder neck, where it has about the gland's intensity."""
    pose = _gland_pose(pa, ws)
    ry, t2 = pose[2][1], pa.gland.t2
    neck = _from_gland(pose, (0, ry, 0))
    radii = tuple(r * ws.bladder ** (1 / 3) for r in pa.bladder_radii)
    centre = (neck[0], neck[1] - 0.25 * ry + 0.85 * radii[1], 0.5 * (neck[2] + pose[0][2]) + 4 + 0.3 * radii[2])
    box = cv.frame.box(np.subtract(centre, radii) - 3, np.add(centre, radii) + 3)
    if box is None:
        return
    (X, Y, Z), tex = cv.frame.at(box), cv.tex[box]
    depth = ellipsoid_depth(X, Y, Z, centre, radii) + 1.5 * tex
    near = np.exp(((X - neck[0]) ** 2 + (Y - neck[1]) ** 2 + (Z - neck[2]) ** 2) / np.float32(-2 * 15.0**2))
    wall = WALL + (0.95 * t2 * (1 + 0.08 * tex) - WALL) * near
    urine = URINE * (1 + 0.02 * tex)
    cv.paint(box, depth, urine + (wall - urine) * np.clip((3.0 + pa.gland.neck_mm * near - depth), 0, 1), BLADDER)


def _paint_vesicles(cv: Canvas, pa: PatientAnatomy, ws: WeekState) -> None:
    """Seminal vesicles (label body): coiled fluid-filled lobes above and behind the gland's base, running up and
    out from the midline where they meet the gland; about as bright as the peripheral zone."""
    pose = _gland_pose(pa, ws)
    g, (rx, ry, rz) = pa.gland, pose[2]
    for side in (-1, 1):
        centre = _from_gland(pose, (side * (0.25 * rx + 0.7 * g.vesicle_mm), ry + 3, -0.55 * rz))
        box = cv.frame.box(np.subtract(centre, g.vesicle_mm + 4), np.add(centre, g.vesicle_mm + 4))
        if box is None:
            continue
        tex, rot = cv.tex[box], rotation(2, side * 28) @ pose[1]
        depth = ellipsoid_depth(*cv.frame.at(box), centre, (g.vesicle_mm, 6.5, 5.5), rot) + 1.2 * tex
        coils = np.sin(3.0 * tex + 2.0 * cv.mid[box])  # fluid in the coils, darker walls between them
        cv.paint(box, depth, g.t2 * g.vesicle * (1 + 0.22 * coils), soft=2.0)


def _paint_periprostatic(cv: Canvas, pa: PatientAnatomy, ws: WeekState) -> None:
    """Around the gland (label body, painted before it): an envelope of uneven thickness with about the gland's
    intensity and the same texture, a bright venous plexus at the sides and front, the urethral sphincter under the
    apex (a ring of muscle round the urethra, continuing the apex with a similar look)."""
    pose = _gland_pose(pa, ws)
    g, ry = pa.gland, pose[2][1]
    box = _gland_box(cv.frame, pose, 16)
    if box is None:
        return
    tex, mid, body = cv.tex[box], cv.mid[box], cv.label[box] == BODY
    depth, _, nz = _gland_depth(*local_axes(*cv.frame.at(box), *pose[:2]), g, pose[2], tex)
    envelope = depth + g.envelope_mm * (1 + 0.9 * cv.coarse[box]) + 2 * tex
    cv.paint(box, envelope, g.t2 * g.envelope * (1 + 0.1 * tex + 0.08 * np.tanh(2 * mid)), soft=4.0, where=body)
    # Veins: a thin level set of the noise (winding channels in a slice), within 12 mm of the gland, not behind it.
    veins = np.exp(-(((0.7 * mid + 0.3 * tex) - 0.9) / 0.2) ** 2) * np.clip((depth + 12) / 3, 0, 1)
    veins *= np.clip(1 - depth, 0, 1) * np.clip(nz + 0.6, 0, 1) * body
    cv.blend(box, np.minimum(veins, 0.9), g.t2 * g.pz * 1.2)
    top = _from_gland(pose, (0, -0.8 * ry, 0))
    bottom = (top[0], top[1] - 30, top[2] + 4)
    box = cv.frame.box(np.minimum(top, bottom) - 9, np.maximum(top, bottom) + 9)
    if box is None:
        return
    depth, tex = capsule_depth(*cv.frame.at(box), top, bottom, 7.5, 5.5), cv.tex[box]
    lumen = np.clip((depth - 2.5) / 2, 0, 1)
    cv.paint(box, depth, g.t2 * (0.9 + 0.4 * lumen) * (1 + 0.08 * tex), soft=2.0, where=cv.label[box] == BODY)


def _paint_levator(cv: Canvas, pa: PatientAnatomy, ws: WeekState) -> None:
    """Levator ani (label body): a funnel of muscle round the gland and rectum, open in front, passing
    `levator_mm` from the gland's sides and narrowing below the apex."""
    pose = _gland_pose(pa, ws)
    g, (cx, cy, cz), (rx, ry, rz) = pa.gland, (float(v) for v in pose[0]), pose[2]
    side = rx * (1 + abs(g.asym)) + g.levator_mm + 3
    knots = [cy - ry - 30, cy - ry, cy, cy + ry, cy + ry + 25]
    zc = [cz - 25, cz - 20, cz - 15, cz - 20, cz - 30]
    rxs, rzs = [9, 0.8 * side, side, side + 8, side + 22], [14, 28, rz + 22, rz + 26, rz + 30]
    box = cv.frame.box((cx - side - 30, knots[0], cz - 75), (cx + side + 30, knots[-1], cz + 0.3 * rz))
    if box is None:
        return
    sd, tex = swept_depth(cv.frame, box, knots, [cx] * 5, zc, rxs, rzs), cv.tex[box]
    where = (cv.label[box] == BODY) & (cv.frame.Z[box] < cz + 0.2 * rz)
    cv.paint(box, 2.5 + 0.8 * tex - np.abs(sd), MUSCLE * (1 + 0.08 * tex), soft=1.5, where=where)


def _gland_t2(g: Gland, depth, uy, nz, lx, rx, tex, mid, coarse) -> np.ndarray:
    """Intensity inside the gland: mottled transition zone (nodules), brighter peripheral zone at the back and all
    round the apex with darker patches, dark central zone at the back of the base, dark anterior stroma, and a dark
    capsule where the coarse noise exceeds g.capsule."""
    value = g.t2 * (1 + 0.15 * np.tanh(2.0 * mid + 0.8 * tex) + 0.05 * tex)
    back = np.clip((0.3 - nz + 1.2 * np.clip(-uy - 0.3, 0, 1)) / 0.4, 0, 1) * np.clip(1.4 - uy, 0, 1)
    pz = back * np.clip((g.pz_mm * (1 + 0.4 * coarse) - depth) / 2.5, 0, 1) * np.clip(1.8 - 1.2 * mid, 0.1, 1)
    value += pz * (g.t2 * g.pz * (1 + 0.08 * tex) - value)
    central = np.clip((uy - 0.3) / 0.3, 0, 1) * np.clip((0.1 - nz) / 0.3, 0, 1)
    central *= np.clip(1.5 - 2.5 * abs(lx) / rx, 0, 1)
    stroma = np.clip((nz - 0.5) / 0.25, 0, 1) * np.clip((6 - depth) / 3, 0, 1)
    value += np.maximum(central, stroma) * (0.8 * g.t2 - value)
    capsule = np.exp(-(((depth - 0.7) / 0.6) ** 2)) * np.clip(2 * (coarse - g.capsule), 0, 1)
    return value * (1 - 0.3 * capsule)


def _paint_prostate(cv: Canvas, pa: PatientAnatomy, ws: WeekState) -> None:
    """The gland (label prostate), cut back where the rectum presses on it; soft partial-volume edge."""
    pose = _gland_pose(pa, ws)
    box = _gland_box(cv.frame, pose, 3)
    if box is None:
        return
    tex, (lx, ly, lz) = cv.tex[box], local_axes(*cv.frame.at(box), *pose[:2])
    depth, uy, nz = _gland_depth(lx, ly, lz, pa.gland, pose[2], tex)
    depth = np.minimum(depth, -swept_depth(cv.frame, box, *_rectum_shape(pa, ws, pose)) - ws.gap)
    value = _gland_t2(pa.gland, depth, uy, nz, lx, pose[2][0], tex, cv.mid[box], cv.coarse[box])
    cv.paint(box, depth, value, PROSTATE, soft=3.0)


def _acquire(cv: Canvas, ws: WeekState, rng: np.random.Generator) -> np.ndarray:
    """Scanner gain, smooth multiplicative bias (brighter near the coils) and Rician noise -> float32 image."""
    x, y, z = (a / 200 for a in cv.frame.axes)  # stored axes: left, posterior, superior
    g_left, g_superior, g_anterior, edges, fall = ws.bias
    # In the axial plane (x, y) it brightens towards the surface coils; along z (superior) it falls off.
    bias_xy = np.exp(g_left * x[:, None] - g_anterior * y[None] + edges * (x[:, None] ** 2 + (1.25 * y[None]) ** 2))
    bias_z = ws.gain * np.exp(g_superior * z - fall * z**2)
    signal = cv.image * bias_xy[:, :, None].astype(np.float32) * bias_z[None, None, :].astype(np.float32)
    noise = rng.standard_normal((2, *signal.shape), dtype=np.float32) * ws.noise
    return np.hypot(signal + noise[0], noise[1])


def scaled_spacing(spacing, shape=VOLUME_SHAPE) -> tuple[float, float, float]:
    """Voxel size (mm) of a `shape` volume with the field of view of a VOLUME_SHAPE one of `spacing`:
    (1.68, 1.68, 1.56) at (64, 64, 32) -> (6.72, 6.72, 6.24). Tests use it for small, coarse volumes."""
    return tuple(float(s * n0 / n) for s, n0, n in zip(spacing, VOLUME_SHAPE, shape))


def volume_affine(shape, spacing, rows: tuple[int, int] | None = None) -> np.ndarray:
    """RAS+ affine (mm) of a volume stored in LPS order (x right->left, y anterior->posterior, z inferior->superior),
    so `nib.aff2axcodes` gives ("L", "P", "S"); with `rows`, the affine of the sub-volume vol[:, rows[0]:rows[1], :]."""
    sx, sy, sz = spacing
    lin = np.diag([-sx, -sy, sz]).astype(np.float64)
    origin = -lin @ ((np.asarray(shape) - 1) / 2) + np.array([2.0, 18.0, -35.0])  # a table/isocentre offset
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = lin, origin + lin[:, 1] * (rows[0] if rows else 0)
    return affine


def make_volume(anatomy: PatientAnatomy, week: int, seed: int, shape=VOLUME_SHAPE, spacing=None,
                rows: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One weekly scan -> image float32 (x, y, z) raw MR units, label uint8 (x, y, z) 0..5, affine (4, 4) mm;
    the arrays in LPS order (x right->left, y anterior->posterior, z inferior->superior), as the real files.

    `spacing` (mm along x, y, z) defaults to MEDIAN_SPACING; `rows` = (start, stop) builds only
    vol[:, start:stop, :] (a band of coronal slices; the affine is shifted to match). Deterministic in
    (anatomy, week, seed, ...).
    """
    spacing = tuple(spacing or MEDIAN_SPACING)
    rows = rows or (0, shape[1])
    rng = np.random.default_rng(seed)
    ws = _draw_week(anatomy, week, rng)
    size = (shape[0], rows[1] - rows[0], shape[2])
    tex, coarse, mid = (noise_field(rng, shape, rows, levels) for levels in (1, 3, 2))
    image, label = np.empty(size, np.float32), np.empty(size, np.uint8)
    # Slabs of 16 x-rows keep every temporary array small: cache-friendly, and no page faults from huge arrays.
    for start in range(0, shape[0], 16):
        slab = slice(start, min(start + 16, shape[0]))
        frame = Frame(shape, spacing, ((slab.start, slab.stop), rows, (0, shape[2])), ws.position, ws.pitch, ws.disp,
                      max(ws.disp[0]))
        cv = Canvas(frame, tex[slab], coarse[slab], mid[slab])
        _paint_body(cv, anatomy)
        _paint_pelvic_fat(cv, anatomy)
        _paint_bowel(cv, anatomy)
        for paint in (_paint_vesicles, _paint_rectum, _paint_bladder, _paint_periprostatic, _paint_levator,
                      _paint_prostate):
            paint(cv, anatomy, ws)
        _paint_bones(cv, anatomy)
        image[slab], label[slab] = _acquire(cv, ws, rng), cv.label
    return image, label, volume_affine(shape, spacing, rows)
