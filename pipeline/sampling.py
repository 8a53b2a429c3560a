"""Frame-pair and query-point sampling, deterministic for a seed.

Pairs: every candidate ``(t0, t1)`` has ``t0 < t1``, both frames in the same shot (a pair never spans a
cut) and ``t1 - t0`` in the gap range, given in frames (``gap_frames: [a, b]``) or in seconds
(``gap_seconds: [a, b]``, converted with the video's fps). ``pairs_per_video`` distinct candidates are
drawn uniformly without replacement (all of them when there are fewer).

Queries: ``num_points`` pixel-centre points (raster convention: pixel i spans [i, i+1), centre i+0.5),
at least ``border`` pixels from the image edge, split between methods by the fractions in ``mix``:
``grid`` (regular lattice over the interior), ``random`` (uniform over interior pixels) and ``corners``
(``cv2.goodFeaturesToTrack``; topped up with random pixels when the image has too few corners). A pixel
is used at most once. Per-video / per-pair seeds come from :func:`derive_seed`, a stable hash, so the
result does not depend on processing order, process or machine.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Sequence

import numpy as np

from .common import InputError

# Keep in sync with configs/label/sampling_default.yaml (its ``sampling:`` mapping); a test checks.
DEFAULTS: dict[str, Any] = {
    "pairs_per_video": 8,
    "gap_frames": [1, 8],
    "gap_seconds": None,          # [a, b] in seconds; when set it replaces gap_frames
    "num_points": 256,
    "mix": {"grid": 0.25, "random": 0.25, "corners": 0.5},
    "border": 4,
    "corner_quality": 0.01,       # cv2.goodFeaturesToTrack qualityLevel
    "corner_min_distance": 4,     # cv2.goodFeaturesToTrack minDistance (px)
}

METHODS = ("grid", "random", "corners")


def derive_seed(base_seed: int, *parts: Any) -> int:
    """A seed in [0, 2**63) from ``base_seed`` and any JSON-able parts (ids, frame numbers, names)."""
    blob = json.dumps([int(base_seed), *parts], sort_keys=True, separators=(",", ":"), default=str)
    return int.from_bytes(hashlib.sha256(blob.encode("utf-8")).digest()[:8], "little") & ((1 << 63) - 1)


def _cfg(cfg: dict | None) -> dict:
    out = dict(DEFAULTS)
    if cfg:
        out.update(cfg)
    return out


def _range(cfg: dict, key: str, kind) -> tuple:
    value = cfg[key]
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise InputError(f"sampling.{key}", f"must be [min, max], got {value!r}")
    try:
        a, b = kind(value[0]), kind(value[1])
    except (TypeError, ValueError):
        raise InputError(f"sampling.{key}", f"must be two numbers, got {value!r}") from None
    if not (0 < a <= b):
        raise InputError(f"sampling.{key}", f"must satisfy 0 < min <= max, got {value!r}")
    return a, b


def gap_range(cfg: dict, fps: float) -> tuple[int, int]:
    """The gap range in frames: ``gap_seconds`` × fps (rounded, at least 1) or ``gap_frames``."""
    cfg = _cfg(cfg)
    if cfg.get("gap_seconds") is not None:
        a, b = _range(cfg, "gap_seconds", float)
        if not fps or fps <= 0:
            raise InputError("sampling.gap_seconds", f"needs a positive fps, got {fps!r}")
        lo = max(1, int(round(a * fps)))
        hi = max(lo, int(round(b * fps)))
        return lo, hi
    a, b = _range(cfg, "gap_frames", int)
    if a != cfg["gap_frames"][0] or b != cfg["gap_frames"][1]:
        raise InputError("sampling.gap_frames", f"must be integers, got {cfg['gap_frames']!r}")
    return a, b


def _shots(num_frames: int, shots) -> list[tuple[int, int]]:
    if shots is None:
        return [(0, num_frames)]
    out = []
    for s in shots:
        a, b = int(s[0]), min(int(s[1]), num_frames)
        if a < 0 or int(s[1]) < a:
            raise InputError("shots", f"bad shot range {tuple(s)!r}")
        if b > a:
            out.append((a, b))
    return out


def sample_pairs(num_frames: int, fps: float, cfg: dict | None, seed: int,
                 shots: Sequence[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """Sorted distinct frame pairs ``(t0, t1)``, ``t0 < t1``, same shot, gap in range (module docstring).

    ``shots``: frame ranges [start, end) without cuts (None: the whole video is one shot); ranges are
    clipped to ``num_frames``. Returns ``[]`` when the video is too short for any pair.
    """
    cfg = _cfg(cfg)
    k = cfg["pairs_per_video"]
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise InputError("sampling.pairs_per_video", f"must be an integer >= 1, got {k!r}")
    lo, hi = gap_range(cfg, fps)
    # Candidate blocks: for each shot of length L and each gap g, there are L - g pairs.
    blocks = []                                   # (shot_start, gap, count)
    for a, b in _shots(int(num_frames), shots):
        length = b - a
        for g in range(lo, min(hi, length - 1) + 1):
            blocks.append((a, g, length - g))
    if not blocks:
        return []
    counts = np.array([c for _, _, c in blocks], dtype=np.int64)
    ends = np.cumsum(counts)                     # [n_blocks]
    total = int(ends[-1])
    rng = np.random.default_rng(seed)
    picks = rng.choice(total, size=min(k, total), replace=False) if k < total else np.arange(total)
    pairs = []
    for v in np.sort(picks):
        j = int(np.searchsorted(ends, v, side="right"))
        start, g, _ = blocks[j]
        offset = int(v - (ends[j] - counts[j]))
        t0 = start + offset
        pairs.append((t0, t0 + g))
    return sorted(pairs)


def _split_counts(n: int, mix: dict) -> dict[str, int]:
    """Largest-remainder split of ``n`` points by the (normalised) fractions in ``mix``."""
    unknown = [m for m in mix if m not in METHODS]
    if unknown:
        raise InputError("sampling.mix", f"unknown method(s) {unknown} (known: {', '.join(METHODS)})")
    fr = {m: float(mix.get(m) or 0.0) for m in METHODS}
    if any(v < 0 for v in fr.values()) or sum(fr.values()) <= 0:
        raise InputError("sampling.mix", f"fractions must be >= 0 with a positive sum, got {mix!r}")
    total = sum(fr.values())
    exact = {m: n * v / total for m, v in fr.items()}
    counts = {m: int(math.floor(x)) for m, x in exact.items()}
    rest = n - sum(counts.values())
    for m in sorted(METHODS, key=lambda m: (-(exact[m] - counts[m]), METHODS.index(m)))[:rest]:
        counts[m] += 1
    return counts


def _grid(n: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """~n pixel indices (ix, iy) on a lattice spanning the interior box, int64 [<=n, 2]."""
    if n <= 0:
        return np.zeros((0, 2), np.int64)
    cols = max(1, int(round(math.sqrt(n * w / h))))
    rows = max(1, int(math.ceil(n / cols)))
    cols, rows = min(cols, w), min(rows, h)
    while rows * cols < n and (rows < h or cols < w):
        if cols < w and (cols * h <= rows * w or rows >= h):
            cols += 1
        else:
            rows += 1
    xs = x0 + np.floor((np.arange(cols) + 0.5) * w / cols).astype(np.int64)
    ys = y0 + np.floor((np.arange(rows) + 0.5) * h / rows).astype(np.int64)
    gx, gy = np.meshgrid(xs, ys)
    pts = np.stack([gx.ravel(), gy.ravel()], 1)            # [rows*cols, 2], row-major
    if len(pts) > n:                                         # thin evenly to exactly n
        keep = np.floor((np.arange(n) + 0.5) * len(pts) / n).astype(np.int64)
        pts = pts[keep]
    return pts


def _corners(frame: np.ndarray, n: int, x0: int, y0: int, w: int, h: int, cfg: dict) -> np.ndarray:
    """Up to n strongest Shi-Tomasi corners inside the interior box, as pixel indices int64 [<=n, 2]."""
    if n <= 0:
        return np.zeros((0, 2), np.int64)
    import cv2

    gray = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
    mask = np.zeros(gray.shape, np.uint8)
    mask[y0:y0 + h, x0:x0 + w] = 255
    found = cv2.goodFeaturesToTrack(gray, maxCorners=int(n), qualityLevel=float(cfg["corner_quality"]),
                                    minDistance=float(cfg["corner_min_distance"]), mask=mask)
    if found is None:
        return np.zeros((0, 2), np.int64)
    pts = np.rint(found.reshape(-1, 2)).astype(np.int64)   # OpenCV: pixel i has centre i
    pts[:, 0] = np.clip(pts[:, 0], x0, x0 + w - 1)
    pts[:, 1] = np.clip(pts[:, 1], y0, y0 + h - 1)
    return pts


def sample_queries(frame: np.ndarray, cfg: dict | None, seed: int) -> np.ndarray:
    """Query points for ``frame`` (uint8 [H, W, 3]) → float32 [N, 2] (x, y) at pixel centres.

    N = ``num_points`` unless the interior has fewer pixels (then every interior pixel once). Order:
    grid points, then random, then corners (each block as produced). Deterministic for (frame, cfg, seed).
    """
    cfg = _cfg(cfg)
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise InputError("frame", f"expected an RGB image [H, W, 3], got shape {frame.shape}")
    n = cfg["num_points"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InputError("sampling.num_points", f"must be an integer >= 1, got {n!r}")
    border = cfg["border"]
    if not isinstance(border, int) or border < 0:
        raise InputError("sampling.border", f"must be an integer >= 0, got {border!r}")
    H, W = frame.shape[:2]
    bx, by = min(border, (W - 1) // 2), min(border, (H - 1) // 2)     # keep at least one pixel
    x0, y0, w, h = bx, by, W - 2 * bx, H - 2 * by
    n = min(n, w * h)
    counts = _split_counts(n, cfg["mix"])
    rng = np.random.default_rng(seed)

    taken = np.zeros((h, w), bool)               # interior pixels already used

    def keep_new(pts: np.ndarray) -> np.ndarray:
        out = []
        for x, y in pts:
            if not taken[y - y0, x - x0]:
                taken[y - y0, x - x0] = True
                out.append((x, y))
        return np.array(out, np.int64).reshape(-1, 2)

    def random_fill(m: int) -> np.ndarray:
        if m <= 0:
            return np.zeros((0, 2), np.int64)
        free = np.flatnonzero(~taken.ravel())
        pick = np.sort(rng.choice(free, size=min(m, len(free)), replace=False)) if m < len(free) else free
        pick = rng.permutation(pick)
        pts = np.stack([pick % w + x0, pick // w + y0], 1)
        taken.ravel()[pick] = True
        return pts

    # Corners first (they are the scarce kind), then the grid, then random fills the rest.
    corners = keep_new(_corners(frame, counts["corners"], x0, y0, w, h, cfg))
    grid = keep_new(_grid(counts["grid"], x0, y0, w, h))
    n_random = counts["random"] + (counts["grid"] - len(grid))
    corner_fill = counts["corners"] - len(corners)
    random_pts = random_fill(n_random)
    corners = np.concatenate([corners, random_fill(corner_fill)], 0)
    pts = np.concatenate([grid, random_pts, corners], 0)    # [N, 2] pixel indices
    return (pts.astype(np.float32) + 0.5).reshape(-1, 2)
