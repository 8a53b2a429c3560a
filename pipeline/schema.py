"""The shard format, schema v1 — the one place that defines what a label sample is.

One webdataset sample per (video, frame pair)::

    __key__      <video_id>_<t0:06d>_<t1:06d>          no dots (webdataset splits at the first dot)
    frame0.jpg   uint8 [H, W, 3] RGB, the frame the teacher saw at t0   (or frame0.png)
    frame1.jpg   uint8 [H, W, 3] RGB, at t1                             (or frame1.png)
    tracks.npy   float32 [N, 6] = (x0, y0, x1, y1, visible, score)
    meta.json    provenance, see ``META_FIELDS``

Coordinates are pixels in the stored frames, raster convention: pixel ``i`` spans ``[i, i+1)`` and its
centre is ``i + 0.5``, so valid positions lie in ``[0, W] x [0, H]``. ``visible`` is in ``[0, 1]`` (a point
counts as visible at t1 when ``visible > VISIBLE_THRESHOLD``); ``score`` is the tracer's confidence
(KL peak), any finite value.

Encoding is deterministic: ``npy`` through ``numpy.lib.format`` (version 1.0, no pickle), ``json`` with
sorted keys and fixed separators, images through OpenCV with fixed parameters. A decoded sample keeps the
encoded image bytes in ``LabelSample.raw``; re-encoding passes them through unchanged as long as they still
decode to the sample's frame, so read → re-write reproduces a shard byte for byte (JPEG is lossy and would
otherwise drift on every re-encode).
"""
from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .common import InputError

SCHEMA_VERSION = 1

# Required keys of meta.json (extra keys are allowed and kept).
META_FIELDS: tuple[str, ...] = (
    "schema_version",  # int, == SCHEMA_VERSION
    "video_id",        # str, short content-derived hash; part of the key
    "source",          # str, uri of the video
    "t0",              # int >= 0, frame index of frame0 in the source video
    "t1",              # int > t0, frame index of frame1
    "fps",             # number > 0
    "orig_size",       # [w, h] of the source video, ints > 0
    "teacher",         # {id, checkpoint_sha256, config_hash}
    "tracer",          # dict, the tracer config
    "label_set",       # str, name of the label set
    "version",         # str, label-set version, e.g. "v0001"
    "rank",            # int >= 0, producer rank
    "created",         # str, supplied by the caller (never the writer's clock) for reproducible bytes
)
TEACHER_FIELDS: tuple[str, ...] = ("id", "checkpoint_sha256", "config_hash")

TRACK_COLUMNS: tuple[str, ...] = ("x0", "y0", "x1", "y1", "visible", "score")
VISIBLE_THRESHOLD = 0.5      # visible > this: the point is visible at t1
TARGET_TOLERANCE_PX = 1.0    # a visible target may lie this far outside [0, W] x [0, H]
IMAGE_FORMATS: tuple[str, ...] = ("jpg", "png")
MEMBERS_FIXED: tuple[str, ...] = ("tracks.npy", "meta.json")
MAX_KEY_LEN = 80             # keeps "<key>.frame0.jpg" within a plain ustar name (100 bytes)
PNG_COMPRESSION = 3          # fixed zlib level, so PNG bytes are reproducible

_VIDEO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass
class LabelSample:
    """One labelled frame pair.

    key:    ``make_key(meta["video_id"], meta["t0"], meta["t1"])``
    frame0: uint8 [H, W, 3] RGB
    frame1: uint8 [H, W, 3] RGB, same size as frame0
    tracks: float32 [N, 6] = (x0, y0, x1, y1, visible, score)
    meta:   dict with at least ``META_FIELDS``
    raw:    encoded image members as read from a shard (``{"frame0.jpg": b"...", ...}``) or None; used
            only to re-write a sample without re-encoding its images
    """

    key: str
    frame0: np.ndarray
    frame1: np.ndarray
    tracks: np.ndarray
    meta: dict
    raw: dict[str, bytes] | None = field(default=None, repr=False, compare=False)


# ----------------------------------------------------------------------------------------------- keys

def make_key(video_id: str, t0: int, t1: int) -> str:
    """``<video_id>_<t0:06d>_<t1:06d>``; raises InputError for an unusable id or frame numbers."""
    if not isinstance(video_id, str) or not _VIDEO_ID_RE.match(video_id):
        raise InputError(repr(video_id), "video_id must be non-empty [A-Za-z0-9_-] (no dots, no slashes)")
    for name, t in (("t0", t0), ("t1", t1)):
        if not _is_int(t) or t < 0:
            raise InputError(video_id, f"{name}={t!r} must be an int >= 0")
    if t0 >= t1:
        raise InputError(video_id, f"t0={t0} must be < t1={t1}")
    key = f"{video_id}_{int(t0):06d}_{int(t1):06d}"
    if len(key) > MAX_KEY_LEN:
        raise InputError(video_id, f"key {key!r} longer than {MAX_KEY_LEN} characters")
    return key


def parse_key(key: str) -> tuple[str, int, int]:
    """Inverse of ``make_key``: ``"abc_000010_000012"`` → ``("abc", 10, 12)``."""
    parts = key.rsplit("_", 2) if isinstance(key, str) else []
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        raise InputError(repr(key), "key must look like <video_id>_<t0>_<t1>")
    return parts[0], int(parts[1]), int(parts[2])


def make_meta(*, video_id: str, source: str, t0: int, t1: int, fps: float, orig_size: tuple[int, int] | list[int],
              teacher: dict, tracer: dict, label_set: str, version: str, rank: int, created: str,
              **extra: Any) -> dict:
    """Build a meta dict with every required field (``schema_version`` filled in); extra keys are kept."""
    meta = dict(schema_version=SCHEMA_VERSION, video_id=video_id, source=source, t0=t0, t1=t1, fps=fps,
                orig_size=[int(orig_size[0]), int(orig_size[1])], teacher=dict(teacher), tracer=dict(tracer),
                label_set=label_set, version=version, rank=rank, created=created)
    meta.update(extra)
    return meta


# ----------------------------------------------------------------------------------------- validation

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _nonempty_str(v: Any) -> bool:
    return isinstance(v, str) and v != ""


def _check_meta(meta: Any, fail) -> None:
    if not isinstance(meta, dict):
        fail(f"meta must be a dict, got {type(meta).__name__}")
    missing = [k for k in META_FIELDS if k not in meta]
    if missing:
        fail(f"meta is missing {', '.join(missing)}")
    if not _is_int(meta["schema_version"]) or meta["schema_version"] != SCHEMA_VERSION:
        fail(f"meta schema_version={meta['schema_version']!r}, this reader understands {SCHEMA_VERSION}")
    if not isinstance(meta["video_id"], str) or not _VIDEO_ID_RE.match(meta["video_id"]):
        fail(f"meta video_id={meta['video_id']!r} must be non-empty [A-Za-z0-9_-]")
    if not _nonempty_str(meta["source"]):
        fail("meta source must be a non-empty string")
    t0, t1 = meta["t0"], meta["t1"]
    if not _is_int(t0) or not _is_int(t1) or t0 < 0:
        fail(f"meta t0={t0!r}, t1={t1!r} must be ints >= 0")
    if t0 >= t1:
        fail(f"meta t0={t0} must be < t1={t1}")
    if not _is_number(meta["fps"]) or meta["fps"] <= 0:
        fail(f"meta fps={meta['fps']!r} must be a finite number > 0")
    size = meta["orig_size"]
    if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(_is_int(s) and s > 0 for s in size):
        fail(f"meta orig_size={size!r} must be [w, h] with ints > 0")
    teacher = meta["teacher"]
    if not isinstance(teacher, dict):
        fail("meta teacher must be a dict")
    for k in TEACHER_FIELDS:
        if not _nonempty_str(teacher.get(k)):
            fail(f"meta teacher.{k} must be a non-empty string")
    if not isinstance(meta["tracer"], dict):
        fail("meta tracer must be a dict (the tracer config)")
    for k in ("label_set", "version", "created"):
        if not _nonempty_str(meta[k]):
            fail(f"meta {k} must be a non-empty string")
    if not _is_int(meta["rank"]) or meta["rank"] < 0:
        fail(f"meta rank={meta['rank']!r} must be an int >= 0")
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        fail(f"meta is not plain JSON (no NaN, numpy or custom types): {e}")


def validate_sample(sample: LabelSample, where: str) -> None:
    """Raise ``InputError(f"{where}:{key}", reason)`` unless ``sample`` conforms to schema v1."""
    key = getattr(sample, "key", None)

    def fail(reason: str):
        raise InputError(f"{where}:{key}", reason)

    if not isinstance(sample, LabelSample):
        fail(f"expected a LabelSample, got {type(sample).__name__}")
    # key
    if not isinstance(key, str) or key == "":
        fail("key must be a non-empty string")
    if "." in key:
        fail("key contains a dot (webdataset splits member names at the first dot)")
    if not _KEY_RE.match(key):
        fail("key may contain only [A-Za-z0-9_-]")
    if len(key) > MAX_KEY_LEN:
        fail(f"key longer than {MAX_KEY_LEN} characters")
    # frames: uint8 [H, W, 3], same size
    for name in ("frame0", "frame1"):
        img = getattr(sample, name)
        if not isinstance(img, np.ndarray):
            fail(f"{name} must be a numpy array, got {type(img).__name__}")
        if img.dtype != np.uint8:
            fail(f"{name} dtype {img.dtype}, expected uint8")
        if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] < 1 or img.shape[1] < 1:
            fail(f"{name} shape {tuple(img.shape)}, expected [H, W, 3]")
    if sample.frame0.shape != sample.frame1.shape:
        fail(f"frame0 {tuple(sample.frame0.shape)} and frame1 {tuple(sample.frame1.shape)} differ in size")
    h, w = sample.frame0.shape[:2]
    # tracks: float32 [N, 6], finite, in range
    tr = sample.tracks
    if not isinstance(tr, np.ndarray):
        fail(f"tracks must be a numpy array, got {type(tr).__name__}")
    if tr.dtype != np.float32:
        fail(f"tracks dtype {tr.dtype}, expected float32")
    if tr.ndim != 2 or tr.shape[1] != 6:
        fail(f"tracks shape {tuple(tr.shape)}, expected [N, 6]")
    if not np.isfinite(tr).all():
        bad = np.argwhere(~np.isfinite(tr))[0]
        fail(f"tracks contain NaN/inf (first at point {bad[0]}, column {TRACK_COLUMNS[bad[1]]})")
    x0, y0, x1, y1, vis = tr[:, 0], tr[:, 1], tr[:, 2], tr[:, 3], tr[:, 4]
    out = (vis < 0) | (vis > 1)
    if out.any():
        i = int(np.argmax(out))
        fail(f"tracks visible={vis[i]:g} outside [0, 1] (point {i})")
    out = (x0 < 0) | (x0 > w) | (y0 < 0) | (y0 > h)
    if out.any():
        i = int(np.argmax(out))
        fail(f"query ({x0[i]:g}, {y0[i]:g}) outside the {w}x{h} frame (point {i})")
    tol = TARGET_TOLERANCE_PX
    out = (vis > VISIBLE_THRESHOLD) & ((x1 < -tol) | (x1 > w + tol) | (y1 < -tol) | (y1 > h + tol))
    if out.any():
        i = int(np.argmax(out))
        fail(f"visible target ({x1[i]:g}, {y1[i]:g}) outside the {w}x{h} frame (point {i})")
    # meta
    _check_meta(sample.meta, fail)
    expect = f"{sample.meta['video_id']}_{sample.meta['t0']:06d}_{sample.meta['t1']:06d}"
    if key != expect:
        fail(f"key does not match meta (video_id, t0, t1) → {expect!r}")


# ------------------------------------------------------------------------------------------- encoding

def _encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")),
                              version=(1, 0), allow_pickle=False)
    return buf.getvalue()


def _encode_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def encode_image(img: np.ndarray, image_format: str = "jpg", quality: int = 95) -> bytes:
    """uint8 [H, W, 3] RGB → JPEG (4:2:0, baseline, given quality) or PNG (fixed compression) bytes."""
    import cv2

    bgr = np.ascontiguousarray(img[..., ::-1])
    if image_format == "jpg":
        params = [cv2.IMWRITE_JPEG_QUALITY, int(quality), cv2.IMWRITE_JPEG_OPTIMIZE, 0,
                  cv2.IMWRITE_JPEG_PROGRESSIVE, 0]
    elif image_format == "png":
        params = [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION]
    else:
        raise InputError(image_format, f"image format must be one of {IMAGE_FORMATS}")
    ok, buf = cv2.imencode("." + image_format, bgr, params)
    if not ok:
        raise InputError(image_format, "OpenCV could not encode the image")
    return buf.tobytes()


def decode_image(data: bytes) -> np.ndarray | None:
    """Encoded bytes → the stored array (RGB when it has 3 channels), or None if undecodable.

    Decoded unchanged (no EXIF rotation, no forced colour conversion), so a grey or RGBA image comes
    back with its own shape and fails validation instead of being silently converted.
    """
    import cv2

    arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        return None
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = np.ascontiguousarray(arr[..., ::-1])
    return arr


def encode_sample(sample: LabelSample, image_format: str = "jpg", quality: int = 95, *,
                  where: str = "sample", validate: bool = True) -> dict:
    """LabelSample → webdataset dict ``{__key__, frame0.<fmt>, frame1.<fmt>, tracks.npy, meta.json}`` of bytes.

    Validates first (unless ``validate=False``). Image bytes in ``sample.raw`` are reused when their format
    is ``image_format`` and they still decode to the sample's frame; otherwise the frame is encoded.
    """
    if image_format not in IMAGE_FORMATS:
        raise InputError(image_format, f"image format must be one of {IMAGE_FORMATS}")
    if validate:
        validate_sample(sample, where)
    out: dict[str, Any] = {"__key__": sample.key}
    raw = sample.raw or {}
    for name in ("frame0", "frame1"):
        member = f"{name}.{image_format}"
        img = getattr(sample, name)
        data = raw.get(member)
        if data is not None:
            again = decode_image(data)
            if again is None or again.shape != img.shape or not np.array_equal(again, img):
                data = None  # the frame was changed after decoding: encode it afresh
        out[member] = data if data is not None else encode_image(img, image_format, quality)
    out["tracks.npy"] = _encode_npy(sample.tracks)
    out["meta.json"] = _encode_json(sample.meta)
    return out


def decode_sample(raw: dict, where: str, validate: bool = True) -> LabelSample:
    """webdataset dict of bytes → LabelSample; InputError ``"<where>:<key>"`` on anything malformed.

    Entries whose name starts with ``__`` (``__key__``, ``__url__`` …) are not members. Exactly the four
    schema members must be present; npy is read with ``allow_pickle=False``.
    """
    key = raw.get("__key__")

    def fail(reason: str):
        raise InputError(f"{where}:{key}", reason)

    if not isinstance(key, str) or not key:
        fail("sample has no __key__")
    members = {k: v for k, v in raw.items() if not k.startswith("__")}
    for k, v in members.items():
        if not isinstance(v, (bytes, bytearray, memoryview)):
            fail(f"member {k} is {type(v).__name__}, expected raw bytes (do not decode before this)")
    frames: dict[str, np.ndarray] = {}
    kept: dict[str, bytes] = {}
    for name in ("frame0", "frame1"):
        found = [f"{name}.{fmt}" for fmt in IMAGE_FORMATS if f"{name}.{fmt}" in members]
        if not found:
            fail(f"missing member {name}.jpg/.png")
        if len(found) > 1:
            fail(f"both {found[0]} and {found[1]} present")
        data = bytes(members[found[0]])
        img = decode_image(data)
        if img is None:
            fail(f"corrupt image {found[0]}")
        frames[name] = img
        kept[found[0]] = data
    for m in MEMBERS_FIXED:
        if m not in members:
            fail(f"missing member {m}")
    extra = sorted(set(members) - set(kept) - set(MEMBERS_FIXED))
    if extra:
        fail(f"unexpected member(s) {', '.join(extra)}")
    try:
        tracks = np.lib.format.read_array(io.BytesIO(bytes(members["tracks.npy"])), allow_pickle=False)
    except Exception as e:  # numpy raises ValueError/OSError/EOFError for truncated or pickled data
        fail(f"corrupt tracks.npy: {type(e).__name__}: {e}")
    try:
        meta = json.loads(bytes(members["meta.json"]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(f"corrupt meta.json: {e}")
    sample = LabelSample(key=key, frame0=frames["frame0"], frame1=frames["frame1"], tracks=tracks, meta=meta,
                         raw=kept)
    if validate:
        validate_sample(sample, where)
    return sample
