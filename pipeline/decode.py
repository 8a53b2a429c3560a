"""Video decoding with PyAV: a validated open, an exact frame count and frame-accurate random access.

``open_video(source, max_side)`` returns a :class:`VideoReader`. Everything that can be checked without
decoding is checked first, so a bad file fails fast and never allocates a frame buffer:

1. the file exists and is not empty;
2. container structure: an ISO-BMFF (mp4/mov) file whose top-level boxes run past the end of the file,
   or that has no ``moov`` box, is truncated; a Matroska/WebM segment longer than the file is truncated;
   a YUV4MPEG2 header is parsed here, before FFmpeg sees it;
3. the declared frame size is within ``[MIN_SIDE, MAX_SIDE]`` per side and at most ``MAX_PIXELS``;
4. the frame index (below) has at least one frame and no incomplete packet;
5. the first frame decodes.

Frame index. Frame ``i`` is the ``i``-th frame in presentation order, exactly as if the whole video was
decoded sequentially and indexed. For containers and codecs where one packet is one frame (mp4/mov,
Matroska/WebM, y4m with h264/hevc/vp9/av1/...), the index is built from packet timestamps by demuxing
only (no decoding). Otherwise, or when the packet count disagrees with the container's declared frame
count ("metadata lies"), or timestamps are missing or repeated, the index is built by decoding every
frame once (frames are counted, not converted or kept). ``read(indices)`` then seeks to the keyframe
at or before each wanted frame, decodes forward and picks frames by timestamp; it keeps decoding instead
of seeking when no keyframe lies between the current position and the next wanted frame.
"""
from __future__ import annotations

import bisect
import io
import os
import struct
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence

import numpy as np

from .common import ErrorLog, InputError

MAX_SIDE = 8192                 # largest accepted declared width or height
MAX_PIXELS = 8192 * 8192        # largest accepted declared width * height (64 Mpixel)
MIN_SIDE = 8                    # smallest accepted width or height

# Containers (FFmpeg format names) and codecs where one demuxed packet is one displayed frame, so the
# frame index can come from packet timestamps without decoding.
_PACKET_INDEX_FORMATS = ("mov", "mp4", "matroska", "webm", "yuv4mpegpipe")
_PACKET_INDEX_CODECS = {"h264", "hevc", "vp9", "av1", "mjpeg", "ffv1", "rawvideo", "prores", "png", "dnxhd"}


def _check_size(name: str, width: int, height: int, what: str = "declared") -> None:
    """Reject frame sizes outside the limits (raises InputError naming ``name``)."""
    if width <= 0 or height <= 0:
        raise InputError(name, f"{what} frame size {width}x{height} is invalid (unknown or zero)")
    if width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_PIXELS:
        raise InputError(name, f"{what} frame size {width}x{height} exceeds the limit "
                               f"(max side {MAX_SIDE} px, max {MAX_PIXELS} pixels); not decoded")
    if min(width, height) < MIN_SIDE:
        raise InputError(name, f"{what} frame size {width}x{height} is below the minimum side of {MIN_SIDE} px")


def _read_exact(f: BinaryIO, n: int) -> bytes:
    out = b""
    while len(out) < n:
        block = f.read(n - len(out))
        if not block:
            break
        out += block
    return out


def _ebml_vint(data: bytes, pos: int, keep_marker: bool) -> tuple[int, int, bool]:
    """Decode an EBML variable-length integer at ``pos`` → (value, new_pos, all_ones)."""
    if pos >= len(data):
        raise ValueError("eof")
    first = data[pos]
    length = 1
    mask = 0x80
    while length <= 8 and not first & mask:
        mask >>= 1
        length += 1
    if length > 8 or pos + length > len(data):
        raise ValueError("bad vint")
    value = first if keep_marker else first & (mask - 1)
    for b in data[pos + 1:pos + length]:
        value = (value << 8) | b
    all_ones = (first & (mask - 1)) == mask - 1 and all(b == 0xFF for b in data[pos + 1:pos + length])
    return value, pos + length, all_ones


def check_structure(f: BinaryIO, size: int, name: str) -> None:
    """Cheap container-structure checks on the raw bytes, before FFmpeg opens them.

    Reads only box/element headers (a few bytes each). Raises InputError for a truncated ISO-BMFF or
    Matroska file and for a YUV4MPEG2 header declaring a size over the limits.
    """
    f.seek(0)
    head = _read_exact(f, 64)
    if head.startswith(b"YUV4MPEG2"):
        line = head.split(b"\n", 1)[0].decode("ascii", "replace")
        fields = {tok[0]: tok[1:] for tok in line.split()[1:] if tok}
        try:
            width, height = int(fields.get("W", "0")), int(fields.get("H", "0"))
        except ValueError:
            raise InputError(name, f"YUV4MPEG2 header has an invalid frame size: {line!r}") from None
        _check_size(name, width, height)
        return
    if len(head) >= 8 and head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot"):
        pos, boxes = 0, []
        while pos + 8 <= size:
            f.seek(pos)
            hdr = _read_exact(f, 16)
            if len(hdr) < 8:
                break
            box_size, box_type = struct.unpack(">I4s", hdr[:8])
            kind = box_type.decode("latin1", "replace")
            if box_size == 1:
                if len(hdr) < 16:
                    raise InputError(name, f"truncated: box {kind!r} at byte {pos} has an incomplete header")
                box_size = struct.unpack(">Q", hdr[8:16])[0]
            elif box_size == 0:
                box_size = size - pos
            essential = kind in ("moov", "mdat", "moof") or "moov" not in boxes
            if box_size < 8:
                if not essential:
                    break                         # junk after the movie: players ignore it, so do we
                raise InputError(name, f"corrupt mp4/mov structure: box {kind!r} at byte {pos} declares "
                                       f"{box_size} bytes")
            if pos + box_size > size:
                if not essential:
                    break
                raise InputError(name, f"truncated: box {kind!r} at byte {pos} declares {box_size} bytes "
                                       f"but the file ends at byte {size}")
            boxes.append(kind)
            pos += box_size
        if "moov" not in boxes and "moof" not in boxes:
            raise InputError(name, "truncated or incomplete mp4/mov: no 'moov' box (recording not finalized?)")
        return
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        try:
            ebml_size, pos, _ = _ebml_vint(head, 4, keep_marker=False)
            seg_start = 4 + (pos - 4) + ebml_size
            f.seek(seg_start)
            seg = _read_exact(f, 16)
            seg_id, p, _ = _ebml_vint(seg, 0, keep_marker=True)
            seg_size, p, unknown = _ebml_vint(seg, p, keep_marker=False)
        except ValueError:
            raise InputError(name, "truncated or corrupt Matroska/WebM header") from None
        if seg_id == 0x18538067 and not unknown and seg_start + p + seg_size > size:
            raise InputError(name, f"truncated: Matroska segment declares {seg_size} bytes but the file "
                                   f"ends {seg_start + p + seg_size - size} bytes early")


class VideoReader:
    """Random access to the frames of one video (RGB uint8), optionally downscaled.

    Attributes: ``name`` (the input, for messages), ``fps``, ``width``/``height`` (of returned frames),
    ``orig_width``/``orig_height`` (as decoded), ``num_frames`` (exact), ``index_method``
    ("packets" or "decode").
    """

    def __init__(self, name: str, opener: Callable[[], "str | BinaryIO"], size: int, max_side: int | None):
        import av  # heavy import kept local

        self._av = av
        self.name = name
        self._opener = opener
        self._container = None
        self._stream = None
        self._file = None
        self._gen: Iterator | None = None
        self._last_pts: int | None = None
        try:
            self._setup(max_side)
        except BaseException:
            self.close()
            raise

    def _setup(self, max_side: int | None) -> None:
        """Open, check the declared size, build the frame index and decode the first frame."""
        name = self.name
        self._open_container()
        container, stream = self._container, self._stream
        cc = stream.codec_context
        _check_size(name, int(cc.width or 0), int(cc.height or 0))
        self.orig_width, self.orig_height = int(cc.width), int(cc.height)
        self.codec = cc.name
        self.format = container.format.name
        self.time_base = stream.time_base
        self._declared_frames = int(stream.frames or 0)
        self._pts: list[int] | None = None      # frame index → pts (display order); None: sequential only
        self._key_idx: list[int] = [0]           # frame indices where decoding may start (keyframes)
        self.index_method = ""
        self._build_index()
        if self.num_frames == 0:
            raise InputError(name, "zero frames: the video stream contains no frames")
        self.fps = self._frame_rate()
        self._set_output_size(max_side)
        # Probe: the first frame must decode (and its real size must be acceptable too).
        first = self._decode_first()
        if self._pts is not None and first.pts != self._pts[0] and self.index_method == "packets":
            self._build_index(force_decode=True)                 # packet timestamps do not match frames
            if self.num_frames == 0:
                raise InputError(name, "zero frames: no frame decodes")
            first = self._decode_first()
        if (first.width, first.height) != (self.orig_width, self.orig_height):
            _check_size(name, first.width, first.height, what="decoded")
            self.orig_width, self.orig_height = first.width, first.height
            self._set_output_size(max_side)

    # ------------------------------------------------------------------ container handling
    def _open_container(self) -> None:
        av = self._av
        self.close()
        target = self._opener()
        self._file = None if isinstance(target, str) else target
        try:
            container = av.open(target, mode="r", metadata_errors="ignore")
        except av.error.FFmpegError as e:
            self._close_file()
            raise InputError(self.name, f"cannot open as a video (not a video, or truncated/corrupt): "
                                        f"{getattr(e, 'strerror', None) or e}") from None
        except (OSError, ValueError) as e:
            self._close_file()
            raise InputError(self.name, f"cannot open as a video: {e}") from None
        if not container.streams.video:
            container.close()
            self._close_file()
            raise InputError(self.name, "no video stream in the file")
        stream = container.streams.video[0]
        # Defence in depth: the decoder refuses frames larger than our limit whatever the header said.
        opts = dict(stream.codec_context.options or {})
        opts["max_pixels"] = str(MAX_PIXELS)
        stream.codec_context.options = opts
        self._container, self._stream = container, stream
        self._gen, self._last_pts = None, None

    def _close_file(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception:
                pass
            self._file = None

    def close(self) -> None:
        """Release the container and file (safe to call twice)."""
        if self._container is not None:
            try:
                self._container.close()
            except Exception:
                pass
            self._container = None
        self._gen = None
        self._close_file()

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ index
    def _build_index(self, force_decode: bool = False) -> None:
        av = self._av
        use_packets = (any(f in self.format.split(",") for f in _PACKET_INDEX_FORMATS)
                       and self.codec in _PACKET_INDEX_CODECS and not force_decode)
        if use_packets:
            pts, keys = [], []
            try:
                for packet in self._container.demux(self._stream):
                    if not packet.size:
                        continue
                    if packet.is_corrupt:
                        raise InputError(self.name, f"truncated or corrupt: packet {len(pts)} is incomplete "
                                                    f"(container declares {self._declared_frames} frames)")
                    pts.append(packet.pts)
                    keys.append(bool(packet.is_keyframe))
            except av.error.FFmpegError as e:
                raise InputError(self.name, f"truncated or corrupt: demuxing failed after {len(pts)} "
                                            f"packets: {getattr(e, 'strerror', None) or e}") from None
            consistent = (None not in pts and len(set(pts)) == len(pts)
                          and self._declared_frames in (0, len(pts)))
            if consistent:
                order = sorted(range(len(pts)), key=lambda i: pts[i])
                self._pts = [pts[i] for i in order]
                self._key_idx = [rank for rank, i in enumerate(order) if keys[i]] or [0]
                if self._key_idx[0] != 0:
                    self._key_idx.insert(0, 0)
                self.index_method = "packets"
                self._open_container()
                return
            self._open_container()
        # Decode-count fallback: decode every frame once, keep only timestamps and keyframe flags.
        pts, keys = [], []
        try:
            for frame in self._container.decode(self._stream):
                pts.append(frame.pts)
                keys.append(bool(frame.key_frame))
        except av.error.FFmpegError as e:
            raise InputError(self.name, f"truncated or corrupt: decoding failed after {len(pts)} frames: "
                                        f"{getattr(e, 'strerror', None) or e}") from None
        self.index_method = "decode"
        if None in pts or len(set(pts)) != len(pts) or pts != sorted(pts):
            self._pts = None                  # no usable timestamps: frames are found by counting
            self._count = len(pts)
            self._key_idx = [0]
        else:
            self._pts = pts
            self._key_idx = [i for i, k in enumerate(keys) if k] or [0]
            if self._key_idx[0] != 0:
                self._key_idx.insert(0, 0)
        self._open_container()

    @property
    def num_frames(self) -> int:
        return len(self._pts) if self._pts is not None else self._count

    def _frame_rate(self) -> float:
        s = self._stream
        for rate in (s.average_rate, s.guessed_rate, s.base_rate):
            if rate is not None and float(rate) > 0:
                return float(rate)
        if self._pts is not None and len(self._pts) > 1:
            step = float(np.median(np.diff(self._pts))) * float(self.time_base)
            if step > 0:
                return 1.0 / step
        raise InputError(self.name, "unknown frame rate")

    def _set_output_size(self, max_side: int | None) -> None:
        w, h = self.orig_width, self.orig_height
        if max_side is not None:
            if int(max_side) < MIN_SIDE:
                raise ValueError(f"max_side must be >= {MIN_SIDE}, got {max_side}")
            if max(w, h) > max_side:
                s = max_side / max(w, h)
                w, h = max(1, round(w * s)), max(1, round(h * s))
        self.width, self.height = int(w), int(h)

    @property
    def timestamps(self) -> np.ndarray:
        """Presentation time of each frame in seconds from the first frame, float64 [num_frames]."""
        if self._pts is None:
            return np.arange(self.num_frames, dtype=np.float64) / self.fps
        p = np.asarray(self._pts, dtype=np.float64)
        return (p - p[0]) * float(self.time_base)

    # ------------------------------------------------------------------ decoding
    def _frames(self) -> Iterator:
        for packet in self._container.demux(self._stream):
            for frame in packet.decode():
                yield frame

    def _to_rgb(self, frame) -> np.ndarray:
        if (frame.width, frame.height) != (self.orig_width, self.orig_height):
            raise InputError(self.name, f"frame size changes mid-stream ({frame.width}x{frame.height} vs "
                                        f"{self.orig_width}x{self.orig_height})")
        arr = frame.to_ndarray(format="rgb24")                  # [H0, W0, 3] uint8, full size
        if (self.width, self.height) != (frame.width, frame.height):
            import cv2

            # Area (box) filter in RGB: each output pixel is the mean of the input pixels it covers.
            arr = cv2.resize(arr, (self.width, self.height), interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(arr)  # [H, W, 3] uint8

    def _decode_first(self):
        """Decode the first frame (proves the stream decodes); leaves the decoder positioned after it."""
        av = self._av
        try:
            self._gen = self._frames()
            for frame in self._gen:
                self._last_pts = frame.pts
                return frame
        except av.error.FFmpegError as e:
            raise InputError(self.name, f"cannot decode the first frame: {getattr(e, 'strerror', None) or e}") \
                from None
        self._gen = None
        raise InputError(self.name, "cannot decode any frame (undecodable or truncated stream)")

    def read(self, indices: Sequence[int]) -> np.ndarray:
        """Frames at ``indices`` (any order, repeats allowed) → uint8 [len(indices), H, W, 3] RGB."""
        idx = [int(i) for i in indices]
        out = np.empty((len(idx), self.height, self.width, 3), np.uint8)
        if not idx:
            return out
        for i in idx:
            if not 0 <= i < self.num_frames:
                raise IndexError(f"{self.name}: frame {i} out of range [0, {self.num_frames})")
        wanted = sorted(set(idx))
        got = self._read_sorted(wanted)
        for k, i in enumerate(idx):
            out[k] = got[i]
        return out

    def iter_frames(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Sequentially yield ``(index, rgb [H, W, 3])`` for frames in ``[start, stop)``."""
        stop = self.num_frames if stop is None else min(stop, self.num_frames)
        chunk = 16
        for s in range(start, stop, chunk):
            frames = self.read(range(s, min(s + chunk, stop)))
            for k in range(frames.shape[0]):
                yield s + k, frames[k]

    def _read_sorted(self, wanted: list[int]) -> dict[int, np.ndarray]:
        av = self._av
        try:
            if self._pts is None:
                return self._read_by_count(wanted)
            got: dict[int, np.ndarray] = {}
            for i in wanted:
                got[i] = self._read_one(i)
            return got
        except av.error.FFmpegError as e:
            self._gen = None
            raise InputError(self.name, f"decoding failed: {getattr(e, 'strerror', None) or e}") from None

    def _read_by_count(self, wanted: list[int]) -> dict[int, np.ndarray]:
        self._open_container()
        got, want = {}, set(wanted)
        for n, frame in enumerate(self._frames()):
            if n in want:
                got[n] = self._to_rgb(frame)
                if len(got) == len(want):
                    break
        self._gen = None
        missing = sorted(want - set(got))
        if missing:
            raise InputError(self.name, f"frame {missing[0]} could not be decoded")
        return got

    def _read_one(self, i: int) -> np.ndarray:
        """Decode frame ``i`` (pts-matched), continuing the current decode when that is cheaper."""
        target = self._pts[i]
        k = bisect.bisect_right(self._key_idx, i) - 1          # last keyframe at or before frame i
        plan: list = []
        if (self._gen is not None and self._last_pts is not None and self._last_pts < target
                and self._pts[self._key_idx[k]] <= self._last_pts):
            plan.append("continue")                              # no keyframe in between: keep decoding
        plan.append(k)
        if k > 0:
            plan.append(k - 1)                                   # seek landed late: one keyframe earlier
        plan.append("start")                                     # last resort: decode from the beginning
        for step in plan:
            if step == "start":
                self._open_container()
                self._gen = self._frames()
                self._last_pts = None
            elif step != "continue":
                self._container.seek(self._pts[self._key_idx[step]], backward=True, any_frame=False,
                                     stream=self._stream)
                self._gen = self._frames()
                self._last_pts = None
            for frame in self._gen:
                if frame.pts is None:
                    continue
                self._last_pts = frame.pts
                if frame.pts == target:
                    return self._to_rgb(frame)
                if frame.pts > target:
                    break
            self._gen = None                                     # overshot or exhausted
        raise InputError(self.name, f"frame {i} (pts {target}) could not be decoded")


def _source_opener(source) -> tuple[str, Callable[[], "str | BinaryIO"], int]:
    """(name for messages, opener returning a path or file object, byte size) for a source."""
    path = getattr(source, "path", None)
    if hasattr(source, "open") and hasattr(source, "uri"):        # a sources.VideoItem
        name = source.uri
        if path is not None:
            p = str(path)
            size = os.path.getsize(p) if os.path.exists(p) else -1
            return name, (lambda: p), size
        def opener():
            return source.open()
        f = source.open()
        try:
            f.seek(0, io.SEEK_END)
            size = f.tell()
        finally:
            f.close()
        return name, opener, size
    p = str(Path(source))
    return p, (lambda: p), (os.path.getsize(p) if os.path.exists(p) else -1)


def open_video(source, max_side: int | None = None) -> VideoReader:
    """Open a video (a ``sources.VideoItem``, a path) for frame-accurate reading; see module docstring.

    ``max_side``: frames are returned downscaled (area filter, aspect kept) so the longer side is at most
    this. Raises InputError naming the input for anything that is not a usable video.
    """
    name, opener, size = _source_opener(source)
    if size < 0:
        raise InputError(name, "no such file")
    if size == 0:
        raise InputError(name, "empty file (0 bytes)")
    target = opener()
    f = open(target, "rb") if isinstance(target, str) else target
    try:
        check_structure(f, size, name)
    except OSError as e:
        raise InputError(name, f"cannot read: {e}") from None
    finally:
        f.close()
    return VideoReader(name, opener, size, max_side)


def iter_readers(items, errors: ErrorLog | None = None, max_side: int | None = None):
    """Yield ``(item, reader)`` for each item that opens; record the others in ``errors`` and go on.

    With ``errors=None`` the first bad video raises InputError. The caller closes each reader (or uses it
    as a context manager).
    """
    for item in items:
        try:
            reader = open_video(item, max_side=max_side)
        except InputError as e:
            if errors is None:
                raise
            errors.record(e.input, e.reason)
            continue
        yield item, reader
