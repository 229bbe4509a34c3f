"""Synthetic pelvic anatomy and its MR appearance: one weekly T2-like scan as (image, label, affine) arrays.

Geometry: every volume is a coronal-style acquisition stored as (x, y, z) = (right->left, inferior->superior,
posterior->anterior), 256 x 256 x 128 voxels of 1.5625 x 1.5625 x 2.5 mm (a 400 x 400 x 320 mm field of view);
the affine maps it to RAS+ world mm (axis codes L, S, A). Anatomy is built from analytic shapes (ellipsoids,
capsules, swept ellipses) whose signed depth in mm gives both the label (depth > 0) and a partial-volume blend
at the boundary; then a smooth multiplicative bias field and Rician noise are applied. Intensities are T2-like
raw units (fat ~800, urine ~1350, muscle ~300). phantom.py writes these volumes in the real study's layouts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

VOLUME_SHAPE = (256, 256, 128)
FIELD_OF_VIEW = (400.0, 400.0, 320.0)  # mm along x, y, z of a 256x256x128 volume: 1.5625 x 1.5625 x 2.5 mm voxels
BACKGROUND, BODY, BONE, BLADDER, RECTUM, PROSTATE = range(6)
# T2-weighted tissue means in raw MR units (before gain, bias and noise).
FAT, MUSCLE, URINE, WALL, MARROW, CORTEX, GAS, VESICLE = 800.0, 300.0, 1350.0, 310.0, 650.0, 60.0, 10.0, 880.0


@dataclass(frozen=True)
class PatientAnatomy:
    """Per-patient anatomy in mm, in a frame centred on the prostate (x left, y superior, z anterior)."""

    position: tuple[float, float, float]  # prostate centre in volume mm, relative to the volume centre
    body_radii: tuple[float, float]  # trunk half-axes at the hips (left-right, antero-posterior)
    body_z: float  # trunk centre along z, relative to the prostate
    waist: float  # waist / hip ratio of the left-right half-axis
    fat: float  # subcutaneous fat thickness
    hip: float  # femoral head centre distance from the midline
    head_radius: float
    pelvis_scale: float
    prostate_radii: tuple[float, float, float]
    bladder_radii: tuple[float, float, float]
    bladder_fill: float  # typical filling (volume factor)
    rectum_radius: float
    prostate_t2: float  # transition-zone intensity; the shell around the prostate is close to it
    shell_t2: float
    gain: float
    lump_seed: int


def make_patient(rng: np.random.Generator) -> PatientAnatomy:
    """Draw one patient's anatomy; all values are plain floats (keeps the volume maths in float32)."""
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    prostate_t2 = u(420, 500)
    return PatientAnatomy(
        position=(u(-5, 5), u(-18, -6), u(4, 16)), body_radii=(u(158, 182), u(100, 118)), body_z=u(-12, -4),
        waist=u(0.82, 0.95), fat=u(10, 32), hip=u(84, 96), head_radius=u(21, 25), pelvis_scale=u(0.94, 1.06),
        prostate_radii=(u(25, 32), u(20, 28), u(16, 22)), bladder_radii=(u(40, 50), u(28, 36), u(30, 38)),
        bladder_fill=u(0.6, 1.2), rectum_radius=u(12, 16), prostate_t2=prostate_t2,
        shell_t2=prostate_t2 * u(0.98, 1.15), gain=u(0.85, 1.15), lump_seed=int(rng.integers(2**31)))


# ---------------------------------------------------------------- coordinates and primitives


class Frame:
    """Deformed anatomical coordinates (X, Y, Z) in mm for the voxels of a window ((start, stop) per axis)
    of a volume. Anatomical = pitch rotation of (volume mm - prostate position) + a smooth displacement."""

    def __init__(self, shape, spacing, window, position, pitch, disp, dmax):
        self.axes = [((np.arange(n, dtype=np.float32) - (n - 1) / 2) * s)[a:b]
                     for n, s, (a, b) in zip(shape, spacing, window)]
        self.position, self.c, self.s, self.dmax = np.asarray(position), np.cos(pitch), np.sin(pitch), dmax
        x, y, z = (a - p for a, p in zip(self.axes, position))
        # Undisplaced anatomical x (nx, 1, 1) and rotated y, z (1, ny, nz): cheap stand-ins for slowly varying profiles.
        self.Xr = x[:, None, None]
        self.Yr = (self.c * y[:, None] - self.s * z[None, :])[None].astype(np.float32)
        self.Zr = (self.s * y[:, None] + self.c * z[None, :])[None].astype(np.float32)
        dx, dy, dz = _displacement(x, y, z, disp)
        self.X = self.Xr + dx[None]
        self.Y = self.Yr + dy[:, None, :]
        self.Z = self.Zr + dz[:, :, None]

    def box(self, lo, hi) -> tuple[slice, slice, slice] | None:
        """Voxel index ranges that hold the anatomical box [lo, hi] (mm), or None when it is outside."""
        corners = np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(3, -1)
        vy = self.c * corners[1] + self.s * corners[2]
        vz = -self.s * corners[1] + self.c * corners[2]
        vol = np.stack([corners[0], vy, vz]) + self.position[:, None]
        pad = self.dmax + 3.0
        box = []
        for axis, (a, b) in zip(self.axes, zip(vol.min(1) - pad, vol.max(1) + pad)):
            i, j = np.searchsorted(axis, a), np.searchsorted(axis, b)
            if i >= j:
                return None
            box.append(slice(int(i), int(j)))
        return tuple(box)

    def at(self, box):
        return self.X[box], self.Y[box], self.Z[box]


def _displacement(x, y, z, disp):
    """Smooth displacement (mm): each component varies over the two other axes, so it costs 2D arrays only."""
    (ax, ay, az), (w1, w2), (p1, p2, p3) = disp
    dx = ax * np.sin(w1 * y[:, None] + p1) * np.cos(w2 * z[None, :] + p2)
    dy = ay * np.sin(w2 * x[:, None] + p2) * np.cos(w1 * z[None, :] + p3)
    dz = az * np.sin(w1 * x[:, None] + p3) * np.cos(w2 * y[None, :] + p1)
    return dx.astype(np.float32), dy.astype(np.float32), dz.astype(np.float32)


def ellipsoid_depth(X, Y, Z, centre, radii, rot=None) -> np.ndarray:
    """Signed depth (mm, > 0 inside) of an ellipsoid; exact for spheres, first-order elsewhere."""
    centre, radii = [float(c) for c in centre], [float(r) for r in radii]  # python floats keep arrays float32
    u = [X - centre[0], Y - centre[1], Z - centre[2]]
    if rot is not None:
        rot = np.asarray(rot, dtype=float).tolist()
        u = [rot[i][0] * u[0] + rot[i][1] * u[1] + rot[i][2] * u[2] for i in range(3)]
    q = sum((ui / r) ** 2 for ui, r in zip(u, radii))
    g = np.sqrt(sum((ui / r**2) ** 2 for ui, r in zip(u, radii))) + 1e-6
    sq = np.sqrt(q)
    return (1 - sq) * sq / g


def capsule_depth(X, Y, Z, a, b, ra, rb) -> np.ndarray:
    """Signed depth (mm) of a tapered capsule from point a (radius ra) to point b (radius rb)."""
    a, d = [float(v) for v in a], [float(bi) - float(ai) for ai, bi in zip(a, b)]
    u = [X - a[0], Y - a[1], Z - a[2]]
    t = np.clip((u[0] * d[0] + u[1] * d[1] + u[2] * d[2]) / sum(di * di for di in d), 0, 1)
    dist = np.sqrt(sum((ui - t * di) ** 2 for ui, di in zip(u, d)))
    return ra + t * (rb - ra) - dist


def swept_depth(frame: Frame, box, knots, xc, zc, rx, rz) -> np.ndarray:
    """Depth of an ellipse swept along y; centre (xc, zc) and half-axes (rx, rz) are piecewise linear in y.

    The ends are closed where the radii reach 0 (depth -100 there, so added texture cannot reopen them).
    The profiles are read at the undisplaced y (2D, cheap): they vary slowly compared with the displacement.
    """
    X, _, Z = frame.at(box)
    cx, cz, ax, az = (np.interp(frame.Yr[:, box[1], box[2]], knots, v).astype(np.float32) for v in (xc, zc, rx, rz))
    closed = 200 * (np.minimum(ax, az) - 0.5)
    ax, az = np.maximum(ax, 0.5), np.maximum(az, 0.5)
    ux, uz = X - cx, Z - cz
    sq = np.sqrt((ux / ax) ** 2 + (uz / az) ** 2)
    g = np.sqrt((ux / ax**2) ** 2 + (uz / az**2) ** 2) + 1e-6
    return np.minimum((1 - sq) * sq / g, closed)


def _rotation(axis: int, deg: float) -> np.ndarray:
    """3x3 rotation about coordinate axis `axis` (0 x, 1 y, 2 z) by `deg` degrees."""
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    i, j = [k for k in range(3) if k != axis]
    rot = np.eye(3)
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, s, -s, c
    return rot


def _upsample2(a: np.ndarray) -> np.ndarray:
    """Linear x2 upsampling along every axis (n -> 2n - 1 samples); much faster than ndimage.zoom."""
    for axis in range(a.ndim):
        a = np.moveaxis(a, axis, 0)
        out = np.empty((2 * len(a) - 1, *a.shape[1:]), a.dtype)
        out[0::2], out[1::2] = a, 0.5 * (a[:-1] + a[1:])
        a = np.moveaxis(out, 0, axis)
    return np.ascontiguousarray(a)


def _smooth_noise(rng: np.random.Generator, shape, rows, levels: int = 1, sigma: float = 1.0) -> np.ndarray:
    """Smooth noise (about unit variance) for rows[0]:rows[1] along y of a volume of `shape`: Gaussian-filtered
    at 1/2**levels resolution, then linearly upsampled. The rows equal the same rows of the whole volume's field,
    so a band of slices shows exactly the anatomy of the full volume."""
    factor = 2**levels
    field = ndimage.gaussian_filter(rng.standard_normal([n // factor + 2 for n in shape], dtype=np.float32), sigma,
                                    mode="wrap")
    first = rows[0] // factor
    field = (field[:, first:(rows[1] - 1) // factor + 2] - field.mean()) / field.std()
    for _ in range(levels):
        field = _upsample2(field)
    start = rows[0] - first * factor
    return field[:shape[0], start:start + rows[1] - rows[0], :shape[2]]


class Canvas:
    """The image (float32 T2 units) and label (uint8) being painted, with the texture shared by tissues."""

    def __init__(self, frame: Frame, tex: np.ndarray, coarse: np.ndarray):
        self.frame, self.tex, self.coarse = frame, tex, coarse
        self.image = np.zeros(frame.X.shape, np.float32)
        self.label = np.zeros(frame.X.shape, np.uint8)

    def paint(self, box, depth, value, label=None, soft=1.2, where=None):
        """Blend `value` in with a partial-volume ramp of width `soft` mm across the surface."""
        alpha = np.clip(0.5 + depth / soft, 0, 1)
        inside = depth > 0
        if where is not None:
            alpha, inside = alpha * where, inside & where
        sub = self.image[box]
        sub += alpha * (value - sub)
        if label is not None:
            self.label[box][inside] = label


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
            ("ell", p(h + 22, 104, -34), (7, 42, 60), _rotation(1, side * 30) @ _rotation(2, -side * 25)),  # wing
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
    bias: tuple[float, ...]  # log-bias gradients along x, y, z, brightening towards the edges, fall-off along y
    bladder: float  # volume factor
    rectum: float  # radius factor
    gas: tuple[float, float] | None  # (centre y, half-length) of a gas pocket in the rectum, mm
    prostate_shift: tuple[float, float, float]
    prostate_scale: float
    gain: float
    noise: float  # Rician sigma in raw units


def _draw_week(pa: PatientAnatomy, week: int, rng: np.random.Generator) -> WeekState:
    """A fixed number of draws whatever the outcome, so every later draw is reproducible."""
    n, u = rng.normal(size=14), rng.uniform(size=14)
    return WeekState(
        position=tuple(float(p + 2.5 * d) for p, d in zip(pa.position, n[:3])), pitch=float(np.radians(1.5) * n[3]),
        disp=(tuple(1.0 + 2.0 * u[:3]), tuple(2 * np.pi / (120 + 130 * u[3:5])), tuple(2 * np.pi * u[5:8])),
        bias=tuple(float(v) for v in (*(0.12 * n[11:14]), 0.2 + 0.25 * u[12], 0.1 + 0.2 * u[13])),
        bladder=float(np.clip(pa.bladder_fill * np.exp(0.35 * n[4]), 0.35, 1.8)), rectum=float(0.85 + 0.45 * u[8]),
        gas=(float(-5 + 65 * u[9]), float(8 + 17 * u[10])) if u[11] < 0.5 else None,
        prostate_shift=tuple(float(v) for v in 1.5 * n[5:8]), prostate_scale=float(1 - 0.01 * week * abs(n[8])),
        gain=float(pa.gain * (1 + 0.05 * n[9])), noise=float(15 + 2 * n[10]))


def _paint_rectum(cv: Canvas, pa: PatientAnatomy, ws: WeekState) -> None:
    """Rectum behind the prostate, following the sacrum: intermediate wall, mottled faeces, sometimes gas."""
    r, p_ap = pa.rectum_radius * ws.rectum, pa.prostate_radii[2] * ws.prostate_scale
    z0 = ws.prostate_shift[2] - (0.8 * p_ap + 2.5 + 0.85 * r)
    knots, xc = [-80, -62, -32, 0, 40, 80, 108, 112], [0, 0, 0, 0, 3, -3, 0, 0]
    zc = [-70, -62, -42, z0, z0 - 8, -40, -32, -32]
    rx, rz = [0, 5, 9, 1.25 * r, 1.4 * r, 1.15 * r, 0.9 * r, 0], [0, 4, 7, 0.85 * r, r, 0.9 * r, 0.75 * r, 0]
    box = cv.frame.box((-2 * r, -82, -75), (2 * r, 114, z0 + r + 4))
    if box is None:
        return
    X, Y, Z = cv.frame.at(box)
    depth, tex = swept_depth(cv.frame, box, knots, xc, zc, rx, rz), cv.tex[box]
    content = 420 * (1 + 0.3 * tex)
    cv.paint(box, depth, content + (WALL * (1 + 0.08 * tex) - content) * np.clip((3.2 - depth) / 1.2, 0, 1), RECTUM)
    if ws.gas is not None:  # the patient lies supine: gas rises to the anterior side of the lumen
        yg, half = ws.gas
        zg, rzg = float(np.interp(yg, knots, zc)), float(np.interp(yg, knots, rz))
        gas = ellipsoid_depth(X, Y, Z, (0, yg, zg + 0.5 * rzg), (0.9 * np.interp(yg, knots, rx), half, 0.6 * rzg))
        cv.paint(box, np.minimum(gas, depth - 2.5), GAS, soft=1.0)


def _paint_bladder(cv: Canvas, pa: PatientAnatomy, ws: WeekState) -> None:
    """Urine-filled bladder above the prostate; it grows upwards and forwards as it fills. Thin dark wall."""
    radii = tuple(r * ws.bladder ** (1 / 3) for r in pa.bladder_radii)
    centre = (0, 0.75 * pa.prostate_radii[1] + 0.85 * radii[1], 4 + 0.3 * radii[2])
    box = cv.frame.box(np.subtract(centre, radii) - 3, np.add(centre, radii) + 3)
    if box is None:
        return
    depth = ellipsoid_depth(*cv.frame.at(box), centre, radii) + 1.5 * cv.tex[box]
    urine = URINE * (1 + 0.02 * cv.tex[box])
    cv.paint(box, depth, urine + (WALL - urine) * np.clip((3.0 - depth) / 1.0, 0, 1), BLADDER)


def _paint_vesicles(cv: Canvas, pa: PatientAnatomy, ws: WeekState) -> None:
    """Seminal vesicles: bright fluid-filled lobes behind the bladder base (label body)."""
    _, p_si, p_ap = pa.prostate_radii
    for side in (-1, 1):
        centre = (side * 17, p_si + 3, -0.8 * p_ap - 3)
        box = cv.frame.box(np.subtract(centre, 18), np.add(centre, 18))
        if box is None:
            continue
        depth = ellipsoid_depth(*cv.frame.at(box), centre, (15, 6, 6), _rotation(2, side * 25)) + cv.tex[box]
        cv.paint(box, depth, VESICLE * (1 + 0.1 * cv.tex[box]), soft=2.0)


def _paint_prostate(cv: Canvas, pa: PatientAnatomy, ws: WeekState) -> None:
    """Walnut-shaped prostate (wider base, flattened back) inside a shell of tissue of almost the same
    intensity, so its boundary is faint; a brighter peripheral zone posteriorly adds a misleading inner edge."""
    radii = tuple(r * ws.prostate_scale for r in pa.prostate_radii)
    c = ws.prostate_shift
    box = cv.frame.box(np.subtract(c, radii) - 14, np.add(c, radii) + 14)
    if box is None:
        return
    X, Y, Z = cv.frame.at(box)
    tex = cv.tex[box]
    uy = np.clip((Y - c[1]) / radii[1], -1, 1)
    xw = c[0] + (X - c[0]) / (1 + 0.15 * uy)
    zw = c[2] + np.where(Z < c[2], np.float32(1.25), np.float32(1.0)) * (Z - c[2])
    depth = ellipsoid_depth(xw, Y, zw, c, radii) + 0.5 * tex
    shell = cv.label[box] == BODY
    cv.paint(box, depth + 5 + 2 * tex, pa.shell_t2 * (1 + 0.1 * tex), soft=3.0, where=shell)
    pz = np.clip(-1.6 * (zw - c[2]) / radii[2] + 0.1 - 0.4 * uy, 0, 1) * np.clip((9 - depth) / 3, 0, 1)
    cv.paint(box, depth, pa.prostate_t2 * (1 + 0.14 * tex + 0.45 * pz), PROSTATE, soft=2.5)


def _acquire(cv: Canvas, ws: WeekState, rng: np.random.Generator) -> np.ndarray:
    """Scanner gain, smooth multiplicative bias (brighter near the coils) and Rician noise -> float32 image."""
    x, y, z = (a / 200 for a in cv.frame.axes)
    gx, gy, gz, edges, fall = ws.bias
    bias_xz = np.exp(gx * x[:, None] + gz * z[None] + edges * (x[:, None] ** 2 + (1.25 * z[None]) ** 2))
    bias_y = ws.gain * np.exp(gy * y - fall * y**2)
    signal = cv.image * bias_xz[:, None, :].astype(np.float32) * bias_y[None, :, None].astype(np.float32)
    noise = rng.standard_normal((2, *signal.shape), dtype=np.float32) * ws.noise
    return np.hypot(signal + noise[0], noise[1])


def default_spacing(shape=VOLUME_SHAPE) -> tuple[float, float, float]:
    """Voxel size (mm) keeping the field of view for a base shape: (256, 256, 128) -> (1.5625, 1.5625, 2.5)."""
    return tuple(float(f / n) for f, n in zip(FIELD_OF_VIEW, shape))


def volume_affine(shape, spacing, rows: tuple[int, int] | None = None) -> np.ndarray:
    """RAS+ affine (mm) of a volume stored as (x right->left, y inferior->superior, z posterior->anterior);
    with `rows`, the affine of the sub-volume vol[:, rows[0]:rows[1], :]."""
    sx, sy, sz = spacing
    lin = np.array([[-sx, 0, 0], [0, 0, sz], [0, sy, 0]], dtype=np.float64)
    origin = -lin @ ((np.asarray(shape) - 1) / 2) + np.array([2.0, 18.0, -35.0])  # a table/isocentre offset
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = lin, origin + lin[:, 1] * (rows[0] if rows else 0)
    return affine


def make_volume(anatomy: PatientAnatomy, week: int, seed: int, shape=VOLUME_SHAPE, spacing=None,
                rows: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One weekly scan -> image float32 (x, y, z) raw MR units, label uint8 (x, y, z) 0..5, affine (4, 4) mm.

    `spacing` defaults to `default_spacing()`; `rows` = (start, stop) builds only vol[:, start:stop, :]
    (a band of axial slices; the affine is shifted to match). Deterministic in (anatomy, week, seed, ...).
    """
    spacing = tuple(spacing or default_spacing())
    rows = rows or (0, shape[1])
    rng = np.random.default_rng(seed)
    ws = _draw_week(anatomy, week, rng)
    size = (shape[0], rows[1] - rows[0], shape[2])
    tex, coarse = _smooth_noise(rng, shape, rows), _smooth_noise(rng, shape, rows, 3)
    image, label = np.empty(size, np.float32), np.empty(size, np.uint8)
    # Slabs of 16 x-rows keep every temporary array small: cache-friendly, and no page faults from huge arrays.
    for start in range(0, shape[0], 16):
        slab = slice(start, min(start + 16, shape[0]))
        frame = Frame(shape, spacing, ((slab.start, slab.stop), rows, (0, shape[2])), ws.position, ws.pitch, ws.disp,
                      max(ws.disp[0]))
        cv = Canvas(frame, tex[slab], coarse[slab])
        _paint_body(cv, anatomy)
        _paint_pelvic_fat(cv, anatomy)
        _paint_bowel(cv, anatomy)
        for paint in (_paint_vesicles, _paint_rectum, _paint_bladder, _paint_prostate):
            paint(cv, anatomy, ws)
        _paint_bones(cv, anatomy)
        image[slab], label[slab] = _acquire(cv, ws, rng), cv.label
    return image, label, volume_affine(shape, spacing, rows)
