"""``flowdistill flow --teacher DIR frame0.png frame1.png --points x,y ...``: trace points with a teacher.

Inputs: two images of the same size, or one video and ``--frames t0,t1`` (frame indices, default 0,1).
Points are raster px of the input frames (pixel i spans [i, i+1), centre i + 0.5). The teacher is a bundle
directory (``teacher.json``); tracing is ``teacher.kltrace.kl_trace`` through ``teacher.engine.KLEngine``
(``--set engine.enabled=false``: the naive two passes per query), or the RGB-difference variant with
``--set tracer.method=rgb``.

Prints one line per point: ``x0 y0 -> x1 y1 visible score``. Writes to ``--out``:
  flow.png      frame 0 | frame 1 with each query joined to its predicted target (``viz.draw_tracks``), and frame 1
                under the full-frame mask-averaged KL heat map (each query's map scaled to its own peak, then the
                maximum over queries; the RGB variant shows its difference map)
  targets.json  points, targets, visible, score, teacher id, tracer and engine settings, engine token counts
Config: ``--config configs/teacher/kltrace_*.yaml`` with ``tracer:`` / ``engine:`` sections (plus the keys
below); ``--set tracer.num_masks=1`` etc.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np

from .common import InputError, atomic_write_json
from .teacher_sources import ENGINE_DEFAULTS, TRACER_DEFAULTS

DEFAULTS = {
    "teacher": None,          # teacher bundle directory (or --teacher)
    "out": "flow_out",        # output folder (or --out)
    "device": "cpu",
    "bf16": False,            # LRAS under bf16 autocast (GPU)
    "threads": None,          # torch CPU threads (null: torch's default)
    "tracer": copy.deepcopy(TRACER_DEFAULTS),
    "engine": copy.deepcopy(ENGINE_DEFAULTS),
}


def add_arguments(parser) -> None:
    parser.add_argument("inputs", nargs="+", help="frame0 frame1 (images), or one video with --frames t0,t1")
    parser.add_argument("--teacher", default=None, help="teacher bundle directory (teacher.json + weights)")
    parser.add_argument("--points", nargs="+", default=None, metavar="X,Y",
                        help="query points in raster px of frame 0, e.g. --points 10,12 30.5,20")
    parser.add_argument("--frames", default=None, metavar="T0,T1", help="video input: the two frame indices (0,1)")
    parser.add_argument("--out", default=None, help="output folder (default: flow_out)")


def parse_points(texts, width: int, height: int) -> np.ndarray:
    """["x,y", ...] -> float64 [N, 2]; malformed or outside the W x H image -> InputError naming the point."""
    if not texts:
        raise InputError("--points", "no points given (e.g. --points 10,12 30.5,20)")
    out = []
    for t in texts:
        parts = str(t).split(",")
        try:
            if len(parts) != 2:
                raise ValueError
            x, y = float(parts[0]), float(parts[1])
        except ValueError:
            raise InputError(f"--points {t}", "expected x,y (two numbers separated by a comma)") from None
        if not (math.isfinite(x) and math.isfinite(y)):
            raise InputError(f"--points {t}", "coordinates must be finite")
        if not (0.0 <= x < width and 0.0 <= y < height):
            raise InputError(f"--points {t}", f"outside the {width}x{height} image (x in [0, {width}), "
                                              f"y in [0, {height}))")
        out.append((x, y))
    return np.asarray(out, dtype=np.float64)


def _read_image(path: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise InputError(p, "no such file")
    try:
        with Image.open(p) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(p, f"not a readable image: {e}") from None


def read_frames(inputs, frames_arg) -> tuple[np.ndarray, np.ndarray, str]:
    """(frame0, frame1, description) from two images or a video + indices."""
    from .sources import is_video_name

    if len(inputs) == 1 and is_video_name(str(inputs[0])):
        from .decode import open_video

        spec = frames_arg or "0,1"
        try:
            t0, t1 = (int(v) for v in str(spec).split(","))
        except ValueError:
            raise InputError(f"--frames {spec}", "expected t0,t1 (two frame indices)") from None
        with open_video(inputs[0]) as reader:
            n = reader.num_frames
            for t in (t0, t1):
                if not 0 <= t < n:
                    raise InputError(f"--frames {spec}", f"frame {t} outside the video's {n} frames")
            fr = reader.read([t0, t1])
        return np.ascontiguousarray(fr[0]), np.ascontiguousarray(fr[1]), f"{inputs[0]} frames {t0},{t1}"
    if frames_arg is not None:
        raise InputError("--frames", "only for a single video input")
    if len(inputs) != 2:
        raise InputError(" ".join(map(str, inputs)), "give two images (frame0 frame1) or one video")
    f0, f1 = _read_image(inputs[0]), _read_image(inputs[1])
    if f0.shape != f1.shape:
        raise InputError(inputs[1], f"size {f1.shape[1]}x{f1.shape[0]} differs from {inputs[0]} "
                                    f"({f0.shape[1]}x{f0.shape[0]})")
    return f0, f1, f"{inputs[0]} -> {inputs[1]}"


def kl_heat(maps, level: int = 0) -> np.ndarray | None:
    """[gh, gw] picture map of one level: each query's mask-averaged map divided by its own peak, max over
    queries (NaN where no query has a value)."""
    if not maps:
        return None
    m = maps[min(level, len(maps) - 1)]["kl"]
    if m is None:
        return None
    a = m.detach().cpu().numpy().astype(np.float64)                      # [Q, gh, gw]
    with np.errstate(invalid="ignore", divide="ignore"):
        peak = np.nanmax(np.where(np.isfinite(a), a, -np.inf).reshape(len(a), -1), axis=1)
        norm = a / np.where(peak > 0, peak, 1.0)[:, None, None]
        if np.all(np.isnan(norm)):
            return norm[0]
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmax(norm, axis=0)


def picture(frame0: np.ndarray, frame1: np.ndarray, p0: np.ndarray, p1: np.ndarray, vis: np.ndarray,
            heat: np.ndarray | None, title: str) -> np.ndarray:
    import cv2

    from .viz import caption, draw_tracks, heatmap_overlay

    h, w = frame0.shape[:2]
    scale = max(1, int(256 // max(h, w)))
    tracks = draw_tracks(frame0, frame1, (p0.astype(np.float32), p1.astype(np.float32), vis.astype(bool)),
                         mode="side", scale=scale)
    if heat is not None:
        big = cv2.resize(frame1, (w * scale, h * scale), interpolation=cv2.INTER_NEAREST)
        panel = heatmap_overlay(big, heat, alpha=0.6)
        for x, y in p1:
            cv2.drawMarker(panel, (int(x * scale), int(y * scale)), (0, 255, 255), cv2.MARKER_CROSS,
                           max(9, 4 * scale), 2)
        tracks = np.concatenate([tracks, panel], axis=1)
    return caption(tracks, title)


def run(args, cfg) -> int:
    teacher = args.teacher if args.teacher is not None else cfg["teacher"]
    out = Path(args.out if args.out is not None else cfg["out"])
    frame0, frame1, desc = read_frames(args.inputs, args.frames)
    H, W = frame0.shape[:2]
    points = parse_points(args.points, W, H)

    import torch

    from teacher.kltrace import kl_maps_naive, kl_trace

    from .teacher_sources import load_tracer, make_engine, tracer_config
    from .viz import save_png

    if cfg.get("threads") is not None:
        torch.set_num_threads(int(cfg["threads"]))
    tracer = load_tracer(teacher, cfg["device"], bool(cfg["bf16"]), where="--teacher")
    tcfg = tracer_config(tracer, cfg["tracer"], "tracer")
    engine = make_engine(tracer, cfg["engine"], "engine")
    res = kl_trace(tracer, frame0, frame1, torch.from_numpy(points), tcfg,
                   kl_maps_fn=engine if engine is not None else kl_maps_naive, return_maps=True)
    tg = res.targets.numpy().astype(np.float64)
    vis = res.visible.numpy().astype(bool)
    score = res.score.numpy().astype(np.float64)
    method = "KL-tracing" if tcfg.method == "kl" else "RGB difference"
    print(f"# {method}, teacher {getattr(tracer, 'teacher_id', '?')}, {desc}, {W}x{H}")
    print("# x0 y0 -> x1 y1 visible score")
    for (x0, y0), (x1, y1), v, s in zip(points, tg, vis, score):
        print(f"{x0:.2f} {y0:.2f} -> {x1:.2f} {y1:.2f} {int(v)} {s:.6g}")
    heat = kl_heat(res.maps, 0)
    img = picture(frame0, frame1, points, tg, vis, heat,
                  f"{method} {getattr(tracer, 'teacher_id', '')}: {len(points)} point(s); right: level-0 map")
    out.mkdir(parents=True, exist_ok=True)
    save_png(out / "flow.png", img)
    stats = dict(engine.stats) if engine is not None else {}
    atomic_write_json(out / "targets.json", {
        "input": desc, "size": [W, H], "teacher": str(teacher), "teacher_id": getattr(tracer, "teacher_id", None),
        "points": points.tolist(), "targets": tg.tolist(), "visible": vis.tolist(), "score": score.tolist(),
        "tracer": tcfg.to_dict(), "engine": (cfg["engine"] if engine is not None else {"enabled": False}),
        "engine_stats": stats, "trace_stats": {k: v for k, v in res.stats.items()},
    })
    print(f"wrote {out / 'flow.png'} and {out / 'targets.json'}")
    return 0
