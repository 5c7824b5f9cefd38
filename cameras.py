"""Cameras: the pinhole model with an optional lens distortion, poses on a sphere, and the normalisation of a
capture's poses into the frame the presets are set up for.

Pixel convention (that of nerfstudio and instant-ngp): pixel (column i, row j) covers [i, i + 1) x [j, j + 1) in
image coordinates (x right, y down), so its centre is (i + 0.5, j + 0.5), and the principal point (cx, cy) is given
in the same coordinates: the centre of a W x H image is (W / 2, H / 2). A pixel centre maps to the normalised
image point x = (i + 0.5 - cx) / fx, y = (j + 0.5 - cy) / fy (y down, OpenCV's camera); with a distortion, that
point is the *distorted* one and is undistorted first. The ray's camera-space direction is (x, -y, -1): the camera
looks along -z with +y up (OpenGL / Blender / NeRF), and camera-space z = -1 makes the ray parameter t the depth.

Distortion is OpenCV's radial-tangential model (k1, k2, k3, p1, p2), as instant-ngp and nerfstudio's
transforms.json write it: a point (x, y) is seen at
    x_d = x (1 + k1 r^2 + k2 r^4 + k3 r^6) + 2 p1 x y + p2 (r^2 + 2 x^2)
    y_d = y (1 + k1 r^2 + k2 r^4 + k3 r^6) + p1 (r^2 + 2 y^2) + 2 p2 x y,      r^2 = x^2 + y^2.
Undistortion inverts it with a fixed number of Newton steps (no data-dependent loop, so no host sync on a GPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

UNDISTORT_STEPS = 10  # Newton steps: at |k1| <= 0.3 the residual is below 1e-9 of the normalised coordinates


@dataclass
class Cameras:
    """Intrinsics of N views of one size: fx, fy, cx, cy [N] in pixels; distortion [N, 5] (k1, k2, k3, p1, p2)
    or None for an ideal pinhole."""

    fx: torch.Tensor
    fy: torch.Tensor
    cx: torch.Tensor
    cy: torch.Tensor
    height: int
    width: int
    distortion: torch.Tensor | None = None

    @classmethod
    def pinhole(cls, n: int, focal: float, height: int, width: int) -> "Cameras":
        """n identical cameras with one focal length and the principal point at the image centre."""
        full = lambda value: torch.full((n,), float(value), dtype=torch.float32)
        return cls(full(focal), full(focal), full(width / 2), full(height / 2), height, width)

    def __len__(self) -> int:
        return self.fx.shape[0]

    def subset(self, index) -> "Cameras":
        pick = lambda t: t[index]
        return Cameras(pick(self.fx), pick(self.fy), pick(self.cx), pick(self.cy), self.height, self.width,
                       None if self.distortion is None else pick(self.distortion))

    def to(self, device) -> "Cameras":
        move = lambda t: t.to(device)
        return Cameras(move(self.fx), move(self.fy), move(self.cx), move(self.cy), self.height, self.width,
                       None if self.distortion is None else move(self.distortion))

    def scaled(self, factor: int) -> "Cameras":
        """The cameras of the images shrunk `factor` times (intrinsics in pixels scale; distortion does not)."""
        return Cameras(self.fx / factor, self.fy / factor, self.cx / factor, self.cy / factor,
                       self.height // factor, self.width // factor, self.distortion)

    def simple_focal(self) -> float | None:
        """The focal length when every view is the same undistorted pinhole with square pixels and its principal
        point at the centre (the tiny-NeRF camera), else None."""
        same = lambda t, value: bool((t == value).all())
        f = float(self.fx[0])
        if self.distortion is None and same(self.fx, f) and same(self.fy, f) and same(
                self.cx, self.width / 2) and same(self.cy, self.height / 2):
            return f
        return None

    def directions(self, view: torch.Tensor, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
        """Camera-space ray directions [..., 3] (z = -1) through the centres of pixels (px, py) of views `view`
        (all [...], broadcast together)."""
        pick = lambda t: t.index_select(0, view.reshape(-1)).reshape(*view.shape, *t.shape[1:])
        return pinhole_directions(px, py, pick(self.fx), pick(self.fy), pick(self.cx), pick(self.cy),
                                  None if self.distortion is None else pick(self.distortion))

    def rays(self, c2w: torch.Tensor, view: torch.Tensor, px: torch.Tensor,
             py: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """World rays through pixel centres: c2w [..., 4, 4] of each ray's view -> rays_o, rays_d [..., 3]
        (rays_d not normalised: its camera-space z is -1)."""
        return rays_from_directions(c2w, self.directions(view, px, py))

    def image_rays(self, c2w: torch.Tensor, view: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rays through every pixel of view `view` with pose c2w [4, 4] -> rays_o, rays_d [H, W, 3]."""
        device = c2w.device
        py, px = torch.meshgrid(torch.arange(self.height, device=device, dtype=torch.float32),
                                torch.arange(self.width, device=device, dtype=torch.float32), indexing="ij")
        index = torch.full_like(px, view, dtype=torch.long)
        return self.rays(c2w[None, None], index, px, py)

    def project(self, cam: torch.Tensor, view: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Camera-space points [n, 3] (camera looking along -z) -> continuous image coordinates (u, v) [n] of view
        `view` (pixel (i, j) covers [i, i + 1) x [j, j + 1)). Points must lie in front (z < 0)."""
        depth = -cam[:, 2]
        x, y = cam[:, 0] / depth, -cam[:, 1] / depth
        if self.distortion is not None:
            x, y = distort(x, y, self.distortion[view])
        return x * self.fx[view] + self.cx[view], y * self.fy[view] + self.cy[view]


def pinhole_directions(px, py, fx, fy, cx, cy, distortion: torch.Tensor | None = None) -> torch.Tensor:
    """Camera-space directions [..., 3] (z = -1) through the centres of pixels (px, py) [...] of cameras with
    intrinsics fx, fy, cx, cy (numbers or tensors broadcasting with px) and an optional distortion [..., 5]."""
    x, y = (px + 0.5 - cx) / fx, (py + 0.5 - cy) / fy
    if distortion is not None:
        x, y = undistort(x, y, distortion)
    return torch.stack([x, -y, -torch.ones_like(x)], dim=-1)


def rays_from_directions(c2w: torch.Tensor, dirs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Camera-space directions [..., 3] -> world rays_o, rays_d [..., 3] for cameras c2w [..., 4, 4]."""
    rays_d = (c2w[..., :3, :3] @ dirs[..., None]).squeeze(-1)
    return c2w[..., :3, 3].expand_as(rays_d), rays_d


def distort(x: torch.Tensor, y: torch.Tensor, coeffs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCV radial-tangential distortion of normalised points (x, y); coeffs [..., 5] = k1, k2, k3, p1, p2."""
    k1, k2, k3, p1, p2 = coeffs.unbind(-1)
    r2 = x * x + y * y
    radial = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
    return (x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x),
            y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y)


def undistort(xd: torch.Tensor, yd: torch.Tensor, coeffs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The point (x, y) that `distort` maps to (xd, yd): Newton's method from (xd, yd), UNDISTORT_STEPS steps."""
    k1, k2, k3, p1, p2 = coeffs.unbind(-1)
    x, y = xd, yd
    for _ in range(UNDISTORT_STEPS):
        r2 = x * x + y * y
        radial = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
        d_radial = 2 * (k1 + r2 * (2 * k2 + 3 * k3 * r2))  # d radial / d (r^2), times 2 for d/dx = x * this
        fx = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x) - xd
        fy = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y - yd
        # Jacobian of (fx, fy) with respect to (x, y)
        a = radial + x * x * d_radial + 2 * p1 * y + 6 * p2 * x
        b = x * y * d_radial + 2 * p1 * x + 2 * p2 * y
        c = x * y * d_radial + 2 * p1 * x + 2 * p2 * y
        d = radial + y * y * d_radial + 6 * p1 * y + 2 * p2 * x
        det = a * d - b * c
        x = x - (d * fx - b * fy) / det
        y = y - (a * fy - c * fx) / det
    return x, y


# --- poses -------------------------------------------------------------------------------------------------------
def pose_spherical(theta_deg: float, phi_deg: float, radius: float) -> torch.Tensor:
    """Camera-to-world [4, 4] on a sphere around the origin, looking at it (world z up, the Blender scenes'
    convention): azimuth theta, elevation phi (negative = above the object, as in the original's -30)."""
    theta, phi = math.radians(theta_deg), math.radians(phi_deg)
    translate = torch.eye(4, dtype=torch.float64)
    translate[2, 3] = radius
    rot_phi = torch.tensor([[1, 0, 0, 0], [0, math.cos(phi), -math.sin(phi), 0],
                            [0, math.sin(phi), math.cos(phi), 0], [0, 0, 0, 1]], dtype=torch.float64)
    rot_theta = torch.tensor([[math.cos(theta), 0, -math.sin(theta), 0], [0, 1, 0, 0],
                              [math.sin(theta), 0, math.cos(theta), 0], [0, 0, 0, 1]], dtype=torch.float64)
    swap = torch.tensor([[-1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.float64)
    return (swap @ rot_theta @ rot_phi @ translate).float()


def orbit_poses(n_frames: int, radius: float, elevation: float) -> torch.Tensor:
    """[n_frames, 4, 4]: a full turn of azimuth at a fixed elevation around the origin."""
    return torch.stack([pose_spherical(360.0 * k / n_frames, elevation, radius) for k in range(n_frames)])


def look_at(position: np.ndarray) -> np.ndarray:
    """Camera-to-world [4, 4] of a camera at `position` [3] looking at the origin, world +z up (the frame
    loaders put scenes in), in the OpenGL convention (camera looks along -z, +y up)."""
    back = position / np.linalg.norm(position)
    right = np.cross([0.0, 0.0, 1.0], back)
    right = right / np.linalg.norm(right) if np.linalg.norm(right) > 1e-9 else np.array([1.0, 0.0, 0.0])
    c2w = np.eye(4)
    c2w[:3, :3] = np.stack([right, np.cross(back, right), back], axis=1)
    c2w[:3, 3] = position
    return c2w


def sweep_poses(poses: torch.Tensor, n_frames: int) -> torch.Tensor:
    """[n_frames, 4, 4]: a camera path for a capture, whose cameras do not circle the scene: along the cameras'
    own trajectory (`poses` [N, 4, 4] in capture order, the file-name order, their positions smoothed over a few
    neighbours), there and back, each frame looking at the centre with +z up. Views away from where some camera
    stood see what none did: a hand-held capture covers a patch of directions and distances, no circle."""
    p = poses[:, :3, 3].double().cpu().numpy()
    index = np.arange(len(p))
    weights = np.exp(-0.5 * ((index[:, None] - index[None, :]) / SWEEP_SMOOTHING_FRAMES) ** 2)
    track = weights @ p / weights.sum(axis=1, keepdims=True)  # [N, 3]
    length = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(track, axis=0), axis=1))])
    frames = []
    for k in range(n_frames):
        s = length[-1] * 0.5 * (1 - math.cos(2 * math.pi * k / n_frames))  # eases out and back
        frames.append(look_at(np.array([np.interp(s, length, track[:, i]) for i in range(3)])))
    return torch.from_numpy(np.stack(frames)).float()


SWEEP_SMOOTHING_FRAMES = 1.5  # the Gaussian's width, in frames: irons out hand shake, keeps the path's turns


# --- normalising a capture ---------------------------------------------------------------------------------------
CAPTURE_RADIUS = 4.0  # the presets' frame: cameras ~4 from the scene's centre, near 2, far 6, occupancy box +-1.5


def normalise_capture(poses: np.ndarray, radius: float = CAPTURE_RADIUS,
                      depth: float | None = None) -> tuple[np.ndarray, dict]:
    """Camera-to-world poses [N, 4, 4] of a capture in the frame the presets are set up for, and what was done.

    Up: the world is rotated so that the cameras' mean up vector is +z (nerfstudio's "up" orientation).
    Centre: the point nearest (least squares) to every camera's optical axis, the spot the cameras look at; when
    the axes are near parallel (a forward-facing capture) the point `depth` in front of the mean camera position
    along the mean viewing direction (the mean position itself without a depth).
    Scale: the cameras' mean distance from that centre becomes `radius`, so near/far and the occupancy box of the
    presets frame the scene as they frame the Blender scenes (colmap2nerf normalises to the same distance).
    Returns (poses, {"rotation": [3, 3], "centre": [3] (after rotating), "scale": float}).
    """
    poses = poses.astype(np.float64).copy()
    rotation = _rotation_onto_z(poses[:, :3, 1].mean(axis=0))
    poses[:, :3, :] = rotation @ poses[:, :3, :]
    origins, forward = poses[:, :3, 3], -poses[:, :3, 2]
    forward = forward / np.linalg.norm(forward, axis=1, keepdims=True)
    projector = np.eye(3)[None] - forward[:, :, None] * forward[:, None, :]  # onto each axis' normal plane
    a, b = projector.sum(axis=0), (projector @ origins[:, :, None]).sum(axis=0)[:, 0]
    eig = np.linalg.eigvalsh(a)
    if eig[0] > 1e-3 * eig[-1]:
        centre = np.linalg.solve(a, b)
    else:
        ahead = forward.mean(axis=0) / np.linalg.norm(forward.mean(axis=0))
        centre = origins.mean(axis=0) + (depth or 0.0) * ahead
    distance = np.linalg.norm(origins - centre, axis=1).mean()
    scale = radius / distance if distance > 0 else 1.0
    poses[:, :3, 3] = (origins - centre) * scale
    return poses, {"rotation": rotation, "centre": centre, "scale": float(scale)}


def _rotation_onto_z(up: np.ndarray) -> np.ndarray:
    """The rotation [3, 3] taking direction `up` onto +z (Rodrigues), the identity when it already is."""
    up = up / np.linalg.norm(up)
    z = np.array([0.0, 0.0, 1.0])
    v, c = np.cross(up, z), float(up @ z)
    if c < -1 + 1e-9:  # upside down: half a turn about x
        return np.diag([1.0, -1.0, -1.0])
    k = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + k + k @ k / (1 + c)
