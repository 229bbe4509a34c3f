"""Coordinates, shape primitives, smooth noise and the painting canvas of the phantom (see phantom_anatomy.py).

Every depth function returns a signed depth in mm (> 0 inside) over arrays of anatomical coordinates, float32 in,
float32 out; the noise fields are band-consistent (a band of rows equals the same rows of the whole volume's field),
so anything built from them and from the coordinates gives the same label in a band as in the full volume.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


class Frame:
    """Deformed anatomical coordinates (X, Y, Z) in mm for the voxels of a window ((start, stop) per axis) of a
    volume stored in LPS order (array axes x right->left, y anterior->posterior, z inferior->superior).

    Anatomical axes: X left, Y superior, Z anterior, relative to the prostate; anatomical = pitch rotation (about
    X) of (volume mm - prostate position) + a smooth displacement. `position` is the prostate centre in volume mm
    from the volume centre, as (left, superior, anterior). Arrays broadcast to the window's (nx, ny, nz).
    """

    def __init__(self, shape, spacing, window, position, pitch, disp, dmax):
        # Voxel centres in mm from the volume centre along the stored axes, increasing with the index.
        self.axes = [((np.arange(n, dtype=np.float32) - (n - 1) / 2) * s)[a:b]
                     for n, s, (a, b) in zip(shape, spacing, window)]
        self.position, self.c, self.s, self.dmax = np.asarray(position), np.cos(pitch), np.sin(pitch), dmax
        x = self.axes[0] - position[0]
        anterior = -self.axes[1] - position[2]  # (ny,): stored y runs anterior -> posterior
        superior = self.axes[2] - position[1]  # (nz,)
        # Undisplaced anatomical x (nx, 1, 1) and rotated y, z (1, ny, nz): cheap stand-ins for slowly varying profiles.
        self.Xr = x[:, None, None]
        self.Yr = (self.c * superior[None, :] - self.s * anterior[:, None])[None].astype(np.float32)
        self.Zr = (self.s * superior[None, :] + self.c * anterior[:, None])[None].astype(np.float32)
        # Each displacement component varies over the two other anatomical axes (2D arrays only).
        dx, dy, dz = _displacement(x, superior, anterior, disp)
        self.X = self.Xr + dx.T[None]  # dx (nz, ny)
        self.Y = self.Yr + dy[:, :, None]  # dy (nx, ny): over left-right and antero-posterior
        self.Z = self.Zr + dz[:, None, :]  # dz (nx, nz): over left-right and supero-inferior

    def box(self, lo, hi) -> tuple[slice, slice, slice] | None:
        """Voxel index ranges that hold the anatomical box [lo, hi] (mm), or None when it is outside."""
        corners = np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(3, -1)
        superior = self.c * corners[1] + self.s * corners[2] + self.position[1]
        anterior = -self.s * corners[1] + self.c * corners[2] + self.position[2]
        vol = np.stack([corners[0] + self.position[0], -anterior, superior])  # mm along the stored x, y, z
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
    """Smooth displacement (mm) along anatomical x, y, z from the coordinates (1D arrays, mm) along them:
    dx (len y, len z), dy (len x, len z), dz (len x, len y); each component varies over the two other axes."""
    (ax, ay, az), (w1, w2), (p1, p2, p3) = disp
    dx = ax * np.sin(w1 * y[:, None] + p1) * np.cos(w2 * z[None, :] + p2)
    dy = ay * np.sin(w2 * x[:, None] + p2) * np.cos(w1 * z[None, :] + p3)
    dz = az * np.sin(w1 * x[:, None] + p3) * np.cos(w2 * y[None, :] + p1)
    return dx.astype(np.float32), dy.astype(np.float32), dz.astype(np.float32)


def local_axes(X, Y, Z, centre, rot=None) -> list[np.ndarray]:
    """Coordinates (mm) relative to `centre`, turned into the axes of `rot` (3x3, rows = the local axes in frame
    coordinates); float32 arrays stay float32."""
    centre = [float(c) for c in centre]  # python floats keep arrays float32
    u = [X - centre[0], Y - centre[1], Z - centre[2]]
    if rot is None:
        return u
    rot = np.asarray(rot, dtype=float).tolist()
    return [rot[i][0] * u[0] + rot[i][1] * u[1] + rot[i][2] * u[2] for i in range(3)]


def ellipsoid_depth(X, Y, Z, centre, radii, rot=None) -> np.ndarray:
    """Signed depth (mm, > 0 inside) of an ellipsoid; exact for spheres, first-order elsewhere."""
    u, radii = local_axes(X, Y, Z, centre, rot), [float(r) for r in radii]
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


def rotation(axis: int, deg: float) -> np.ndarray:
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


def noise_field(rng: np.random.Generator, shape, rows, levels: int = 1, sigma: float = 1.0) -> np.ndarray:
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
    """The image (float32 T2 units) and label (uint8) being painted, with the smooth noise fields shared by tissues
    (about unit variance; correlation lengths: tex a few mm, mid about twice that, coarse several cm)."""

    def __init__(self, frame: Frame, tex: np.ndarray, coarse: np.ndarray, mid: np.ndarray):
        self.frame, self.tex, self.coarse, self.mid = frame, tex, coarse, mid
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

    def blend(self, box, weight, value):
        """Mix `value` into the image with a weight in 0..1 (no label): structures without a sharp surface."""
        sub = self.image[box]
        sub += weight * (value - sub)
