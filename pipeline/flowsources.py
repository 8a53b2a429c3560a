"""Flow sources: anything that can say where points of one frame went in another frame.

One small interface (``FlowSource``) serves dense optical flow, sparse trackers and the teacher alike::

    source.track(frame0, frame1, points) -> (targets, visible)
        frame0, frame1 : uint8 [H, W, 3] RGB
        points         : float32 [N, 2] raster (x, y) in frame0 — pixel i spans [i, i+1), centre i + 0.5
        targets        : float32 [N, 2] raster (x, y) in frame1
        visible        : bool [N]   (False = the source believes the point is occluded in frame1)

``DenseFlowSource`` implements ``track`` from a dense field ``flow(frame0, frame1) -> float32 [H, W, 2]``
(``flow[i, j]`` = displacement (dx, dy) of the pixel centre (j + 0.5, i + 0.5)) by bilinear sampling at the
points. Built here: ``zero``, ``dis`` (OpenCV DIS) and ``farneback`` (OpenCV Farnebäck); none needs weights.

Later sources register themselves with ``register_flow_source(name, factory, defaults)``; a factory may also
be given lazily as ``"package.module:function"`` so that heavy imports happen only when it is used.
"""
from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

from .common import InputError


@runtime_checkable
class FlowSource(Protocol):
    """Where do ``points`` of ``frame0`` lie in ``frame1``? (shapes in the module docstring)."""

    name: str

    def track(self, frame0: np.ndarray, frame1: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ...


def bilinear_sample(field: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Sample ``field`` [H, W, C] at raster points [N, 2] (x, y) with bilinear interpolation.

    Raster convention: sample ``field[i, j]`` sits at (x, y) = (j + 0.5, i + 0.5), so with
    ``u = x - 0.5``, ``v = y - 0.5``, ``j0 = floor(u)``, ``a = u - j0`` (and likewise i0, b)::

        out = (1-a)(1-b) f[i0, j0] + a(1-b) f[i0, j0+1] + (1-a) b f[i0+1, j0] + a b f[i0+1, j0+1]

    Indices are clamped to the array (constant extension of the border samples). Returns float32 [N, C]
    (float64 arithmetic inside).
    """
    field = np.asarray(field)
    if field.ndim == 2:
        field = field[..., None]
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    h, w = field.shape[:2]
    u = np.clip(pts[:, 0] - 0.5, 0.0, w - 1.0)
    v = np.clip(pts[:, 1] - 0.5, 0.0, h - 1.0)
    j0 = np.minimum(np.floor(u).astype(np.int64), max(w - 2, 0))
    i0 = np.minimum(np.floor(v).astype(np.int64), max(h - 2, 0))
    j1 = np.minimum(j0 + 1, w - 1)
    i1 = np.minimum(i0 + 1, h - 1)
    a = (u - j0)[:, None]
    b = (v - i0)[:, None]
    f = field.astype(np.float64, copy=False)
    out = ((1 - a) * (1 - b) * f[i0, j0] + a * (1 - b) * f[i0, j1]
           + (1 - a) * b * f[i1, j0] + a * b * f[i1, j1])
    return out.astype(np.float32)


def _check_frames(frame0: np.ndarray, frame1: np.ndarray, points: np.ndarray) -> np.ndarray:
    for nm, fr in (("frame0", frame0), ("frame1", frame1)):
        if not isinstance(fr, np.ndarray) or fr.dtype != np.uint8 or fr.ndim != 3 or fr.shape[2] != 3:
            raise InputError(nm, f"expected uint8 [H, W, 3], got {getattr(fr, 'dtype', type(fr))} "
                                 f"{getattr(fr, 'shape', '')}")
    if frame0.shape != frame1.shape:
        raise InputError("frame1", f"shape {frame1.shape} differs from frame0 {frame0.shape}")
    pts = np.asarray(points, dtype=np.float32)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise InputError("points", f"expected float32 [N, 2], got shape {pts.shape}")
    if not np.all(np.isfinite(pts)):
        raise InputError("points", "contains NaN or inf")
    return pts


@dataclass
class DenseFlowSource:
    """Base class: ``track`` = bilinear sample of ``flow(frame0, frame1)`` at the points.

    Visibility: all points visible unless ``fb_check`` is on. Then a point is visible iff its target lies
    inside frame1 and the forward-backward residual is small (Sundaram et al. 2010)::

        w = F(p),  w' = B(p + w),  visible  <=>  |w + w'|^2 < fb_rel * (|w|^2 + |w'|^2) + fb_abs^2
    """

    name: str = "dense"
    fb_check: bool = False
    fb_abs: float = 1.0   # px
    fb_rel: float = 0.01

    def flow(self, frame0: np.ndarray, frame1: np.ndarray) -> np.ndarray:  # float32 [H, W, 2]
        raise NotImplementedError(f"{type(self).__name__} must implement flow()")

    def track(self, frame0: np.ndarray, frame1: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pts = _check_frames(frame0, frame1, points)                  # [N, 2]
        fwd = self.flow(frame0, frame1)                              # [H, W, 2]
        w = bilinear_sample(fwd, pts).astype(np.float64)             # [N, 2]
        targets = pts.astype(np.float64) + w
        visible = np.ones(len(pts), dtype=bool)
        if self.fb_check:
            h, wd = frame1.shape[:2]
            bwd = self.flow(frame1, frame0)
            wb = bilinear_sample(bwd, targets).astype(np.float64)
            res = np.sum((w + wb) ** 2, axis=1)
            tol = self.fb_rel * (np.sum(w ** 2, axis=1) + np.sum(wb ** 2, axis=1)) + self.fb_abs ** 2
            inside = ((targets[:, 0] >= 0) & (targets[:, 0] < wd) & (targets[:, 1] >= 0) & (targets[:, 1] < h))
            visible = (res < tol) & inside
        return targets.astype(np.float32), visible


def _gray(frame: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)


@dataclass
class ZeroFlow(DenseFlowSource):
    """Every point stays where it was: ``F(p) = 0``. The floor any real source must beat."""

    name: str = "zero"

    def flow(self, frame0: np.ndarray, frame1: np.ndarray) -> np.ndarray:
        return np.zeros(frame0.shape[:2] + (2,), dtype=np.float32)


@dataclass
class DISFlow(DenseFlowSource):
    """OpenCV Dense Inverse Search (Kroeger et al. 2016) on grey frames. ``preset``: ultrafast|fast|medium."""

    name: str = "dis"
    preset: str = "medium"
    threads: int = 1

    def __post_init__(self) -> None:
        import cv2

        presets = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
                   "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}
        if self.preset not in presets:
            raise InputError("dis.preset", f"unknown preset {self.preset!r} (known: {', '.join(presets)})")
        cv2.setNumThreads(int(self.threads))
        self._dis = cv2.DISOpticalFlow_create(presets[self.preset])

    def flow(self, frame0: np.ndarray, frame1: np.ndarray) -> np.ndarray:
        f = self._dis.calc(_gray(frame0), _gray(frame1), None)
        return np.asarray(f, dtype=np.float32)


@dataclass
class FarnebackFlow(DenseFlowSource):
    """OpenCV Farnebäck polynomial-expansion flow (Farnebäck 2003) on grey frames."""

    name: str = "farneback"
    pyr_scale: float = 0.5
    levels: int = 4
    winsize: int = 15
    iterations: int = 3
    poly_n: int = 5
    poly_sigma: float = 1.2
    threads: int = 1

    def __post_init__(self) -> None:
        import cv2

        cv2.setNumThreads(int(self.threads))

    def flow(self, frame0: np.ndarray, frame1: np.ndarray) -> np.ndarray:
        import cv2

        f = cv2.calcOpticalFlowFarneback(_gray(frame0), _gray(frame1), None, self.pyr_scale, self.levels,
                                         self.winsize, self.iterations, self.poly_n, self.poly_sigma, 0)
        return np.asarray(f, dtype=np.float32)


def _dataclass_factory(cls) -> Callable[[dict], FlowSource]:
    def factory(cfg: dict) -> FlowSource:
        fields = set(cls.__dataclass_fields__) - {"name"}
        unknown = sorted(set(cfg) - fields)
        if unknown:
            raise InputError(f"flow source {cls.name}", f"unknown option(s) {unknown} (known: {sorted(fields)})")
        return cls(**cfg)

    return factory


make_zero = _dataclass_factory(ZeroFlow)
make_dis = _dataclass_factory(DISFlow)
make_farneback = _dataclass_factory(FarnebackFlow)

# name -> factory(cfg) or "module:function" (imported on first use)
FLOW_SOURCES: dict[str, Callable[[dict], FlowSource] | str] = {
    "zero": make_zero,
    "dis": make_dis,
    "farneback": make_farneback,
}

# name -> default options (what ``--set sources.<name>.<key>=...`` may change)
FLOW_SOURCE_DEFAULTS: dict[str, dict] = {
    "zero": {},
    "dis": {"preset": "medium", "fb_check": False, "fb_abs": 1.0, "fb_rel": 0.01, "threads": 1},
    "farneback": {"pyr_scale": 0.5, "levels": 4, "winsize": 15, "iterations": 3, "poly_n": 5,
                  "poly_sigma": 1.2, "fb_check": False, "fb_abs": 1.0, "fb_rel": 0.01, "threads": 1},
}


def register_flow_source(name: str, factory: Callable[[dict], FlowSource] | str,
                         defaults: dict | None = None, *, overwrite: bool = False) -> None:
    """Add a source to the registry. ``factory(cfg) -> FlowSource`` or a lazy ``"module:function"``."""
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise InputError(name, "flow source names are letters, digits, '-' and '_'")
    if name in FLOW_SOURCES and not overwrite:
        raise InputError(name, "flow source already registered")
    FLOW_SOURCES[name] = factory
    FLOW_SOURCE_DEFAULTS[name] = dict(defaults or {})


def make_flow_source(name: str, cfg: dict | None = None) -> FlowSource:
    """Build a registered source; ``cfg`` overrides its defaults (unknown keys are an error for built-ins)."""
    if name not in FLOW_SOURCES:
        raise InputError(name, f"unknown flow source (known: {', '.join(sorted(FLOW_SOURCES))})")
    factory = FLOW_SOURCES[name]
    if isinstance(factory, str):
        mod, _, attr = factory.partition(":")
        factory = getattr(importlib.import_module(mod), attr)
        FLOW_SOURCES[name] = factory
    opts = copy.deepcopy(FLOW_SOURCE_DEFAULTS.get(name, {}))
    opts.update(cfg or {})
    return factory(opts)


def available_flow_sources() -> list[str]:
    return sorted(FLOW_SOURCES)


def source_config(name: str) -> dict[str, Any]:
    return copy.deepcopy(FLOW_SOURCE_DEFAULTS.get(name, {}))

from . import teacher_sources as _teacher_sources  # noqa: E402,F401  (registers kltrace, rgbdiff)
