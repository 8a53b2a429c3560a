"""Write small real videos and a corpus of bad inputs (reused by the source, decode and labeling tests).

``make_good_video`` encodes a real video with PyAV (container from the extension: .mp4/.mov/.mkv →
H.264 with B-frames and a short GOP, .webm → VP9, .avi → MPEG-4 Part 2). ``write_corpus(dir)`` writes
every bad case next to a few good videos and returns their paths; ``DECODE_BAD`` / ``SOURCE_BAD`` say
which substring the error reason must contain.
"""
from __future__ import annotations

import io
import struct
import tarfile
from pathlib import Path

import numpy as np

# file name → substring of the InputError reason raised by pipeline.decode.open_video
DECODE_BAD = {
    "truncated.mp4": "truncated",            # moov first (faststart), mdat cut short
    "truncated_tail.mp4": "truncated",       # moov at the end, lost with the tail
    "not_video.mp4": "cannot open as a video",
    "zero_frames.mp4": "zero frames",
    "one_by_one.mp4": "below the minimum",
    "huge_declared.y4m": "exceeds the limit",
}


def good_video_frames(n_frames: int = 24, size: tuple[int, int] = (64, 48), seed: int = 0) -> np.ndarray:
    """Deterministic textured frames that move (uint8 [T, H, W, 3]).

    A smooth random texture drifts by a seed-dependent integer velocity, and a bright square moves the
    other way, so consecutive frames differ and have corners.
    """
    w, h = size
    rng = np.random.default_rng(seed)
    vx, vy = int(rng.integers(1, 3)), int(rng.integers(0, 2))
    big = rng.integers(0, 256, (h // 4 + n_frames + 4, w // 4 + n_frames + 4, 3)).astype(np.float32)
    tex = np.kron(big, np.ones((4, 4, 1), np.float32))               # blocky texture, 4-px cells
    frames = np.empty((n_frames, h, w, 3), np.uint8)
    for t in range(n_frames):
        ox, oy = (vx * t) % (tex.shape[1] - w), (vy * t) % (tex.shape[0] - h)
        img = tex[oy:oy + h, ox:ox + w].copy()
        s = max(4, min(w, h) // 4)
        x = (w - s - 2 * t) % (w - s)
        y = (h - s) // 2
        img[y:y + s, x:x + s] = (255, 240, 40)
        frames[t] = img.astype(np.uint8)
    return frames


_CODECS = {".mp4": "libx264", ".mov": "libx264", ".mkv": "libx264", ".webm": "libvpx-vp9", ".avi": "mpeg4"}


def make_good_video(path, n_frames: int = 24, size: tuple[int, int] = (64, 48), seed: int = 0,
                    fps: int = 24, gop: int = 8, faststart: bool = False) -> Path:
    """Encode ``good_video_frames(n_frames, size, seed)`` into ``path`` (size is (width, height))."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = _CODECS[path.suffix.lower()]
    opts = {"g": str(gop)}
    if codec == "libx264":
        opts.update({"bf": "2", "threads": "1", "preset": "medium"})
    elif codec == "libvpx-vp9":
        opts.update({"threads": "1", "deadline": "realtime", "cpu-used": "8"})
    frames = good_video_frames(n_frames, size, seed)
    container_opts = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=container_opts) as c:
        s = c.add_stream(codec, rate=fps, options=opts)
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
        for img in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


def write_truncated_mp4(path, keep: float = 0.6, faststart: bool = True) -> Path:
    """A real mp4 cut to ``keep`` of its bytes (faststart: header intact, frame data cut; else moov lost)."""
    path = Path(path)
    tmp = path.with_name(path.stem + ".full" + path.suffix)
    make_good_video(tmp, n_frames=24, seed=3, faststart=faststart)
    data = tmp.read_bytes()
    tmp.unlink()
    path.write_bytes(data[:int(len(data) * keep)])
    return path


def write_non_video(path) -> Path:
    """Text and random bytes named like a video."""
    rng = np.random.default_rng(7)
    Path(path).write_bytes(b"this is not a video, just some text\n" * 20 + rng.bytes(4096))
    return Path(path)


def _zero_sample_tables(data: bytes) -> bytes:
    """Set every sample-table entry count in an mp4 to zero (the track then has no frames)."""
    buf = bytearray(data)

    def walk(start: int, end: int) -> None:
        pos = start
        while pos + 8 <= end:
            size, kind = struct.unpack(">I4s", buf[pos:pos + 8])
            if size < 8:
                return
            if kind in (b"moov", b"trak", b"mdia", b"minf", b"stbl"):
                walk(pos + 8, pos + size)
            elif kind in (b"stts", b"stss", b"ctts", b"stsc", b"stco", b"co64"):
                buf[pos + 12:pos + 16] = b"\0\0\0\0"
            elif kind == b"stsz":
                buf[pos + 12:pos + 20] = b"\0" * 8
            pos += size

    walk(0, len(buf))
    return bytes(buf)


def write_zero_frame_mp4(path) -> Path:
    """An mp4 with a valid 64x48 H.264 video track that has zero samples."""
    path = Path(path)
    tmp = path.with_name(path.stem + ".full" + path.suffix)
    make_good_video(tmp, n_frames=8, seed=4)
    data = _zero_sample_tables(tmp.read_bytes())
    tmp.unlink()
    path.write_bytes(data)
    return path


def write_tiny_video(path, size: tuple[int, int] = (1, 1), n_frames: int = 4) -> Path:
    """A real, decodable 1x1 H.264 (yuv444p) video."""
    import av

    path = Path(path)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=24, options={"threads": "1"})
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv444p"
        for t in range(n_frames):
            img = np.full((size[1], size[0], 3), 40 * t, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


def write_huge_declared_y4m(path, width: int = 100000, height: int = 100000) -> Path:
    """A YUV4MPEG2 file whose header declares ``width`` x ``height`` followed by a few bytes of frame."""
    header = f"YUV4MPEG2 W{width} H{height} F25:1 Ip A1:1 C420jpeg\n".encode()
    Path(path).write_bytes(header + b"FRAME\n" + b"\x80" * 1024)
    return Path(path)


def write_tar(path, members: dict[str, bytes]) -> Path:
    """A plain tar of ``{name: bytes}`` in the given order (deterministic metadata)."""
    path = Path(path)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tf.addfile(info, io.BytesIO(data))
    return path


def write_corrupt_tar(path, members: dict[str, bytes], corrupt: str) -> Path:
    """Like :func:`write_tar`, but the header of member ``corrupt`` gets a wrong checksum."""
    path = write_tar(path, members)
    with tarfile.open(path) as tf:
        offset = next(m.offset for m in tf.getmembers() if m.name == corrupt)
    data = bytearray(path.read_bytes())
    data[offset + 148:offset + 156] = b"0000001\0"
    path.write_bytes(bytes(data))
    return path


def write_url_list(path, entries: list[str]) -> Path:
    """A list file with the entries between comment, blank and whitespace-only lines."""
    lines = ["# flowdistill source list", ""]
    for e in entries:
        lines += [e, "   ", "# a comment line", ""]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Path(path)


def write_corpus(root) -> dict[str, Path]:
    """Write good videos and every bad case under ``root``; return ``{name: path}``.

    Keys: ``good_a.mp4``, ``good_b.webm`` (good), the :data:`DECODE_BAD` names (in ``root/videos``),
    ``shard.tar`` (two good members around one with a corrupt header, named ``bad.mp4``),
    ``sources.txt`` (list with blank/comment lines naming good_a, a missing file and a ``pipe:cat``),
    ``empty_dir`` and ``missing.mp4`` (not created).
    """
    root = Path(root)
    vids = root / "videos"
    vids.mkdir(parents=True, exist_ok=True)
    out = {
        "good_a.mp4": make_good_video(vids / "good_a.mp4", seed=1),
        "good_b.webm": make_good_video(vids / "good_b.webm", n_frames=12, seed=2),
        "truncated.mp4": write_truncated_mp4(vids / "truncated.mp4", faststart=True),
        "truncated_tail.mp4": write_truncated_mp4(vids / "truncated_tail.mp4", faststart=False),
        "not_video.mp4": write_non_video(vids / "not_video.mp4"),
        "zero_frames.mp4": write_zero_frame_mp4(vids / "zero_frames.mp4"),
        "one_by_one.mp4": write_tiny_video(vids / "one_by_one.mp4"),
        "huge_declared.y4m": write_huge_declared_y4m(vids / "huge_declared.y4m"),
    }
    m1 = make_good_video(root / "m1.mp4", n_frames=10, seed=11).read_bytes()
    m2 = make_good_video(root / "m2.mp4", n_frames=10, seed=12).read_bytes()
    (root / "m1.mp4").unlink()
    (root / "m2.mp4").unlink()
    out["shard.tar"] = write_corrupt_tar(root / "shard.tar",
                                         {"000.mp4": m1, "bad.mp4": b"x" * 1500, "002.mp4": m2}, "bad.mp4")
    out["sources.txt"] = write_url_list(root / "sources.txt",
                                        ["videos/good_a.mp4", "videos/missing_in_list.mp4",
                                         "pipe:cat videos/good_b.webm"])
    (root / "empty_dir").mkdir(exist_ok=True)
    out["empty_dir"] = root / "empty_dir"
    out["missing.mp4"] = root / "missing.mp4"
    return out
