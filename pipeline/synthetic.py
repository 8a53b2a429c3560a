"""Procedural videos with exact ground-truth point tracks (``flowdistill synth``).

A scene is a periodic textured background seen through a camera that pans and zooms, plus a stack of
textured sprites (ellipses, rounded boxes, wobbly blobs) that translate, rotate and scale, occlude each other
and leave or enter the frame. Every surface point has a fixed texture coordinate, and every transform is an
analytic affine map, so each pixel's source and each point's position are known exactly.

Coordinates (raster convention, as in TAP-Vid / Kubric): pixel ``(i, j)`` spans ``[j, j+1) x [i, i+1)`` and
its centre is ``(x, y) = (j + 0.5, i + 0.5)``. With ``C = (W/2, H/2)``::

    camera      screen(w, t)  = z_t (w - c_t) + C                        (world w = background texel coords)
    sprite k    world(u, t)   = p_kt + s_kt R(theta_kt) u                 (u = sprite-local px at scale 1)
    so          screen(u, t)  = z_t (p_kt + s_kt R(theta_kt) u - c_t) + C

Each sprite's shape is a signed distance ``d_k(u)`` (local px, < 0 inside); in screen px it is
``D_k(x, t) = z_t s_kt d_k(u(x, t))`` and its anti-aliased coverage is ``clip(0.5 - D_k, 0, 1)``. Frames are
composited back to front in float and rounded to uint8 once. A point on surface ``s`` is occluded at ``t``
iff its screen position lies outside ``[0, W) x [0, H)`` or some sprite above ``s`` has ``D_k < 0`` there.

Outputs follow the TAP-Vid DAVIS layout: ``video`` uint8 [T, H, W, 3], ``points`` float32 [N, T, 2]
normalised (x, y) = raster px / (W, H), ``occluded`` bool [N, T]. ``write_set`` stores each video as
``<name>.mp4`` (PyAV / libx264) and ``<name>.npz`` (exact frames + tracks; read back without pickle), plus
``index.json``.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .common import InputError, atomic_path, atomic_write_json, config_hash, sha256_file

FORMAT_VERSION = 1
TEXTURE_FAMILIES = ("noise", "blobs", "checker", "stripes", "cells")
SHAPES = ("ellipse", "box", "blob")

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "num_videos": 8,
    "num_frames": 24,
    "size": [256, 256],              # [H, W] (TAP-Vid evaluates at 256 x 256)
    "name_prefix": "synth",
    "num_sprites": [4, 8],           # inclusive range, drawn per video
    "sprite_size": [0.1, 0.24],     # sprite half-extent as a fraction of min(H, W)
    "shapes": list(SHAPES),
    "texture": {
        "families": ["noise", "blobs"],  # drawn per surface from this list
        "tile": 512,                 # background tile (periodic, px); sprite tiles are half this size
        "octaves": 4,                # band-pass octaves of the noise
        "min_wavelength": 4.0,       # px: finest octave (>= 4 keeps the texture below Nyquist)
        "max_wavelength": 48.0,      # px: coarsest octave
        "persistence": 0.7,          # amplitude ratio from one octave to the next finer one
        "contrast": 0.2,             # std of the luminance around the base colour (0..1 scale)
    },
    "camera": {"pan": 2.5, "zoom": 0.005},  # max screen px/frame; max |d log(zoom)/d frame|
    "motion": {
        "max_speed": 4.0,            # sprite px/frame (world units)
        "max_rotation_deg": 2.0,     # per frame
        "max_scale_rate": 0.01,      # max |d log(scale)/d frame|
        "cross_edge_prob": 0.5,      # chance that a sprite's centre crosses a frame edge mid-video
    },
    "points": {
        "per_video": 96,
        "sprite_fraction": 0.5,      # share of points placed on sprites (when sprites are visible)
        "edge_margin": 1.5,          # px: no sprite edge this close to a point at its sampling frame
        "occluded_fraction": None,   # None: points as drawn; f: round(N f) of them occluded in some frame, rest never
    },
    "video": {"codec": "libx264", "crf": 10, "pix_fmt": "yuv444p", "preset": "medium", "fps": 24},
}


# ----------------------------------------------------------------------------------------- configuration

def _merge_known(base: dict, new: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    for k, v in new.items():
        if k not in out:
            raise InputError(where, f"unknown synth config key {k!r} (known: {', '.join(sorted(out))})")
        if isinstance(out[k], dict):
            if not isinstance(v, dict):
                raise InputError(f"{where}.{k}", "expected a mapping")
            out[k] = _merge_known(out[k], v, f"{where}.{k}")
        else:
            out[k] = copy.deepcopy(v)
    return out


def resolve_config(cfg: dict | None) -> dict:
    """DEFAULTS deep-merged with ``cfg`` and validated; raises ``InputError`` naming the bad key."""
    c = _merge_known(DEFAULTS, dict(cfg or {}), "synth")

    def need(cond: bool, key: str, reason: str) -> None:
        if not cond:
            raise InputError(f"synth.{key}", reason)

    def is_int(v: Any) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    def is_num(v: Any) -> bool:
        return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)

    need(is_int(c["seed"]) and c["seed"] >= 0, "seed", "must be an integer >= 0")
    need(is_int(c["num_videos"]) and c["num_videos"] >= 1, "num_videos", "must be an integer >= 1")
    need(is_int(c["num_frames"]) and c["num_frames"] >= 2, "num_frames", "must be an integer >= 2")
    need(isinstance(c["size"], (list, tuple)) and len(c["size"]) == 2 and all(is_int(v) and v >= 16 for v in c["size"]),
         "size", "must be [H, W] with integers >= 16")
    c["size"] = [int(v) for v in c["size"]]
    ns = c["num_sprites"]
    need(isinstance(ns, (list, tuple)) and len(ns) == 2 and all(is_int(v) for v in ns) and 0 <= ns[0] <= ns[1] <= 64,
         "num_sprites", "must be [lo, hi] with 0 <= lo <= hi <= 64")
    ss = c["sprite_size"]
    need(isinstance(ss, (list, tuple)) and len(ss) == 2 and all(is_num(v) for v in ss) and 0 < ss[0] <= ss[1] <= 1,
         "sprite_size", "must be [lo, hi] with 0 < lo <= hi <= 1")
    need(isinstance(c["shapes"], (list, tuple)) and len(c["shapes"]) > 0 and all(s in SHAPES for s in c["shapes"]),
         "shapes", f"must be a non-empty list drawn from {list(SHAPES)}")
    need(isinstance(c["name_prefix"], str) and c["name_prefix"].replace("_", "").replace("-", "").isalnum(),
         "name_prefix", "must be letters, digits, '-' or '_'")
    tx = c["texture"]
    need(isinstance(tx["families"], (list, tuple)) and len(tx["families"]) > 0
         and all(f in TEXTURE_FAMILIES for f in tx["families"]),
         "texture.families", f"must be a non-empty list drawn from {list(TEXTURE_FAMILIES)}")
    need(is_int(tx["tile"]) and tx["tile"] >= 64 and tx["tile"] % 64 == 0, "texture.tile", "must be a multiple of 64")
    need(is_int(tx["octaves"]) and 1 <= tx["octaves"] <= 8, "texture.octaves", "must be an integer in [1, 8]")
    need(is_num(tx["min_wavelength"]) and is_num(tx["max_wavelength"])
         and 2 <= tx["min_wavelength"] <= tx["max_wavelength"] <= tx["tile"] // 4,
         "texture.min_wavelength", "need 2 <= min_wavelength <= max_wavelength <= tile/4")
    need(is_num(tx["persistence"]) and 0 < tx["persistence"] <= 2, "texture.persistence", "must be in (0, 2]")
    need(is_num(tx["contrast"]) and 0 < tx["contrast"] <= 0.5, "texture.contrast", "must be in (0, 0.5]")
    for k in ("pan", "zoom"):
        need(is_num(c["camera"][k]) and c["camera"][k] >= 0, f"camera.{k}", "must be >= 0")
    need(c["camera"]["zoom"] <= 0.1, "camera.zoom", "must be <= 0.1 per frame")
    mo = c["motion"]
    for k in ("max_speed", "max_rotation_deg", "max_scale_rate"):
        need(is_num(mo[k]) and mo[k] >= 0, f"motion.{k}", "must be >= 0")
    need(is_num(mo["cross_edge_prob"]) and 0 <= mo["cross_edge_prob"] <= 1, "motion.cross_edge_prob", "must be in [0, 1]")
    pt = c["points"]
    need(is_int(pt["per_video"]) and pt["per_video"] >= 1, "points.per_video", "must be an integer >= 1")
    need(is_num(pt["sprite_fraction"]) and 0 <= pt["sprite_fraction"] <= 1, "points.sprite_fraction", "must be in [0, 1]")
    need(is_num(pt["edge_margin"]) and pt["edge_margin"] >= 0, "points.edge_margin", "must be >= 0")
    need(pt["occluded_fraction"] is None or (is_num(pt["occluded_fraction"]) and 0 <= pt["occluded_fraction"] <= 1),
         "points.occluded_fraction", "must be null or in [0, 1]")
    vd = c["video"]
    need(vd["pix_fmt"] in ("yuv444p", "yuv420p"), "video.pix_fmt", "must be yuv444p or yuv420p")
    if vd["pix_fmt"] == "yuv420p":
        need(c["size"][0] % 2 == 0 and c["size"][1] % 2 == 0, "size", "yuv420p needs even H and W")
    need(is_int(vd["crf"]) and 0 <= vd["crf"] <= 51, "video.crf", "must be an integer in [0, 51]")
    need(is_num(vd["fps"]) and vd["fps"] > 0, "video.fps", "must be > 0")
    need(isinstance(vd["codec"], str) and isinstance(vd["preset"], str), "video.codec", "codec and preset are strings")
    return c


# ---------------------------------------------------------------------------------------------- textures

def _fft_gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Periodic Gaussian blur of [S, S, C] via the FFT: ``F^-1[ F[img] * exp(-2 pi^2 sigma^2 |f|^2) ]``."""
    s = img.shape[0]
    fy = np.fft.fftfreq(s)[:, None]
    fx = np.fft.rfftfreq(s)[None, :]
    g = np.exp(-2.0 * math.pi ** 2 * sigma ** 2 * (fx ** 2 + fy ** 2))
    out = np.fft.irfft2(np.fft.rfft2(img, axes=(0, 1)) * g[..., None], s=(s, s), axes=(0, 1))
    return out


def band_noise(rng: np.random.Generator, size: int, wavelengths: np.ndarray, persistence: float) -> np.ndarray:
    """Multi-octave periodic noise, float64 [S, S], zero mean, unit std.

    White noise is filtered in the Fourier domain by one log-Gaussian band per octave (centre frequency
    ``f_o = 1 / wavelength_o``, half an octave wide), each band normalised to unit variance and weighted by
    ``persistence ** o`` (o = 0 for the coarsest octave)::

        noise = sum_o persistence^o * band_o / std(band_o),   band_o = F^-1[ F[white] * exp(-(log2(f/f_o))^2 / (2 * 0.5^2)) ]
    """
    white = rng.standard_normal((size, size))
    spec = np.fft.rfft2(white)
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    f = np.hypot(fx, fy)
    f[0, 0] = 1e-9
    out = np.zeros((size, size))
    for o, wl in enumerate(sorted(wavelengths, reverse=True)):
        band = np.exp(-0.5 * (np.log2(f * wl) / 0.5) ** 2)
        band[0, 0] = 0.0
        b = np.fft.irfft2(spec * band, s=(size, size))
        out += persistence ** o * b / max(b.std(), 1e-12)
    out -= out.mean()
    return out / max(out.std(), 1e-12)


def _colour_noise(rng: np.random.Generator, size: int, tcfg: dict, contrast: float) -> np.ndarray:
    """Coloured multi-octave noise [S, S, 3] in [0, 1]: base colour + luminance noise + weaker chroma noise."""
    wl = np.geomspace(tcfg["max_wavelength"], tcfg["min_wavelength"], tcfg["octaves"])
    lum = band_noise(rng, size, wl, tcfg["persistence"])
    chroma = [band_noise(rng, size, wl, tcfg["persistence"]) for _ in range(2)]
    base = rng.uniform(0.3, 0.7, size=3)
    mix = rng.normal(0.0, 0.35, size=(2, 3))
    tex = base + contrast * (lum[..., None] + chroma[0][..., None] * mix[0] + chroma[1][..., None] * mix[1])
    return tex


def _texture_blobs(rng: np.random.Generator, size: int, tcfg: dict) -> np.ndarray:
    """Soft-edged discs of random colour (log-uniform radius 2..16 px, wrapped) over faint noise."""
    tex = _colour_noise(rng, size, tcfg, 0.6 * tcfg["contrast"])
    count = int(size * size / 250)
    radii = np.exp(rng.uniform(math.log(2.0), math.log(16.0), size=count))
    centres = rng.uniform(0, size, size=(count, 2))
    colours = rng.uniform(0.0, 1.0, size=(count, 3))
    for r, (cx, cy), col in zip(radii, centres, colours):
        half = int(math.ceil(r + 2))
        xs = np.arange(int(cx) - half, int(cx) + half + 1)
        ys = np.arange(int(cy) - half, int(cy) + half + 1)
        d = np.hypot((xs + 0.5 - cx)[None, :], (ys + 0.5 - cy)[:, None]) - r
        a = np.clip(0.5 - d, 0.0, 1.0)[..., None]                     # 1-px anti-aliased edge
        iy, ix = np.ix_(ys % size, xs % size)
        tex[iy, ix] = tex[iy, ix] * (1 - a) + col * a
    return tex


def _texture_checker(rng: np.random.Generator, size: int, tcfg: dict) -> np.ndarray:
    """Checkerboard of randomly coloured cells (cell 8, 16 or 32 px), softened (sigma 0.6 px), plus fine noise."""
    cell = int(rng.choice([8, 16, 32]))
    n = size // cell
    palette = rng.uniform(0.0, 1.0, size=(int(rng.integers(2, 5)), 3))
    ij = np.arange(n)
    parity = (ij[:, None] + ij[None, :]) % 2
    which = rng.integers(0, len(palette), size=(n, n))
    which = np.where(parity == 0, which, (which + 1) % len(palette))   # neighbours always differ
    cells = palette[which]                                              # [n, n, 3]
    tex = np.repeat(np.repeat(cells, cell, axis=0), cell, axis=1)
    tex = _fft_gaussian_blur(tex, 0.6)
    return tex + _colour_noise(rng, size, tcfg, 0.3 * tcfg["contrast"]) - 0.5


def _texture_stripes(rng: np.random.Generator, size: int, tcfg: dict) -> np.ndarray:
    """Plaid: 2-3 periodic gratings (integer wave vectors, wavelength 6..32 px, soft square profile) plus noise."""
    yy, xx = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
    tex = _colour_noise(rng, size, tcfg, 0.3 * tcfg["contrast"])
    for _ in range(int(rng.integers(2, 4))):
        wl = rng.uniform(6.0, 32.0)
        ang = rng.uniform(0, math.pi)
        k = np.round(np.array([math.cos(ang), math.sin(ang)]) * size / wl)    # cycles per tile (periodic)
        if not k.any():
            k = np.array([size / 16.0, 0.0])
        phase = 2 * math.pi * (k[0] * xx + k[1] * yy) / size + rng.uniform(0, 2 * math.pi)
        profile = np.tanh(2.5 * np.sin(phase)) / math.tanh(2.5)               # in [-1, 1]
        col = rng.uniform(-0.25, 0.25, size=3)
        tex = tex + profile[..., None] * col
    return tex


def _texture_cells(rng: np.random.Generator, size: int, tcfg: dict) -> np.ndarray:
    """Voronoi cells of random flat colour (Worley layout: one seed jittered uniformly inside each square of a
    grid of pitch 8, 16 or 32 px, each texel coloured by its nearest seed on the torus), softened (sigma 0.6 px),
    plus fine noise. Sharp, irregular, non-periodic edges within the tile: neither a checker nor a grating."""
    pitch = int(rng.choice([8, 16, 32]))
    n = size // pitch
    gy, gx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    seeds = (np.stack([gx, gy], -1) + rng.uniform(0.0, 1.0, size=(n, n, 2))) * pitch       # [n, n, 2] (x, y) px
    colours = rng.uniform(0.0, 1.0, size=(n, n, 3))
    yy, xx = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
    ci, cj = (yy // pitch).astype(int), (xx // pitch).astype(int)                           # texel's grid square
    best = np.full((size, size), np.inf)
    tex = np.zeros((size, size, 3))
    for di in (-1, 0, 1):                  # nearest seed among the 3 x 3 neighbouring squares (Worley's search)
        for dj in (-1, 0, 1):
            i, j = (ci + di) % n, (cj + dj) % n
            dx = (seeds[i, j, 0] - xx + size / 2) % size - size / 2                              # torus distance
            dy = (seeds[i, j, 1] - yy + size / 2) % size - size / 2
            d = dx * dx + dy * dy
            closer = d < best
            best = np.where(closer, d, best)
            tex[closer] = colours[i[closer], j[closer]]
    tex = _fft_gaussian_blur(tex, 0.6)
    return tex + _colour_noise(rng, size, tcfg, 0.3 * tcfg["contrast"]) - 0.5


def make_texture(rng: np.random.Generator, family: str, size: int, tcfg: dict) -> np.ndarray:
    """A periodic texture tile, float32 [S, S, 3] in [0, 1]."""
    if family == "noise":
        tex = _colour_noise(rng, size, tcfg, tcfg["contrast"])
    elif family == "blobs":
        tex = _texture_blobs(rng, size, tcfg)
    elif family == "checker":
        tex = _texture_checker(rng, size, tcfg)
    elif family == "stripes":
        tex = _texture_stripes(rng, size, tcfg)
    elif family == "cells":
        tex = _texture_cells(rng, size, tcfg)
    else:
        raise InputError("synth.texture.families", f"unknown texture family {family!r}")
    return np.clip(tex, 0.0, 1.0).astype(np.float32)


def sample_texture(tex: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Bilinear, periodic lookup of ``tex`` [S, S, C] at texel raster coordinates ``xy`` [..., 2] -> [..., C].

    Texel ``(i, j)`` sits at (j + 0.5, i + 0.5); with ``u = x - 0.5``, ``j0 = floor(u)``, ``a = u - j0`` the
    result is the usual bilinear blend of the four texels ``(i0|i0+1, j0|j0+1) mod S``. float32 out.
    """
    s = tex.shape[0]
    u = np.asarray(xy[..., 0], dtype=np.float64) - 0.5
    v = np.asarray(xy[..., 1], dtype=np.float64) - 0.5
    j0f = np.floor(u)
    i0f = np.floor(v)
    a = (u - j0f).astype(np.float32)[..., None]
    b = (v - i0f).astype(np.float32)[..., None]
    j0 = np.mod(j0f.astype(np.int64), s)
    i0 = np.mod(i0f.astype(np.int64), s)
    j1 = (j0 + 1) % s
    i1 = (i0 + 1) % s
    return ((1 - a) * (1 - b) * tex[i0, j0] + a * (1 - b) * tex[i0, j1]
            + (1 - a) * b * tex[i1, j0] + a * b * tex[i1, j1])


# ------------------------------------------------------------------------------------------------ scene

@dataclass
class Camera:
    """World -> screen: ``x = zoom[t] * (w - center[t]) + (W/2, H/2)``."""

    center: np.ndarray   # float64 [T, 2] world (x, y) seen at the frame centre
    zoom: np.ndarray     # float64 [T]


@dataclass
class Sprite:
    """A textured shape; local -> world: ``w = pos[t] + scale[t] * R(angle[t]) @ u``.

    ``half`` = (a, b) local half-extents in px. ``shape`` in ``SHAPES``; ``harmonics`` [K, 3] rows of
    (order k, amplitude c_k, phase) define the ``blob`` outline ``r(phi) = sqrt(a b) (1 + sum c_k cos(k phi + phase))``.
    """

    shape: str
    half: np.ndarray        # float64 [2]
    texture: np.ndarray     # float32 [S, S, 3]
    tex_offset: np.ndarray  # float64 [2] texel coords of u = 0
    pos: np.ndarray         # float64 [T, 2]
    angle: np.ndarray       # float64 [T] radians
    scale: np.ndarray       # float64 [T]
    harmonics: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    family: str = ""


@dataclass
class Scene:
    height: int
    width: int
    background: np.ndarray   # float32 [S, S, 3]; world coords = its texel raster coords (periodic)
    camera: Camera
    sprites: list[Sprite]    # bottom to top (z order)
    background_family: str = ""

    @property
    def num_frames(self) -> int:
        return int(self.camera.zoom.shape[0])


def screen_from_world(scene: Scene, w: np.ndarray, t: np.ndarray | int) -> np.ndarray:
    """``x = z_t (w - c_t) + C`` for w [..., 2] and frame index t (scalar or broadcastable [...])."""
    cam = scene.camera
    centre = np.array([scene.width / 2.0, scene.height / 2.0])
    return cam.zoom[t][..., None] * (w - cam.center[t]) + centre


def world_from_screen(scene: Scene, x: np.ndarray, t: np.ndarray | int) -> np.ndarray:
    """Inverse camera: ``w = (x - C) / z_t + c_t``."""
    cam = scene.camera
    centre = np.array([scene.width / 2.0, scene.height / 2.0])
    return (x - centre) / cam.zoom[t][..., None] + cam.center[t]


def _rot(angle: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.cos(angle), np.sin(angle)


def world_from_local(sp: Sprite, u: np.ndarray, t: np.ndarray | int) -> np.ndarray:
    """``w = p_t + s_t R(theta_t) u`` with ``R = [[cos, -sin], [sin, cos]]``."""
    c, s = _rot(sp.angle[t])
    sc = sp.scale[t]
    x = sc * (c * u[..., 0] - s * u[..., 1])
    y = sc * (s * u[..., 0] + c * u[..., 1])
    return np.stack([x, y], axis=-1) + sp.pos[t]


def local_from_world(sp: Sprite, w: np.ndarray, t: np.ndarray | int) -> np.ndarray:
    """``u = R(-theta_t) (w - p_t) / s_t``."""
    c, s = _rot(sp.angle[t])
    d = (w - sp.pos[t]) / sp.scale[t][..., None]
    return np.stack([c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1]], axis=-1)


def shape_sdf(sp: Sprite, u: np.ndarray) -> np.ndarray:
    """Signed distance (local px, < 0 inside) of local points u [..., 2] to the sprite outline.

    - ``box``: rounded box, exact: ``q = |u| - (h - r)``, ``d = |max(q, 0)| + min(max(q_x, q_y), 0) - r``,
      corner radius ``r = 0.25 min(a, b)``;
    - ``ellipse``: first-order distance ``g / |grad g|`` with ``g = sqrt((x/a)^2 + (y/b)^2) - 1``;
    - ``blob``: first-order distance of ``g = rho - r(phi)``: ``g / sqrt(1 + (r'(phi) / rho)^2)``.
    The zero level set (the outline) is exact in all three; only the distance away from it is approximate.
    """
    a, b = sp.half
    x, y = u[..., 0], u[..., 1]
    if sp.shape == "box":
        r = 0.25 * min(a, b)
        qx = np.abs(x) - (a - r)
        qy = np.abs(y) - (b - r)
        outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
        return outside + np.minimum(np.maximum(qx, qy), 0.0) - r
    if sp.shape == "ellipse":
        k = np.hypot(x / a, y / b)
        grad = np.hypot(x / a ** 2, y / b ** 2) / np.maximum(k, 1e-12)
        return np.where(k > 1e-9, (k - 1.0) / np.maximum(grad, 1e-12), -min(a, b))
    if sp.shape == "blob":
        r0 = math.sqrt(a * b)
        rho = np.hypot(x, y)
        phi = np.arctan2(y, x)
        r = np.ones_like(phi)
        dr = np.zeros_like(phi)
        for k, c, ph in sp.harmonics:
            r = r + c * np.cos(k * phi + ph)
            dr = dr - c * k * np.sin(k * phi + ph)
        r, dr = r0 * r, r0 * dr
        g = rho - r
        return g / np.sqrt(1.0 + (dr / np.maximum(rho, 1e-6)) ** 2)
    raise InputError("sprite.shape", f"unknown shape {sp.shape!r}")


def _local_extent(sp: Sprite) -> float:
    """Radius (local px) of a disc containing the whole shape."""
    a, b = sp.half
    if sp.shape == "blob":
        return math.sqrt(a * b) * (1.0 + float(np.abs(sp.harmonics[:, 1]).sum()))
    return float(math.hypot(a, b))


def sprite_distance(scene: Scene, k: int, x: np.ndarray, t: np.ndarray | int) -> np.ndarray:
    """Screen-space signed distance ``D_k(x, t) = z_t s_kt d_k(u(x, t))`` (px, < 0 inside) at screen points x."""
    sp = scene.sprites[k]
    u = local_from_world(sp, world_from_screen(scene, x, t), t)
    return shape_sdf(sp, u) * (scene.camera.zoom[t] * sp.scale[t])


def _trajectory(rng: np.random.Generator, t: np.ndarray, p0: np.ndarray, vmax: float) -> tuple[np.ndarray, np.ndarray]:
    """``p_t = p0 + v t + a t^2 / 2``: |v| uniform in [0.2, 1] vmax, random direction; a ~ N(0, (0.3 vmax / T)^2)."""
    ang = rng.uniform(0, 2 * math.pi)
    v = vmax * rng.uniform(0.2, 1.0) * np.array([math.cos(ang), math.sin(ang)])
    acc = rng.normal(0.0, 0.3 * vmax / max(len(t), 1), size=2)
    return p0 + v * t[:, None] + 0.5 * acc * t[:, None] ** 2, v


def sample_scene(cfg: dict, rng: np.random.Generator) -> Scene:
    """Draw a random scene (camera path, textures, sprites, their motion) from a resolved config."""
    h, w = cfg["size"]
    n_t = cfg["num_frames"]
    t = np.arange(n_t, dtype=np.float64)
    tcfg = cfg["texture"]
    tile = tcfg["tile"]
    fams = list(tcfg["families"])

    bg_family = fams[int(rng.integers(len(fams)))]
    background = make_texture(rng, bg_family, tile, tcfg)

    cam_cfg = cfg["camera"]
    zoom = np.exp(rng.uniform(-cam_cfg["zoom"], cam_cfg["zoom"]) * t)
    c0 = rng.uniform(0, tile, size=2)
    centre, _ = _trajectory(rng, t, c0, cam_cfg["pan"])
    camera = Camera(center=centre, zoom=zoom)
    scene = Scene(height=h, width=w, background=background, camera=camera, sprites=[],
                  background_family=bg_family)

    mo = cfg["motion"]
    lo, hi = cfg["num_sprites"]
    n_sprites = int(rng.integers(lo, hi + 1))
    for _ in range(n_sprites):
        shape = cfg["shapes"][int(rng.integers(len(cfg["shapes"])))]
        r = rng.uniform(*cfg["sprite_size"]) * min(h, w)
        aspect = math.exp(rng.uniform(-0.5, 0.5))
        half = np.array([r * math.sqrt(aspect), r / math.sqrt(aspect)])
        harmonics = np.zeros((0, 3))
        if shape == "blob":
            ks = np.array([2.0, 3.0, 5.0])
            harmonics = np.stack([ks, rng.uniform(0.0, 0.12, size=3), rng.uniform(0, 2 * math.pi, size=3)], axis=1)
        family = fams[int(rng.integers(len(fams)))]
        texture = make_texture(rng, family, tile // 2, tcfg)
        tex_offset = rng.uniform(0, tile // 2, size=2)
        angle = rng.uniform(0, 2 * math.pi) + math.radians(rng.uniform(-1, 1) * mo["max_rotation_deg"]) * t
        scale = np.exp(rng.uniform(-1, 1) * mo["max_scale_rate"] * t)
        if rng.uniform() < mo["cross_edge_prob"] and mo["max_speed"] > 0:
            # the sprite's centre sits on a random point of the frame border at a random mid-video time
            t_c = rng.uniform(0.25, 0.75) * (n_t - 1)
            side = int(rng.integers(4))
            s = rng.uniform(0.1, 0.9)
            edge = [np.array([s * w, 0.0]), np.array([s * w, float(h)]),
                    np.array([0.0, s * h]), np.array([float(w), s * h])][side]
            path, _ = _trajectory(rng, t, np.zeros(2), mo["max_speed"])
            # world point under that border pixel at t_c, minus the path's displacement at t_c
            t_lo = int(math.floor(t_c))
            frac = t_c - t_lo
            t_hi = min(t_lo + 1, n_t - 1)
            w_edge = (1 - frac) * world_from_screen(scene, edge, t_lo) + frac * world_from_screen(scene, edge, t_hi)
            disp = (1 - frac) * path[t_lo] + frac * path[t_hi]
            pos = path + (w_edge - disp)
        else:
            start = np.array([rng.uniform(-0.1, 1.1) * w, rng.uniform(-0.1, 1.1) * h])
            pos, _ = _trajectory(rng, t, world_from_screen(scene, start, 0), mo["max_speed"])
        scene.sprites.append(Sprite(shape=shape, half=half, texture=texture, tex_offset=tex_offset, pos=pos,
                                    angle=angle, scale=scale, harmonics=harmonics, family=family))
    return scene


# ------------------------------------------------------------------------------------------- rendering

def render_frame(scene: Scene, t: int) -> np.ndarray:
    """Render frame ``t`` as float32 [H, W, 3] in [0, 1] (back to front, anti-aliased sprite edges).

    ``I(x) = B(w(x))`` then for each sprite k, bottom to top, ``I <- I + alpha_k (S_k(u_k(x)) - I)`` with
    ``alpha_k = clip(0.5 - D_k(x, t), 0, 1)``, evaluated at pixel centres.
    """
    h, w = scene.height, scene.width
    ys, xs = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    pix = np.stack([xs, ys], axis=-1)                                  # [H, W, 2] raster centres
    img = sample_texture(scene.background, world_from_screen(scene, pix, t))
    for sp in scene.sprites:
        # bounding box of the sprite on screen, 2 px padding for the anti-aliased edge
        centre = screen_from_world(scene, sp.pos[t], t)
        rad = _local_extent(sp) * sp.scale[t] * scene.camera.zoom[t] + 2.0
        x0, x1 = max(int(math.floor(centre[0] - rad)), 0), min(int(math.ceil(centre[0] + rad)), w)
        y0, y1 = max(int(math.floor(centre[1] - rad)), 0), min(int(math.ceil(centre[1] + rad)), h)
        if x0 >= x1 or y0 >= y1:
            continue
        sub = pix[y0:y1, x0:x1]
        u = local_from_world(sp, world_from_screen(scene, sub, t), t)
        d = shape_sdf(sp, u) * (scene.camera.zoom[t] * sp.scale[t])
        alpha = np.clip(0.5 - d, 0.0, 1.0).astype(np.float32)[..., None]
        if not alpha.any():
            continue
        col = sample_texture(sp.texture, u + sp.tex_offset)
        img[y0:y1, x0:x1] += alpha * (col - img[y0:y1, x0:x1])
    return img


def render_video(scene: Scene) -> np.ndarray:
    """All frames, float32 [T, H, W, 3] in [0, 1]."""
    return np.stack([render_frame(scene, t) for t in range(scene.num_frames)])


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """``round(clip(I, 0, 1) * 255)`` as uint8."""
    return np.round(np.clip(frames, 0.0, 1.0) * 255.0).astype(np.uint8)


# ------------------------------------------------------------------------------------------- tracks

@dataclass
class SurfacePoints:
    """Points attached to surfaces: ``surface`` 0 = background, k >= 1 = sprite k-1; ``coords`` are world
    (background) or sprite-local (sprites) coordinates; ``sample_frame`` where the point was drawn."""

    surface: np.ndarray       # int32 [N]
    coords: np.ndarray        # float64 [N, 2]
    sample_frame: np.ndarray  # int32 [N]


def track_points(scene: Scene, pts: SurfacePoints) -> tuple[np.ndarray, np.ndarray]:
    """Exact screen positions float64 [N, T, 2] (raster px) and occlusion bool [N, T] of surface points.

    ``occluded[n, t] = x outside [0, W) x [0, H)  or  any_{k above surface(n)} D_k(x_nt, t) < 0``.
    """
    n_t = scene.num_frames
    n = len(pts.surface)
    pos = np.zeros((n, n_t, 2))
    occ = np.zeros((n, n_t), dtype=bool)
    t_all = np.arange(n_t)
    for i in range(n):
        s = int(pts.surface[i])
        c = np.broadcast_to(pts.coords[i], (n_t, 2))
        w = c if s == 0 else world_from_local(scene.sprites[s - 1], c, t_all)
        x = screen_from_world(scene, w, t_all)                              # [T, 2]
        pos[i] = x
        o = (x[:, 0] < 0) | (x[:, 0] >= scene.width) | (x[:, 1] < 0) | (x[:, 1] >= scene.height)
        for k in range(s, len(scene.sprites)):                               # sprites above surface s
            o |= sprite_distance(scene, k, x, t_all) < 0
        occ[i] = o
    return pos, occ


def point_colours(scene: Scene, pts: SurfacePoints) -> np.ndarray:
    """Each point's own texture colour, float32 [N, 3] (constant over time: brightness constancy)."""
    out = np.zeros((len(pts.surface), 3), dtype=np.float32)
    for i, (s, c) in enumerate(zip(pts.surface, pts.coords)):
        if s == 0:
            out[i] = sample_texture(scene.background, c[None])[0]
        else:
            sp = scene.sprites[int(s) - 1]
            out[i] = sample_texture(sp.texture, (c + sp.tex_offset)[None])[0]
    return out


def sample_points(scene: Scene, num: int, sprite_fraction: float, margin: float,
                  rng: np.random.Generator) -> SurfacePoints:
    """Draw ``num`` points, each visible at its (uniformly drawn) sampling frame.

    Candidates are uniform over the frame at a random frame; a candidate is kept when no sprite outline
    lies within ``margin`` px (``|D_k| >= margin`` for all k) so its surface is unambiguous. The topmost
    sprite with ``D_k < 0`` owns it (else the background). ``round(num * sprite_fraction)`` points are
    reserved for sprites; if sprites are too rare to fill that quota, the rest go to the background.
    """
    h, w = scene.height, scene.width
    n_t = scene.num_frames
    n_sp_target = int(round(num * sprite_fraction)) if scene.sprites else 0
    n_bg_target = num - n_sp_target
    got_bg: list[tuple[int, np.ndarray, int]] = []
    got_sp: list[tuple[int, np.ndarray, int]] = []
    for attempt in range(200):
        if len(got_bg) + len(got_sp) >= num:
            break
        relaxed = attempt >= 100  # one kind is too rare to fill its quota: let the other take the rest
        m = 2048
        ts = rng.integers(0, n_t, size=m)
        xy = np.stack([rng.uniform(margin, w - margin, size=m), rng.uniform(margin, h - margin, size=m)], axis=1)
        top = np.full(m, -1)
        ok = np.ones(m, dtype=bool)
        for k in range(len(scene.sprites)):
            d = sprite_distance(scene, k, xy, ts)
            ok &= np.abs(d) >= margin
            top = np.where(d < 0, k, top)
        for j in np.flatnonzero(ok):
            if len(got_bg) + len(got_sp) >= num:
                break
            tj = int(ts[j])
            if top[j] >= 0 and (len(got_sp) < n_sp_target or relaxed):
                sp = scene.sprites[top[j]]
                got_sp.append((int(top[j]) + 1, local_from_world(sp, world_from_screen(scene, xy[j], tj), tj), tj))
            elif top[j] < 0 and (len(got_bg) < n_bg_target or relaxed):
                got_bg.append((0, world_from_screen(scene, xy[j], tj), tj))
    allp = (got_sp + got_bg)[:num]
    if len(allp) < num:
        raise InputError("synth.points.per_video",
                         f"could only place {len(allp)} of {num} points (scene too cluttered for edge_margin)")
    return _surface_points(allp)


def _surface_points(allp: list[tuple[int, np.ndarray, int]]) -> SurfacePoints:
    """(surface, coords, sample_frame) tuples as ``SurfacePoints``, in a deterministic interleaving: sorted by
    sampling frame, then by surface, draw order otherwise."""
    order = sorted(range(len(allp)), key=lambda i: (allp[i][2], allp[i][0]))
    allp = [allp[i] for i in order]
    return SurfacePoints(surface=np.array([p[0] for p in allp], dtype=np.int32),
                         coords=np.array([p[1] for p in allp], dtype=np.float64).reshape(len(allp), 2),
                         sample_frame=np.array([p[2] for p in allp], dtype=np.int32))


def sample_points_occluded(scene: Scene, num: int, sprite_fraction: float, margin: float, occluded_fraction: float,
                           rng: np.random.Generator, rounds: int = 32) -> SurfacePoints:
    """``num`` points of which ``round(num * occluded_fraction)`` are occluded (or off-frame) in at least one frame
    and the rest in none: rounds of ``sample_points`` candidates are tracked and each kind is kept in draw order
    until its quota is full. Occlusion-rich sets make occlusion accuracy measurable (the plain sampler gives a few
    per cent of occluded entries on short clips). Raises ``InputError`` when ``rounds`` rounds cannot fill a quota.
    """
    n_occ = int(round(num * occluded_fraction))
    want = {True: n_occ, False: num - n_occ}
    kept: dict[bool, list[tuple[int, np.ndarray, int]]] = {True: [], False: []}
    for _ in range(rounds):
        if all(len(kept[k]) >= want[k] for k in kept):
            break
        cand = sample_points(scene, num, sprite_fraction, margin, rng)
        _, occ = track_points(scene, cand)
        for i, o in enumerate(occ.any(axis=1)):
            if len(kept[bool(o)]) < want[bool(o)]:
                kept[bool(o)].append((int(cand.surface[i]), cand.coords[i], int(cand.sample_frame[i])))
    if any(len(kept[k]) < want[k] for k in kept):
        raise InputError("synth.points.occluded_fraction",
                         f"found {len(kept[True])} of {want[True]} occluded and {len(kept[False])} of {want[False]} "
                         f"never-occluded points in {rounds} rounds (scene has too little or too much occlusion)")
    return _surface_points(kept[True] + kept[False])


def generate_video(cfg: dict | None, seed: int, return_scene: bool = False) -> dict:
    """One procedural video with exact tracks.

    Returns ``{"video": uint8 [T, H, W, 3], "points": float32 [N, T, 2] normalised (x, y) = raster px /
    (W, H), "occluded": bool [N, T], "surface": int32 [N], "sample_frame": int32 [N]}`` (plus ``"scene"``
    and ``"surface_points"`` when ``return_scene``). Identical output for identical (cfg, seed).
    """
    c = resolve_config(cfg)
    rng = np.random.default_rng(np.random.SeedSequence(int(seed)))
    scene = sample_scene(c, rng)
    pc = c["points"]
    if pc["occluded_fraction"] is None:
        pts = sample_points(scene, pc["per_video"], pc["sprite_fraction"], pc["edge_margin"], rng)
    else:
        pts = sample_points_occluded(scene, pc["per_video"], pc["sprite_fraction"], pc["edge_margin"],
                                     pc["occluded_fraction"], rng)
    pos, occ = track_points(scene, pts)
    h, w = c["size"]
    out = {
        "video": to_uint8(render_video(scene)),
        "points": (pos / np.array([w, h], dtype=np.float64)).astype(np.float32),
        "occluded": occ,
        "surface": pts.surface,
        "sample_frame": pts.sample_frame,
    }
    if return_scene:
        out["scene"] = scene
        out["surface_points"] = pts
    return out


# ------------------------------------------------------------------------------------------- files

def video_seed(seed: int, index: int) -> int:
    """Per-video seed derived from the set seed: first word of ``SeedSequence([seed, index])``."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint32)[0])


def write_mp4(path: str | Path, video: np.ndarray, vcfg: dict) -> None:
    """Encode uint8 [T, H, W, 3] RGB frames with PyAV (libx264 by default), published atomically."""
    import av

    path = Path(path)
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream(vcfg["codec"], rate=int(round(vcfg["fps"])))
            stream.width = int(video.shape[2])
            stream.height = int(video.shape[1])
            stream.pix_fmt = vcfg["pix_fmt"]
            stream.options = {"crf": str(vcfg["crf"]), "preset": str(vcfg["preset"]), "threads": "1"}
            for frame in video:
                vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
                for packet in stream.encode(vf):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)


def hashed_config(c: dict) -> dict:
    """A synth config as hashed: keys added later are left out while they hold their no-op default, so sets (and
    train-teacher work dirs and bundles recording their hash) made before those keys existed keep their hash."""
    h = copy.deepcopy(c)
    pts = h.get("points")
    if isinstance(pts, dict) and pts.get("occluded_fraction") is None:
        pts.pop("occluded_fraction", None)
    return h


def write_set(out_dir: str | Path, cfg: dict | None = None, progress: bool = False) -> dict:
    """Write ``num_videos`` videos (``<name>.mp4`` + ``<name>.npz``) and ``index.json`` into ``out_dir``.

    Idempotent: when ``index.json`` already records the same config hash and every file is present, nothing
    is rewritten. Every file is published atomically and ``index.json`` last, so a set with an index is whole.
    Returns the index.
    """
    c = resolve_config(cfg)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(out, "output exists and is not a directory")
    chash = config_hash(hashed_config(c))
    idx_path = out / "index.json"
    old: dict | None = None
    if idx_path.is_file():
        try:
            old = json.loads(idx_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = None
        if (isinstance(old, dict) and old.get("kind") == "synthetic" and old.get("config_hash") == chash
                and all((out / f"{n}.npz").is_file() and (out / f"{n}.mp4").is_file() for n in old.get("names", []))):
            return old
    out.mkdir(parents=True, exist_ok=True)
    if idx_path.exists():   # a different set is being replaced: unpublish it first, so a crash leaves no index
        idx_path.unlink()
    names = [f"{c['name_prefix']}_{i:04d}" for i in range(c["num_videos"])]
    files = {}
    it = range(len(names))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="synth", unit="video")
    for i in it:
        name = names[i]
        seed_i = video_seed(c["seed"], i)
        v = generate_video(c, seed_i)
        _write_npz(out / f"{name}.npz", {k: v[k] for k in ("video", "points", "occluded", "surface", "sample_frame")})
        write_mp4(out / f"{name}.mp4", v["video"], c["video"])
        files[name] = {"npz": f"{name}.npz", "mp4": f"{name}.mp4", "seed": seed_i,
                       "npz_sha256": sha256_file(out / f"{name}.npz"), "mp4_sha256": sha256_file(out / f"{name}.mp4"),
                       "num_points": int(v["points"].shape[0]), "num_frames": int(v["video"].shape[0])}
    if isinstance(old, dict):  # drop files of a previous, different set in the same folder
        for n in old.get("names", []):
            if n not in files:
                for ext in ("npz", "mp4"):
                    (out / f"{n}.{ext}").unlink(missing_ok=True)
    index = {
        "kind": "synthetic",
        "format_version": FORMAT_VERSION,
        "names": names,
        "config": c,
        "config_hash": chash,
        "seed": c["seed"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
        "convention": "points normalised (x, y) = raster px / (W, H); pixel i spans [i, i+1), centre i + 0.5",
    }
    atomic_write_json(idx_path, index)
    return index


def _check_arrays(where: str, d: dict[str, np.ndarray]) -> None:
    for key in ("video", "points", "occluded"):
        if key not in d:
            raise InputError(where, f"missing array {key!r}")
    v, p, o = d["video"], d["points"], d["occluded"]
    if v.dtype != np.uint8 or v.ndim != 4 or v.shape[-1] != 3:
        raise InputError(where, f"video must be uint8 [T, H, W, 3], got {v.dtype} {v.shape}")
    if p.dtype != np.float32 or p.ndim != 3 or p.shape[-1] != 2:
        raise InputError(where, f"points must be float32 [N, T, 2], got {p.dtype} {p.shape}")
    if o.dtype != np.bool_ or o.shape != p.shape[:2]:
        raise InputError(where, f"occluded must be bool {list(p.shape[:2])}, got {o.dtype} {o.shape}")
    if p.shape[1] != v.shape[0]:
        raise InputError(where, f"points cover {p.shape[1]} frames but the video has {v.shape[0]}")
    if not np.all(np.isfinite(p)):
        raise InputError(where, "points contain NaN or inf")


def load_set(path: str | Path, max_videos: int | None = None) -> list[dict]:
    """Read a set written by ``write_set``: ``[{name, video, points, occluded, surface?}]``.

    npz files are opened with ``allow_pickle=False``; shapes and dtypes are checked (``InputError`` otherwise).
    """
    d = Path(path)
    idx_path = d / "index.json"
    if not idx_path.is_file():
        raise InputError(d, "not a synthetic set (no index.json)")
    try:
        index = json.loads(idx_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(idx_path, f"not valid JSON: {e}") from None
    if not isinstance(index, dict) or index.get("kind") != "synthetic" or not isinstance(index.get("names"), list):
        raise InputError(idx_path, "not a synthetic-set index (kind/names missing)")
    names = index["names"][: max_videos if max_videos is not None else None]
    out = []
    for name in names:
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            raise InputError(idx_path, f"bad video name {name!r}")
        f = d / f"{name}.npz"
        if not f.is_file():
            raise InputError(f, "listed in index.json but missing")
        try:
            with np.load(f, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except ValueError as e:
            raise InputError(f, f"cannot read without pickle: {e}") from None
        except (OSError, EOFError, KeyError) as e:
            raise InputError(f, f"unreadable npz: {e}") from None
        _check_arrays(str(f), arrays)
        item = {"name": name, "video": arrays["video"], "points": arrays["points"], "occluded": arrays["occluded"]}
        if "surface" in arrays:
            item["surface"] = arrays["surface"]
        out.append(item)
    return out


# ------------------------------------------------------------------------------------------- CLI

def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="output folder for <name>.mp4, <name>.npz and index.json")
    parser.add_argument("--num-videos", type=int, default=None, help="override num_videos")
    parser.add_argument("--seed", type=int, default=None, help="override seed")


def run(args, cfg) -> int:
    cfg = copy.deepcopy(cfg)
    if args.num_videos is not None:
        cfg["num_videos"] = args.num_videos
    if args.seed is not None:
        cfg["seed"] = args.seed
    t0 = time.perf_counter()
    index = write_set(args.out, cfg, progress=True)
    n_pts = sum(f["num_points"] for f in index["files"].values())
    print(f"synthetic set {args.out}: {len(index['names'])} videos, {n_pts} tracks, "
          f"config {index['config_hash']} ({time.perf_counter() - t0:.1f} s)")
    return 0
