"""TAP-Vid evaluation of flow sources (``flowdistill eval``).

``compute_tapvid_metrics`` reproduces the TAP-Vid benchmark metrics (Doersch et al. 2022; reference code
``tapnet/tapvid/evaluation_datasets.py``), reimplemented here from their definitions:

- inputs (per batch of B videos, N queries, T frames): ``query_points`` [B, N, 3] as (t, y, x);
  ``gt_occluded``/``pred_occluded`` bool [B, N, T]; ``gt_tracks``/``pred_tracks`` [B, N, T, 2] as (x, y),
  raster pixels of the 256 x 256 frame;
- evaluated entries ``E[b, n, t]``: with ``q = round(t_query)``, mode ``first`` scores frames ``t > q``,
  mode ``strided`` every frame ``t != q``;
- ``occlusion_accuracy = #(pred_occ == gt_occ & E) / #E``;
- for each delta in {1, 2, 4, 8, 16}: ``within = |pred - gt|^2 < delta^2`` (strict), ``vis = ~gt_occ``,
  ``pvis = ~pred_occ``;
  ``pts_within_delta = #(within & vis & E) / #(vis & E)``;
  ``jaccard_delta = TP / (#(vis & E) + FP)`` with ``TP = #(within & vis & pvis & E)`` and
  ``FP = #(pvis & (~vis | ~within) & E)``;
- ``average_jaccard`` (AJ) and ``average_pts_within_thresh`` (delta_avg) are the means over the 5 deltas.

Counts are summed over (N, T) per video, or over T per track with ``get_trackwise_metrics``; ratios are
float64. The benchmark number is the plain mean over videos.

Protocol of ``evaluate_first_two_frame``: TAP-Vid "first" queries; for every query frame ``q`` and every
later frame ``t`` the flow source is asked once, directly for the pair (frame q, frame t) — no chaining.
Coordinate convention (tapnet): normalised points are multiplied by the frame size (256 after the reader's
Lanczos resize); pixel i spans [i, i+1).
"""
from __future__ import annotations

import copy
import io
import math
import pickle
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .common import InputError, atomic_write_json
from .flowsources import FLOW_SOURCE_DEFAULTS

THRESHOLDS = (1, 2, 4, 8, 16)
METRIC_KEYS = (["occlusion_accuracy"] + [f"pts_within_{d}" for d in THRESHOLDS]
               + [f"jaccard_{d}" for d in THRESHOLDS] + ["average_jaccard", "average_pts_within_thresh"])

DEFAULTS: dict[str, Any] = {
    "source": "dis",                  # a name from pipeline.flowsources.FLOW_SOURCES, or a comma list
    "data": None,                     # synthetic set folder or TAP-Vid pickle
    "out": None,                      # results JSON (optional)
    "max_videos": None,
    "resize": 256,                    # TAP-Vid pickles: Lanczos resize to resize x resize (null: keep size)
    "query_mode": "first",            # first | strided
    "query_stride": 5,                # strided mode only
    "gallery": {"dir": None, "num_pairs": 3, "num_points": 3, "gap": 1},  # teacher pictures (pipeline.gallery)
    "predictions": False,             # per-entry predictions and scores in the results JSON (evaluate_two_frame)
    # per-source options, e.g. --set sources.dis.preset=fast (defaults come from the flow-source registry)
    "sources": copy.deepcopy(FLOW_SOURCE_DEFAULTS),
}


# ------------------------------------------------------------------------------------------- metrics

def compute_tapvid_metrics(query_points: np.ndarray, gt_occluded: np.ndarray, gt_tracks: np.ndarray,
                           pred_occluded: np.ndarray, pred_tracks: np.ndarray, query_mode: str,
                           get_trackwise_metrics: bool = False) -> dict[str, np.ndarray]:
    """TAP-Vid metrics (formulas in the module docstring). Returns float64 arrays of shape [B]
    (or [B, N] with ``get_trackwise_metrics``) under the keys of ``METRIC_KEYS``."""
    query_points = np.asarray(query_points)
    gt_occluded = np.asarray(gt_occluded, dtype=bool)
    pred_occluded = np.asarray(pred_occluded, dtype=bool)
    gt_tracks = np.asarray(gt_tracks, dtype=np.float64)
    pred_tracks = np.asarray(pred_tracks, dtype=np.float64)
    if gt_occluded.ndim != 3:
        raise InputError("gt_occluded", f"expected [B, N, T], got shape {gt_occluded.shape}")
    b, n, n_t = gt_occluded.shape
    for nm, arr, shape in (("query_points", query_points, (b, n, 3)), ("pred_occluded", pred_occluded, (b, n, n_t)),
                           ("gt_tracks", gt_tracks, (b, n, n_t, 2)), ("pred_tracks", pred_tracks, (b, n, n_t, 2))):
        if arr.shape != shape:
            raise InputError(nm, f"expected shape {list(shape)}, got {list(arr.shape)}")
    axes = (2,) if get_trackwise_metrics else (1, 2)

    eye = np.eye(n_t, dtype=bool)
    if query_mode == "first":
        frames_after = np.triu(np.ones((n_t, n_t), dtype=bool), k=1)    # row q: columns t > q
        mask_by_query = frames_after
    elif query_mode == "strided":
        mask_by_query = ~eye                                            # row q: columns t != q
    else:
        raise InputError("query_mode", f"unknown query mode {query_mode!r} (first | strided)")
    q = np.round(query_points[..., 0]).astype(np.int64)                 # [B, N]
    if np.any(q < 0) or np.any(q >= n_t):
        raise InputError("query_points", f"query frame outside [0, {n_t})")
    evaluated = mask_by_query[q]                                         # [B, N, T]

    out: dict[str, np.ndarray] = {}
    agree = (pred_occluded == gt_occluded) & evaluated
    with np.errstate(divide="ignore", invalid="ignore"):
        out["occlusion_accuracy"] = np.sum(agree, axis=axes) / np.sum(evaluated, axis=axes)
        visible = ~gt_occluded
        pred_visible = ~pred_occluded
        sq_dist = np.sum((pred_tracks - gt_tracks) ** 2, axis=-1)        # [B, N, T]
        n_visible = np.sum(visible & evaluated, axis=axes)
        fracs, jaccs = [], []
        for d in THRESHOLDS:
            within = sq_dist < d * d
            correct = within & visible & evaluated
            frac = np.sum(correct, axis=axes) / n_visible
            tp = np.sum(correct & pred_visible, axis=axes)
            fp = np.sum(pred_visible & (~visible | ~within) & evaluated, axis=axes)
            jac = tp / (n_visible + fp)
            out[f"pts_within_{d}"] = frac
            out[f"jaccard_{d}"] = jac
            fracs.append(frac)
            jaccs.append(jac)
    out["average_jaccard"] = np.mean(np.stack(jaccs), axis=0)
    out["average_pts_within_thresh"] = np.mean(np.stack(fracs), axis=0)
    return {k: out[k] for k in METRIC_KEYS}


def endpoint_error(query_points: np.ndarray, gt_occluded: np.ndarray, gt_tracks: np.ndarray,
                   pred_tracks: np.ndarray, query_mode: str = "first") -> np.ndarray:
    """AD: mean endpoint error ``|pred - gt|`` (px) over gt-visible evaluated entries, float64 [B]."""
    gt_occluded = np.asarray(gt_occluded, dtype=bool)
    n_t = gt_occluded.shape[-1]
    q = np.round(np.asarray(query_points)[..., 0]).astype(np.int64)
    if query_mode == "first":
        mask = np.triu(np.ones((n_t, n_t), dtype=bool), k=1)[q]
    else:
        mask = (~np.eye(n_t, dtype=bool))[q]
    sel = mask & ~gt_occluded
    dist = np.sqrt(np.sum((np.asarray(pred_tracks, np.float64) - np.asarray(gt_tracks, np.float64)) ** 2, axis=-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sum(np.where(sel, dist, 0.0), axis=(1, 2)) / np.sum(sel, axis=(1, 2))


# ------------------------------------------------------------------------------------------- queries

def _check_tracks(target_occluded: np.ndarray, target_points: np.ndarray) -> None:
    if target_occluded.ndim != 2:
        raise InputError("target_occluded", f"expected [N, T], got shape {target_occluded.shape}")
    if target_points.shape != target_occluded.shape + (2,):
        raise InputError("target_points", f"expected {list(target_occluded.shape) + [2]}, got {list(target_points.shape)}")


def sample_queries_first(target_occluded: np.ndarray, target_points: np.ndarray, frames: np.ndarray) -> dict:
    """TAP-Vid "first" queries: tracks never visible are dropped; every other track is queried once, at its
    first visible frame q, with its ground-truth position there: query = (q, y_q, x_q).

    Returns ``{"video": frames[None], "query_points": [1, N', 3] (t, y, x), "target_points": [1, N', T, 2],
    "occluded": [1, N', T]}`` (query_points float32).
    """
    target_occluded = np.asarray(target_occluded, dtype=bool)
    target_points = np.asarray(target_points)
    _check_tracks(target_occluded, target_points)
    keep = np.any(~target_occluded, axis=1)
    occ = target_occluded[keep]
    pts = target_points[keep]
    first = np.argmax(~occ, axis=1)                                      # first visible frame per track
    xy = pts[np.arange(len(pts)), first]                                 # [N', 2]
    queries = np.stack([first.astype(np.float32), xy[:, 1].astype(np.float32), xy[:, 0].astype(np.float32)], axis=-1)
    return {"video": np.asarray(frames)[None], "query_points": queries.reshape(-1, 3)[None],
            "target_points": pts[None], "occluded": occ[None]}


def sample_queries_strided(target_occluded: np.ndarray, target_points: np.ndarray, frames: np.ndarray,
                           query_stride: int = 5) -> dict:
    """TAP-Vid "strided" queries: at frames 0, s, 2s, ... every track visible there gives a query
    (q, y_q, x_q); a track can be queried several times. ``trackgroup`` [1, M] maps each query to its track.
    Queries are ordered by query frame, then by track index.
    """
    target_occluded = np.asarray(target_occluded, dtype=bool)
    target_points = np.asarray(target_points)
    _check_tracks(target_occluded, target_points)
    if int(query_stride) < 1:
        raise InputError("query_stride", "must be >= 1")
    n, n_t = target_occluded.shape
    qs, tracks, occs, groups = [], [], [], []
    for q in range(0, n_t, int(query_stride)):
        idx = np.flatnonzero(~target_occluded[:, q])
        xy = target_points[idx, q]
        qs.append(np.stack([np.full(len(idx), q, np.float32), xy[:, 1].astype(np.float32),
                            xy[:, 0].astype(np.float32)], axis=-1).reshape(-1, 3))
        tracks.append(target_points[idx])
        occs.append(target_occluded[idx])
        groups.append(idx)
    return {"video": np.asarray(frames)[None], "query_points": np.concatenate(qs)[None],
            "target_points": np.concatenate(tracks)[None], "occluded": np.concatenate(occs)[None],
            "trackgroup": np.concatenate(groups)[None]}


# ------------------------------------------------------------------------------------------- readers

class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for TAP-Vid files: only numpy array/dtype/scalar reconstruction and plain containers.

    Every other global (``os.system``, ``builtins.eval``, arbitrary classes) is refused, so opening an
    untrusted pickle cannot run code.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "bytearray"), ("builtins", "complex"),
        ("builtins", "slice"), ("builtins", "range"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode                       # how protocol-2 pickles store bytes
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _latin1_encode(obj: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return obj.encode("latin1", errors)


def restricted_load(data: bytes, where: str = "pickle") -> Any:
    """Unpickle ``data`` with ``_RestrictedUnpickler``; anything disallowed or malformed -> ``InputError``."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        raise InputError(where, f"unsafe or invalid pickle: {e}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, ImportError) as e:
        raise InputError(where, f"invalid pickle: {type(e).__name__}: {e}") from None


def resize_video(video: np.ndarray, height: int, width: int) -> np.ndarray:
    """Per-frame PIL Lanczos resize of uint8 [T, H, W, 3] (the mediapy / tapnet convention)."""
    from PIL import Image

    if video.shape[1:3] == (height, width):
        return video
    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), resample=Image.Resampling.LANCZOS))
                     for f in video])


def _decode_frames(where: str, video: Any) -> np.ndarray:
    if isinstance(video, (list, tuple)) and video and isinstance(video[0], (bytes, bytearray)):
        from PIL import Image                       # TAP-Vid-Kinetics style: list of JPEG bytes

        try:
            video = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in video])
        except Exception as e:  # PIL raises many types for corrupt images
            raise InputError(where, f"undecodable frame: {e}") from None
    video = np.asarray(video)
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise InputError(where, f"video must be uint8 [T, H, W, 3], got {video.dtype} {video.shape}")
    return video


def _tapvid_item(where: str, item: Any, resize: int | None) -> dict:
    if not isinstance(item, dict):
        raise InputError(where, f"expected a dict with video/points/occluded, got {type(item).__name__}")
    for k in ("video", "points", "occluded"):
        if k not in item:
            raise InputError(where, f"missing {k!r}")
    video = _decode_frames(where, item["video"])
    points = np.asarray(item["points"])
    occluded = np.asarray(item["occluded"])
    if points.ndim != 3 or points.shape[-1] != 2 or points.shape[1] != video.shape[0]:
        raise InputError(where, f"points must be [N, T={video.shape[0]}, 2], got {points.shape}")
    if occluded.shape != points.shape[:2]:
        raise InputError(where, f"occluded must be {list(points.shape[:2])}, got {list(occluded.shape)}")
    if not np.issubdtype(points.dtype, np.floating) or not np.all(np.isfinite(points)):
        raise InputError(where, "points must be finite floats")
    if resize:
        video = resize_video(video, int(resize), int(resize))
    return {"video": video, "points": points.astype(np.float32), "occluded": occluded.astype(bool)}


def load_tapvid_pickle(path: str | Path, resize: int | None = 256, max_videos: int | None = None) -> list[dict]:
    """Read a TAP-Vid pickle (DAVIS / RoboTAP: dict name -> item; RGB-Stacking: list of items) safely.

    Returns ``[{name, video uint8 [T, R, R, 3], points float32 [N, T, 2] normalised (x, y), occluded bool [N, T]}]``
    with frames Lanczos-resized to ``resize`` x ``resize`` (tapnet convention; ``None`` keeps the size). Points
    stay normalised here; the evaluator multiplies them by the frame size (256 -> tapnet's scaling).
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(p, "file not found")
    data = restricted_load(p.read_bytes(), str(p))
    if isinstance(data, dict):
        items = [(str(k), v) for k, v in data.items()]
    elif isinstance(data, (list, tuple)):
        items = [(f"{i:04d}", v) for i, v in enumerate(data)]
    else:
        raise InputError(p, f"expected a dict or list of videos, got {type(data).__name__}")
    if max_videos is not None:
        items = items[: int(max_videos)]
    out = []
    for name, item in items:
        rec = _tapvid_item(f"{p}:{name}", item, resize)
        rec["name"] = name
        out.append(rec)
    return out


def load_dataset(path: str | Path, resize: int | None = 256, max_videos: int | None = None) -> list[dict]:
    """A synthetic-set folder (``pipeline.synthetic.load_set``) or a TAP-Vid pickle file."""
    p = Path(path)
    if p.is_dir():
        from .synthetic import load_set

        return load_set(p, max_videos=max_videos)
    if p.is_file():
        return load_tapvid_pickle(p, resize=resize, max_videos=max_videos)
    raise InputError(p, "no such file or folder")


# ------------------------------------------------------------------------------------------- driver

def _validate_item(item: dict) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    name = str(item.get("name", "?"))
    for k in ("video", "points", "occluded"):
        if k not in item:
            raise InputError(name, f"dataset item lacks {k!r}")
    video, points, occ = np.asarray(item["video"]), np.asarray(item["points"]), np.asarray(item["occluded"], bool)
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise InputError(name, f"video must be uint8 [T, H, W, 3], got {video.dtype} {video.shape}")
    if points.shape != (occ.shape[0], video.shape[0], 2) or occ.ndim != 2:
        raise InputError(name, f"points {points.shape} / occluded {occ.shape} do not match T={video.shape[0]}")
    return name, video, points, occ


def predict_two_frame(video: np.ndarray, query_points: np.ndarray, source, query_mode: str = "first",
                      extras: dict | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Two-frame predictions for queries [N, 3] (t, y, x) on video [T, H, W, 3].

    For each distinct query frame q and each scored frame t (t > q for ``first``, t != q for ``strided``)
    ``source.track(video[q], video[t], xy_q)`` is called once for all queries of frame q — never chained.
    Unscored entries keep the query point and "visible". Returns (tracks float64 [N, T, 2] (x, y),
    occluded bool [N, T], number of track calls). ``extras`` (a dict, filled in place): for sources that keep
    their last ``TraceResult`` (teacher sources), "score" and, with the forward-backward / appearance checks,
    "fb_error" / "app_error",
    float64 [N, T] (NaN where not scored) — what an occlusion rule reads, so rules can be compared offline.
    """
    n_t = video.shape[0]
    n = len(query_points)
    q = np.round(query_points[:, 0]).astype(np.int64)
    xy = np.stack([query_points[:, 2], query_points[:, 1]], axis=-1).astype(np.float32)   # [N, 2] (x, y)
    tracks = np.repeat(xy[:, None, :].astype(np.float64), n_t, axis=1)
    occluded = np.zeros((n, n_t), dtype=bool)
    calls = 0
    for qf in np.unique(q):
        sel = np.flatnonzero(q == qf)
        targets = range(qf + 1, n_t) if query_mode == "first" else [t for t in range(n_t) if t != qf]
        for t in targets:
            tgt, vis = source.track(video[qf], video[t], xy[sel])
            tgt = np.asarray(tgt, dtype=np.float64)
            vis = np.asarray(vis, dtype=bool)
            if tgt.shape != (len(sel), 2) or vis.shape != (len(sel),):
                raise InputError(getattr(source, "name", "source"),
                                 f"track() returned shapes {tgt.shape}, {vis.shape}; expected ({len(sel)}, 2), ({len(sel)},)")
            tracks[sel, t] = tgt
            occluded[sel, t] = ~vis
            calls += 1
            last = getattr(source, "last_result", None)
            if extras is not None and last is not None:
                for key in ("score", "fb_error", "app_error"):
                    val = getattr(last, key, None)
                    if val is not None:
                        extras.setdefault(key, np.full((n, n_t), np.nan))[sel, t] = np.asarray(val, np.float64)
    return tracks, occluded, calls


def evaluate_two_frame(dataset: Iterable[dict], source, query_mode: str = "first", query_stride: int = 5,
                       progress: bool = True, predictions: bool = False) -> dict:
    """Score ``source`` on every video (see ``predict_two_frame``); per-video metrics and their means.

    Ground truth in raster pixels = normalised points x (W, H) of the frames given. Per video: the 14 TAP-Vid
    metrics, ``ad`` (mean endpoint error, px, over gt-visible scored entries), query/frame counts. ``mean``:
    plain mean over videos that have at least one scored visible entry. ``predictions``: each video's record also
    holds "predictions" — query_points [N, 3] (t, y, x), gt_tracks [N, T, 2], gt_occluded, pred_tracks,
    pred_occluded and the source's extras (score, fb_error, app_error; null where not scored), as nested lists.
    """
    items = list(dataset)
    it = items
    if progress:
        from tqdm import tqdm

        it = tqdm(items, desc=f"eval {getattr(source, 'name', '?')}", unit="video")
    per_video = []
    t_start = time.perf_counter()
    calls_total = 0
    for item in it:
        name, video, points, occ = _validate_item(item)
        h, w = video.shape[1:3]
        px = points.astype(np.float64) * np.array([w, h], dtype=np.float64)    # tapnet: normalised x 256
        if query_mode == "first":
            qd = sample_queries_first(occ, px, video)
        elif query_mode == "strided":
            qd = sample_queries_strided(occ, px, video, query_stride)
        else:
            raise InputError("query_mode", f"unknown query mode {query_mode!r} (first | strided)")
        queries = qd["query_points"][0]
        rec: dict[str, Any] = {"name": name, "num_queries": int(len(queries)), "num_frames": int(video.shape[0])}
        if len(queries) == 0:
            rec.update({k: None for k in METRIC_KEYS}, ad=None)
            per_video.append(rec)
            continue
        extras: dict | None = {} if predictions else None
        pred, pred_occ, calls = predict_two_frame(video, queries, source, query_mode, extras)
        calls_total += calls
        if extras is not None:
            rec["predictions"] = _json_arrays({"query_points": queries, "gt_tracks": qd["target_points"][0],
                                               "gt_occluded": qd["occluded"][0], "pred_tracks": pred,
                                               "pred_occluded": pred_occ, **extras})
        m = compute_tapvid_metrics(qd["query_points"], qd["occluded"], qd["target_points"], pred_occ[None],
                                   pred[None], query_mode)
        ad = endpoint_error(qd["query_points"], qd["occluded"], qd["target_points"], pred[None], query_mode)
        for k in METRIC_KEYS:
            v = float(m[k][0])
            rec[k] = None if math.isnan(v) else v
        rec["ad"] = None if math.isnan(float(ad[0])) else float(ad[0])
        rec["track_calls"] = calls
        per_video.append(rec)
    mean: dict[str, Any] = {}
    for k in METRIC_KEYS + ["ad"]:
        vals = [r[k] for r in per_video if r.get(k) is not None]
        mean[k] = float(np.mean(vals)) if vals else None
    mean["num_videos"] = sum(1 for r in per_video if r.get("average_jaccard") is not None)
    return {
        "source": getattr(source, "name", type(source).__name__),
        "protocol": f"TAP-Vid {query_mode}, two-frame (query frame -> target frame, no chaining)",
        "query_mode": query_mode,
        "per_video": per_video,
        "mean": mean,
        "seconds": round(time.perf_counter() - t_start, 3),
        "track_calls": calls_total,
    }


def _json_arrays(arrays: dict) -> dict:
    """Arrays -> nested lists for JSON: floats rounded to 4 decimals, NaN -> None, bools stay bools."""
    out = {}
    for k, a in arrays.items():
        a = np.asarray(a)
        if a.dtype == bool:
            out[k] = a.tolist()
        else:
            r = np.round(a.astype(np.float64), 4).astype(object)
            r[np.isnan(a.astype(np.float64))] = None
            out[k] = r.tolist()
    return out


def evaluate_first_two_frame(dataset: Iterable[dict], source, progress: bool = True) -> dict:
    """``evaluate_two_frame`` in TAP-Vid "first" mode (the protocol the issue specifies)."""
    return evaluate_two_frame(dataset, source, query_mode="first", progress=progress)


def _fmt(v: Any, scale: float = 100.0, digits: int = 1) -> str:
    if v is None:
        return "-"
    return f"{v * scale:.{digits}f}"


def format_table(results: dict) -> str:
    """Text table: AJ, delta_avg, OA (percent), AD (px), then the 5 jaccards and 5 pts_within (percent).

    ``results`` is one ``evaluate_*`` result or a mapping source name -> result. One row per video and a
    ``mean`` row per source.
    """
    if "per_video" in results:
        results = {results.get("source", "source"): results}
    head = (["source", "video", "AJ", "d_avg", "OA", "AD px"] + [f"J{d}" for d in THRESHOLDS]
            + [f"<{d}" for d in THRESHOLDS])
    rows = []
    for src, res in results.items():
        recs = [(r["name"], r) for r in res["per_video"]] + [("mean", res["mean"])]
        for name, r in recs:
            rows.append([str(src), str(name), _fmt(r.get("average_jaccard")), _fmt(r.get("average_pts_within_thresh")),
                         _fmt(r.get("occlusion_accuracy")), _fmt(r.get("ad"), 1.0, 2)]
                        + [_fmt(r.get(f"jaccard_{d}")) for d in THRESHOLDS]
                        + [_fmt(r.get(f"pts_within_{d}")) for d in THRESHOLDS])
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(len(head))]
    lines = ["  ".join(h.ljust(widths[i]) if i < 2 else h.rjust(widths[i]) for i, h in enumerate(head))]
    lines.append("  ".join("-" * wd for wd in widths))
    prev = None
    for r in rows:
        if prev is not None and r[0] != prev:
            lines.append("")
        prev = r[0]
        lines.append("  ".join(c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(r)))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- CLI

def add_arguments(parser) -> None:
    parser.add_argument("--source", default=None,
                        help="flow source name(s) from the registry, comma separated (built: zero, dis, farneback)")
    parser.add_argument("--data", default=None, help="synthetic set folder (flowdistill synth) or TAP-Vid pickle")
    parser.add_argument("--out", default=None, help="write results JSON here (atomically)")
    parser.add_argument("--max-videos", type=int, default=None, help="evaluate only the first N videos")
    parser.add_argument("--source-opt", action="append", default=[], metavar="KEY=VALUE",
                        help="option for the flow source(s), value parsed as YAML (repeatable); "
                             "same as --set sources.<name>.KEY=VALUE")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--predictions", action="store_true", default=None,
                        help="also store every entry's prediction and score in the --out JSON")
    parser.add_argument("--gallery", default=None, metavar="DIR",
                        help="teacher sources: write predicted-frame and KL-map pictures here (pipeline.gallery)")


def run(args, cfg) -> int:
    import yaml

    from .flowsources import available_flow_sources, make_flow_source

    cfg = copy.deepcopy(cfg)
    for key in ("source", "data", "out", "max_videos", "predictions"):
        v = getattr(args, key, None)
        if v is not None:
            cfg[key] = v
    if not cfg.get("data"):
        raise InputError("--data", "give a synthetic set folder or a TAP-Vid pickle")
    names = [s.strip() for s in str(cfg["source"]).split(",") if s.strip()]
    if not names:
        raise InputError("--source", f"no source given (known: {', '.join(available_flow_sources())})")
    extra: dict[str, Any] = {}
    for opt in args.source_opt:
        if "=" not in opt:
            raise InputError(opt, "--source-opt must look like KEY=VALUE")
        k, raw = opt.split("=", 1)
        try:
            extra[k.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise InputError(opt, f"value is not valid YAML: {e}") from None
    sources = []
    for nm in names:
        opts = dict(cfg["sources"].get(nm, {}))
        opts.update(extra)
        sources.append(make_flow_source(nm, opts))
    dataset = load_dataset(cfg["data"], resize=cfg["resize"], max_videos=cfg["max_videos"])
    if not dataset:
        raise InputError(cfg["data"], "no videos")
    results = {}
    for src in sources:
        results[src.name] = evaluate_two_frame(dataset, src, query_mode=cfg["query_mode"],
                                               query_stride=cfg["query_stride"], progress=not args.no_progress,
                                               predictions=bool(cfg["predictions"]))
    gdir = getattr(args, "gallery", None) or cfg["gallery"].get("dir")
    if gdir:
        from .gallery import write_gallery

        for src in sources:
            if hasattr(src, "tracer"):
                g = cfg["gallery"]
                paths = write_gallery(src, dataset, Path(gdir) / src.name, g["num_pairs"], g["num_points"], g["gap"])
                print(f"gallery {src.name}: {len(paths)} pictures -> {Path(gdir) / src.name}")
    print(format_table(results))
    for nm, res in results.items():
        print(f"{nm}: {res['seconds']:.1f} s, {res['track_calls']} two-frame calls")
    if cfg.get("out"):
        atomic_write_json(cfg["out"], {"data": str(cfg["data"]), "config": cfg, "results": results})
        print(f"results -> {cfg['out']}")
    return 0
