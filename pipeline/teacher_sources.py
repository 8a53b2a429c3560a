"""Teacher flow sources: ``kltrace`` (KL-tracing through ``teacher.engine.KLEngine``) and ``rgbdiff`` (the
RGB-difference variant), registered into ``pipeline.flowsources``' registry when this module is imported.

Options (``--set sources.kltrace.<key>=...``; the same keys for ``rgbdiff`` except ``engine``):
  teacher      teacher bundle directory (``teacher.json`` + weights; required)
  device       torch device for the teacher ("cpu", "cuda", "cuda:1", ...)
  bf16         run the LRAS under bf16 autocast (GPU)
  threads      torch CPU threads (null: leave torch's setting)
  tracer       ``teacher.kltrace.KLTraceConfig`` fields; values still at their defaults are replaced by the
               bundle's own ``tracer`` settings (teacher.json), a value you set that differs from the default wins
  engine       ``KLEngine`` settings (enabled: False runs the naive two-passes-per-query method; teachers of
               kind "tiny" always run the naive method: the engine drives an ``LRASTracer`` only)

``track`` gets uint8 frames of any size and raster points; ``kl_trace`` resizes/crops to the teacher's size.
Nothing heavy is imported until a source is built.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np

from .common import InputError
from teacher.kltrace_config import KLTraceConfig

from .flowsources import FLOW_SOURCES, _check_frames, register_flow_source


TRACER_DEFAULTS: dict[str, Any] = KLTraceConfig().to_dict()   # torch-free import
ENGINE_DEFAULTS: dict[str, Any] = {"enabled": True, "group_size": 32, "batch": 16, "adaptive": True,
                                   "last0": "touched", "fast_kl": True}
COMMON_DEFAULTS: dict[str, Any] = {"teacher": None, "device": "cpu", "bf16": False, "threads": None}

KLTRACE_DEFAULTS: dict[str, Any] = {**COMMON_DEFAULTS, "tracer": dict(TRACER_DEFAULTS),
                                    "engine": dict(ENGINE_DEFAULTS)}
RGBDIFF_DEFAULTS: dict[str, Any] = {**COMMON_DEFAULTS, "tracer": {**TRACER_DEFAULTS, "method": "rgb"}}

_BUNDLES: dict[tuple[str, str, bool], Any] = {}      # (resolved dir, device, bf16) -> tracer (loaded once)


def _merge_section(where: str, defaults: dict, given: Any) -> dict:
    if given is None:
        return dict(defaults)
    if not isinstance(given, dict):
        raise InputError(where, f"must be a mapping, got {type(given).__name__}")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise InputError(where, f"unknown option(s) {unknown} (known: {sorted(defaults)})")
    return {**defaults, **given}


def load_tracer(teacher: Any, device: str = "cpu", bf16: bool = False, where: str = "teacher"):
    """A tracing model for a teacher bundle directory (cached per process): an ``LRASTracer`` for kind "lras", the
    ``TinyTeacher`` for kind "tiny" (``teacher.checkpoints.load_any_teacher``). Bad bundles -> InputError."""
    if teacher in (None, ""):
        raise InputError(where, "no teacher bundle given (a directory holding teacher.json)")
    import torch

    from teacher.checkpoints import CheckpointError, load_any_teacher

    d = Path(str(teacher)).expanduser()
    key = (str(d.resolve()), str(device), bool(bf16))
    if key in _BUNDLES:
        return _BUNDLES[key]
    if not d.is_dir():
        raise InputError(d, "teacher bundle directory not found")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"{where} device", f"bad device {device!r}: {e}") from None
    try:
        tracer = load_any_teacher(d, device=dev, autocast_bf16=bool(bf16))
    except CheckpointError as e:
        raise InputError(d, str(e)) from None
    except (ValueError, TypeError, KeyError) as e:
        raise InputError(d, f"not a usable teacher bundle: {e}") from None
    tracer.bundle_tracer = dict(tracer.bundle_meta.get("tracer") or {})
    _BUNDLES[key] = tracer
    return tracer


def tracer_config(tracer, given: dict, where: str):
    """``KLTraceConfig`` from defaults <- the bundle's tracer settings <- values given that differ from defaults."""
    from teacher.kltrace import KLTraceConfig

    opts = _merge_section(where, TRACER_DEFAULTS, given)
    bundle = {k: v for k, v in (getattr(tracer, "bundle_tracer", None) or {}).items() if k in TRACER_DEFAULTS}
    merged = {**TRACER_DEFAULTS, **bundle, **{k: v for k, v in opts.items() if v != TRACER_DEFAULTS[k]}}
    try:
        return KLTraceConfig.from_dict(merged)
    except (ValueError, TypeError) as e:
        raise InputError(where, str(e)) from None


def make_engine(tracer, given: dict | None, where: str):
    """A ``KLEngine`` (or None for the naive method) from the ``engine`` options."""
    opts = _merge_section(where, ENGINE_DEFAULTS, given)
    if not opts["enabled"]:
        return None
    from teacher.engine import KLEngine
    from teacher.tracer import LRASTracer

    if not isinstance(tracer, LRASTracer):       # the KV engine drives an LRASTracer; other kinds run naive
        return None

    try:
        return KLEngine(tracer, group_size=int(opts["group_size"]), batch=int(opts["batch"]),
                        adaptive=bool(opts["adaptive"]), last0=str(opts["last0"]), fast_kl=bool(opts["fast_kl"]))
    except (ValueError, TypeError) as e:
        raise InputError(where, str(e)) from None


class TeacherFlowSource:
    """A ``FlowSource`` backed by a teacher bundle (``kl_trace`` or ``rgb_trace``)."""

    def __init__(self, name: str, opts: dict, method: str):
        self.name = name
        unknown = sorted(set(opts) - set(KLTRACE_DEFAULTS if method == "kl" else RGBDIFF_DEFAULTS))
        if unknown:
            raise InputError(f"flow source {name}", f"unknown option(s) {unknown}")
        if opts.get("threads") is not None:
            import torch

            torch.set_num_threads(int(opts["threads"]))
        self.tracer = load_tracer(opts.get("teacher"), opts.get("device", "cpu"), bool(opts.get("bf16", False)),
                                  where=f"sources.{name}.teacher")
        cfg = self.tracer_cfg = tracer_config(self.tracer, opts.get("tracer"), f"sources.{name}.tracer")
        if (cfg.method == "rgb") != (method == "rgb"):
            import dataclasses

            self.tracer_cfg = dataclasses.replace(cfg, method=method)
        self.engine = make_engine(self.tracer, opts.get("engine"), f"sources.{name}.engine") if method == "kl" else None
        self.last_result = None

    def track(self, frame0: np.ndarray, frame1: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        from teacher.kltrace import kl_maps_naive, kl_trace

        pts = _check_frames(frame0, frame1, points)
        fn = self.engine if self.engine is not None else kl_maps_naive
        res = kl_trace(self.tracer, frame0, frame1, torch.from_numpy(pts.astype(np.float64)), self.tracer_cfg,
                       kl_maps_fn=fn)
        self.last_result = res
        return res.targets.numpy().astype(np.float32), res.visible.numpy().astype(bool)


def make_kltrace(cfg: dict) -> TeacherFlowSource:
    return TeacherFlowSource("kltrace", copy.deepcopy(cfg), "kl")


def make_rgbdiff(cfg: dict) -> TeacherFlowSource:
    return TeacherFlowSource("rgbdiff", copy.deepcopy(cfg), "rgb")


def register() -> None:
    """Add ``kltrace`` and ``rgbdiff`` to the registry (idempotent)."""
    for name, factory, defaults in (("kltrace", "pipeline.teacher_sources:make_kltrace", KLTRACE_DEFAULTS),
                                    ("rgbdiff", "pipeline.teacher_sources:make_rgbdiff", RGBDIFF_DEFAULTS)):
        if name not in FLOW_SOURCES:
            register_flow_source(name, factory, copy.deepcopy(defaults))


register()
