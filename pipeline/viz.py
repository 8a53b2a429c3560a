"""Pictures: flow colour coding, point tracks between two frames, heat-map overlays, atomic PNG output.

All images are uint8 RGB [H, W, 3]. Point coordinates follow the shard convention (raster pixels: pixel
``i`` spans ``[i, i+1)``); drawing converts them to OpenCV's pixel-centre coordinates (``x - 0.5``) with
sub-pixel precision.
"""
from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

from .common import InputError, atomic_write_bytes

_SHIFT = 4                 # OpenCV sub-pixel bits for drawing
OCCLUDED_RGB = (150, 150, 150)
BACKGROUND_RGB = (24, 24, 24)


@lru_cache(maxsize=1)
def _colorwheel() -> np.ndarray:
    """Baker et al. (Middlebury) colour wheel: 55 RGB hues in segments R→Y→G→C→B→M→R, float [55, 3]."""
    segments = ((15, (255, 0, 0), (255, 255, 0)),   # RY
                (6, (255, 255, 0), (0, 255, 0)),    # YG
                (4, (0, 255, 0), (0, 255, 255)),    # GC
                (11, (0, 255, 255), (0, 0, 255)),   # CB
                (13, (0, 0, 255), (255, 0, 255)),   # BM
                (6, (255, 0, 255), (255, 0, 0)))    # MR
    rows = []
    for n, a, b in segments:
        t = np.arange(n, dtype=np.float64)[:, None] / n
        rows.append(np.asarray(a, np.float64) * (1 - t) + np.asarray(b, np.float64) * t)
    return np.concatenate(rows, 0)


def flow_to_color(flow: np.ndarray, max_mag: float | None = None) -> np.ndarray:
    """Flow [..., 2] (u, v) → uint8 RGB [..., 3] on the Middlebury colour wheel.

    Hue encodes direction (right = red, left = cyan-blue, up = yellow-green … as in Baker et al.),
    saturation the magnitude relative to ``max_mag`` (default: the largest finite magnitude); zero flow is
    white, magnitudes beyond ``max_mag`` are darkened. Non-finite vectors are black.
    """
    flow = np.asarray(flow, dtype=np.float64)
    if flow.ndim < 1 or flow.shape[-1] != 2:
        raise InputError(f"flow{tuple(flow.shape)}", "flow must have shape [..., 2]")
    u, v = flow[..., 0], flow[..., 1]
    finite = np.isfinite(u) & np.isfinite(v)
    u = np.where(finite, u, 0.0)
    v = np.where(finite, v, 0.0)
    mag = np.hypot(u, v)
    if max_mag is None:
        max_mag = float(mag.max()) if mag.size else 0.0
    rad = mag / max(float(max_mag), 1e-9)
    wheel = _colorwheel() / 255.0
    ncols = wheel.shape[0]
    a = np.arctan2(-v, -u) / np.pi                 # [-1, 1]
    fk = (a + 1) / 2 * (ncols - 1)
    k0 = np.floor(fk).astype(np.int64) % ncols
    k1 = (k0 + 1) % ncols
    f = (fk - np.floor(fk))[..., None]
    col = (1 - f) * wheel[k0] + f * wheel[k1]      # [..., 3]
    r = rad[..., None]
    col = np.where(r <= 1, 1 - r * (1 - col), col * 0.75)
    col = np.where(finite[..., None], col, 0.0)
    return np.clip(np.round(col * 255), 0, 255).astype(np.uint8)


def _split_tracks(tracks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tracks [N, 6] or (p0 [N, 2], p1 [N, 2], visible [N]) → p0, p1 float64, visible bool."""
    if isinstance(tracks, (tuple, list)) and len(tracks) == 3:
        p0, p1, vis = (np.asarray(t) for t in tracks)
    else:
        t = np.asarray(tracks)
        if t.ndim != 2 or t.shape[1] < 5:
            raise InputError(f"tracks{tuple(t.shape)}", "expected [N, 6] or (p0, p1, visible)")
        p0, p1, vis = t[:, 0:2], t[:, 2:4], t[:, 4]
    p0 = np.asarray(p0, np.float64).reshape(-1, 2)
    p1 = np.asarray(p1, np.float64).reshape(-1, 2)
    vis = np.asarray(vis)
    vis = vis > 0.5 if vis.dtype != bool else vis
    if not (len(p0) == len(p1) == len(vis)):
        raise InputError("tracks", f"p0 {len(p0)}, p1 {len(p1)}, visible {len(vis)} points differ")
    return p0, p1, vis.reshape(-1)


def _as_rgb(img: np.ndarray, name: str) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise InputError(name, f"expected uint8 [H, W, 3], got {img.dtype} {tuple(img.shape)}")
    return img


def _upscale(img: np.ndarray, scale: int) -> np.ndarray:
    return img if scale == 1 else np.repeat(np.repeat(img, scale, 0), scale, 1)


def _pt(p: np.ndarray, scale: int, dx: float = 0.0) -> tuple[int, int]:
    """Raster coordinate → OpenCV fixed-point pixel-centre coordinate."""
    k = 1 << _SHIFT
    return (int(round(((p[0] + dx) * scale - 0.5) * k)), int(round((p[1] * scale - 0.5) * k)))


def _direction_colors(p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """Fully saturated wheel hue of each motion direction (length shows magnitude); zero motion → white."""
    d = p1 - p0
    n = np.hypot(d[:, 0], d[:, 1])[:, None]
    unit = np.where(n > 1e-9, d / np.maximum(n, 1e-9), 0.0)
    return flow_to_color(unit, max_mag=1.0).reshape(-1, 3)


def draw_tracks(frame0: np.ndarray, frame1: np.ndarray, tracks, *, mode: str = "side", scale: int = 1,
                radius: int | None = None) -> np.ndarray:
    """Draw tracks from frame 0 to frame 1; returns uint8 RGB.

    ``tracks``: float [N, 6] (x0, y0, x1, y1, visible, score) or a tuple (p0 [N, 2], p1 [N, 2], visible [N]).
    ``mode="side"``: frame0 | frame1 side by side ([H*s, 2*W*s, 3]): a dot at each query on frame 0; on frame 1
    a line from the query's position to its target (nothing crosses between the panels). ``mode="overlay"``: the
    two frames blended ([H*s, W*s, 3]), an arrow from query to target. Visible tracks are coloured by their
    motion direction (the ``flow_to_color`` wheel at full saturation), filled dot at the query and ring at the
    target; occluded ones are grey, with a cross at the target. ``scale`` enlarges small frames (nearest
    neighbour) before drawing.
    """
    f0, f1 = _as_rgb(frame0, "frame0"), _as_rgb(frame1, "frame1")
    if f0.shape != f1.shape:
        raise InputError("frames", f"frame0 {f0.shape} and frame1 {f1.shape} differ in size")
    if mode not in ("side", "overlay"):
        raise InputError(mode, "mode must be 'side' or 'overlay'")
    import cv2

    scale = max(1, int(scale))
    p0, p1, vis = _split_tracks(tracks)
    h, w = f0.shape[:2]
    if mode == "side":
        canvas = np.concatenate([_upscale(f0, scale), _upscale(f1, scale)], axis=1).copy()
        dx = float(w)
    else:
        blend = (f0.astype(np.uint16) + f1.astype(np.uint16) + 1) // 2
        canvas = _upscale(blend.astype(np.uint8), scale).copy()
        dx = 0.0
    r = radius if radius is not None else max(2, round(1.5 * scale))
    rk = r << _SHIFT
    col = _direction_colors(p0, p1)
    line = cv2.LINE_AA
    for i in np.argsort(vis, kind="stable"):   # occluded first, visible drawn on top
        a, b = _pt(p0[i], scale), _pt(p1[i], scale, dx)
        if dx:                                  # side: the query's dot on frame 0, the track itself on frame 1
            cv2.circle(canvas, a, rk, tuple(int(x) for x in col[i]) if vis[i] else OCCLUDED_RGB, -1, line, _SHIFT)
            a = _pt(p0[i], scale, dx)
        if vis[i]:
            c = tuple(int(x) for x in col[i])
            cv2.line(canvas, a, b, c, 1, line, _SHIFT)
            if mode == "overlay":
                cv2.arrowedLine(canvas, a, b, c, 1, line, _SHIFT, 0.25)
            cv2.circle(canvas, a, rk, c, -1, line, _SHIFT)
            cv2.circle(canvas, b, rk, c, 1, line, _SHIFT)
        else:
            c = OCCLUDED_RGB
            cv2.line(canvas, a, b, c, 1, line, _SHIFT)
            cv2.circle(canvas, a, rk, c, -1, line, _SHIFT)
            cv2.drawMarker(canvas, (b[0] >> _SHIFT, b[1] >> _SHIFT), c, cv2.MARKER_TILTED_CROSS, 2 * r + 1, 1)
    return canvas


def sparse_flow_image(shape: tuple[int, ...], p0, p1=None, visible=None, *, scale: int = 1,
                      max_mag: float | None = None, radius: int | None = None) -> np.ndarray:
    """Colour-coded sparse flow: a dot at each query, coloured by (p1 - p0) on the flow wheel.

    ``shape``: (H, W[, ...]) of the frame; ``p0`` may also be tracks [N, 6]. Occluded points are grey
    rings. Returns uint8 RGB [H*s, W*s, 3] on a dark background.
    """
    import cv2

    p0, p1, vis = _split_tracks(p0 if p1 is None else (p0, p1, visible))
    h, w = int(shape[0]), int(shape[1])
    scale = max(1, int(scale))
    canvas = np.empty((h * scale, w * scale, 3), np.uint8)
    canvas[:] = BACKGROUND_RGB
    col = flow_to_color(p1 - p0, max_mag if max_mag is not None else _max_visible(p0, p1, vis)).reshape(-1, 3)
    r = radius if radius is not None else max(2, round(1.5 * scale))
    for i in np.argsort(vis, kind="stable"):
        a = _pt(p0[i], scale)
        if vis[i]:
            cv2.circle(canvas, a, r << _SHIFT, tuple(int(x) for x in col[i]), -1, cv2.LINE_AA, _SHIFT)
        else:
            cv2.circle(canvas, a, r << _SHIFT, OCCLUDED_RGB, 1, cv2.LINE_AA, _SHIFT)
    return canvas


def _max_visible(p0: np.ndarray, p1: np.ndarray, vis: np.ndarray) -> float:
    d = p1[vis] - p0[vis]
    m = np.hypot(d[:, 0], d[:, 1]) if len(d) else np.zeros(0)
    return float(m.max()) if m.size and m.max() > 0 else 1.0


def heatmap_overlay(frame: np.ndarray, heat: np.ndarray, alpha: float = 0.5,
                    vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Blend a heat map (e.g. a KL map, any [h, w] grid) over ``frame`` with the inferno colour map.

    The map is scaled to [vmin, vmax] (default: its finite min/max), resized to the frame with nearest
    neighbour (so token-grid cells stay visible) and blended with weight ``alpha``. Non-finite → vmin.
    """
    import cv2

    f = _as_rgb(frame, "frame")
    heat = np.asarray(heat, dtype=np.float64)
    if heat.ndim != 2 or heat.size == 0:
        raise InputError(f"heat{tuple(heat.shape)}", "heat map must be a non-empty [h, w] array")
    finite = np.isfinite(heat)
    lo = vmin if vmin is not None else (float(heat[finite].min()) if finite.any() else 0.0)
    hi = vmax if vmax is not None else (float(heat[finite].max()) if finite.any() else 1.0)
    norm = np.where(finite, (heat - lo) / (hi - lo) if hi > lo else 0.0, 0.0)
    u8 = np.clip(np.round(norm * 255), 0, 255).astype(np.uint8)
    u8 = cv2.resize(u8, (f.shape[1], f.shape[0]), interpolation=cv2.INTER_NEAREST)
    color = cv2.applyColorMap(u8, cv2.COLORMAP_INFERNO)[..., ::-1]
    a = float(np.clip(alpha, 0.0, 1.0))
    out = (1 - a) * f.astype(np.float64) + a * color.astype(np.float64)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def caption(img: np.ndarray, text: str, height: int = 18) -> np.ndarray:
    """Put a one-line caption bar above ``img`` (uint8 RGB)."""
    import cv2

    img = _as_rgb(img, "image")
    bar = np.zeros((height, img.shape[1], 3), np.uint8)
    cv2.putText(bar, text, (4, height - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate([bar, img], axis=0)


def save_png(path: str | os.PathLike, img: np.ndarray) -> None:
    """Write uint8 RGB [H, W, 3] (or grey [H, W]) as PNG, atomically."""
    import cv2

    img = np.asarray(img)
    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise InputError(path, f"image must be uint8 [H, W] or [H, W, 3], got {img.dtype} {tuple(img.shape)}")
    arr = img if img.ndim == 2 else np.ascontiguousarray(img[..., ::-1])
    ok, buf = cv2.imencode(".png", arr, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise InputError(path, "OpenCV could not encode the PNG")
    atomic_write_bytes(path, buf.tobytes())
