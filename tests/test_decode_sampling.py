"""Decoding (validation, exact counts, frame-accurate access) and pair / query sampling."""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import badinputs  # noqa: E402

from pipeline import decode, sampling, sources  # noqa: E402
from pipeline.common import ErrorLog, InputError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return badinputs.write_corpus(tmp_path_factory.mktemp("corpus"))


def _sequential(path) -> np.ndarray:
    """Reference: decode every frame in order with plain PyAV → uint8 [T, H, W, 3]."""
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


# ------------------------------------------------------------------------------------------ decoding
@pytest.mark.parametrize("ext", [".mp4", ".webm", ".avi", ".mkv", ".mov"])
def test_read_is_frame_accurate(tmp_path, ext):
    path = badinputs.make_good_video(tmp_path / f"v{ext}", n_frames=40, size=(64, 48), seed=5, gop=8)
    ref = _sequential(path)
    rng = np.random.default_rng(0)
    with decode.open_video(path) as r:
        assert r.num_frames == len(ref) == 40
        assert (r.width, r.height, r.orig_width, r.orig_height) == (64, 48, 64, 48)
        assert r.fps == pytest.approx(24.0)
        idx = [39, 0, 17, 17, 8, 7, 31, 32, 1] + list(rng.integers(0, 40, 20))
        got = r.read(idx)
        assert got.dtype == np.uint8 and got.shape == (len(idx), 48, 64, 3)
        assert np.array_equal(got, ref[idx])
        # Sequential iteration agrees too.
        assert np.array_equal(np.stack([f for _, f in r.iter_frames(10, 20)]), ref[10:20])
        with pytest.raises(IndexError):
            r.read([40])
    # The decoded frame t is the encoded source frame t (not a neighbour).
    src = badinputs.good_video_frames(40, (64, 48), seed=5).astype(np.float32)
    err = np.abs(ref.astype(np.float32)[:, None] - src[None]).mean(axis=(2, 3, 4))   # [T, T]
    assert np.array_equal(err.argmin(axis=1), np.arange(40))


def test_read_tar_member_and_downscale(tmp_path):
    path = badinputs.make_good_video(tmp_path / "v.mp4", n_frames=16, size=(96, 64), seed=6)
    shard = badinputs.write_tar(tmp_path / "s.tar", {"k.mp4": path.read_bytes()})
    item = next(sources.iter_videos(str(shard)))
    assert item.path is None
    ref = _sequential(path)
    with decode.open_video(item) as r:
        assert r.name == f"{shard}#k.mp4" and r.num_frames == 16
        assert np.array_equal(r.read([15, 3, 9]), ref[[15, 3, 9]])
    with decode.open_video(item, max_side=48) as r:
        assert (r.width, r.height, r.orig_width, r.orig_height) == (48, 32, 96, 64)
        small = r.read([2, 11])
        assert small.shape == (2, 32, 48, 3)
        # Area-downscaled frames match the 2x2 block means of the full-size frames.
        blocks = ref[[2, 11]].astype(np.float32).reshape(2, 32, 2, 48, 2, 3).mean(axis=(2, 4))
        assert np.abs(small.astype(np.float32) - blocks).max() <= 0.5 + 1e-6


@pytest.mark.parametrize("name", sorted(badinputs.DECODE_BAD))
def test_bad_videos_are_rejected_with_reason(corpus, name):
    with pytest.raises(InputError) as e:
        decode.open_video(corpus[name])
    assert e.value.input == str(corpus[name])
    assert badinputs.DECODE_BAD[name] in e.value.reason


def test_huge_declared_size_is_never_handed_to_ffmpeg(corpus, monkeypatch):
    import av

    def boom(*a, **k):
        raise AssertionError("av.open must not be reached for a declared 100000x100000 video")

    monkeypatch.setattr(av, "open", boom)
    with pytest.raises(InputError, match="100000x100000 exceeds the limit"):
        decode.open_video(corpus["huge_declared.y4m"])


def test_size_limits(tmp_path):
    with pytest.raises(InputError, match="exceeds the limit"):
        decode.open_video(badinputs.write_huge_declared_y4m(tmp_path / "w.y4m", width=9000, height=16))
    with pytest.raises(InputError, match="below the minimum"):
        decode.open_video(badinputs.write_tiny_video(tmp_path / "t.mp4", size=(6, 64)))
    ok = badinputs.write_tiny_video(tmp_path / "ok.mp4", size=(8, 8))
    with decode.open_video(ok) as r:
        assert r.num_frames == 4 and r.read([3]).shape == (1, 8, 8, 3)
    with pytest.raises(InputError, match="no such file"):
        decode.open_video(tmp_path / "absent.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(InputError, match="empty file"):
        decode.open_video(tmp_path / "empty.mp4")


def test_exact_frame_count_when_metadata_lies(tmp_path):
    """An AVI whose stream header claims 999 frames: the count comes from decoding (24)."""
    path = badinputs.make_good_video(tmp_path / "v.avi", n_frames=24, seed=8)
    data = bytearray(path.read_bytes())
    pos = data.find(b"strh")
    assert pos > 0 and data[pos + 8:pos + 12] == b"vids"
    length_at = pos + 8 + 32                                    # strh.dwLength
    assert struct.unpack("<I", data[length_at:length_at + 4])[0] == 24
    data[length_at:length_at + 4] = struct.pack("<I", 999)
    liar = tmp_path / "liar.avi"
    liar.write_bytes(bytes(data))
    import av

    with av.open(str(liar)) as c:
        assert c.streams.video[0].frames == 999                 # the container really does lie
    ref = _sequential(path)
    with decode.open_video(liar) as r:
        assert r.num_frames == 24 and r.index_method == "decode"
        assert np.array_equal(r.read([23, 0, 12]), ref[[23, 0, 12]])


def test_run_over_corpus_records_failures_and_finishes(corpus, tmp_path):
    log_path = tmp_path / "errors.jsonl"
    log = ErrorLog(log_path)
    specs = [str(corpus["good_a.mp4"].parent), str(corpus["shard.tar"]), str(corpus["missing.mp4"])]
    done = {}
    for item, reader in decode.iter_readers(sources.iter_videos(specs, errors=log), errors=log, max_side=32):
        with reader:
            done[item.uri] = reader.read([0, reader.num_frames - 1]).shape
    recs = [json.loads(line) for line in log_path.read_text().splitlines()]
    failed = {r["input"]: r["reason"] for r in recs}
    for name, why in badinputs.DECODE_BAD.items():
        assert why in failed[str(corpus[name])]
    assert f"{corpus['shard.tar']}#bad.mp4" in failed and str(corpus["missing.mp4"]) in failed
    assert done == {str(corpus["good_a.mp4"]): (2, 24, 32, 3), str(corpus["good_b.webm"]): (2, 24, 32, 3),
                    f"{corpus['shard.tar']}#000.mp4": (2, 24, 32, 3),
                    f"{corpus['shard.tar']}#002.mp4": (2, 24, 32, 3)}


# ------------------------------------------------------------------------------------------ sampling
def test_defaults_match_yaml():
    data = yaml.safe_load((REPO / "configs" / "label" / "sampling_default.yaml").read_text())
    assert data == {"sampling": sampling.DEFAULTS}


def test_derive_seed_is_stable_and_distinct():
    assert sampling.derive_seed(0, "abc", 3) == 927874893862478881          # fixed across runs/machines
    assert sampling.derive_seed(0, "abc", 3) != sampling.derive_seed(1, "abc", 3)
    assert sampling.derive_seed(0, "abc", 3) != sampling.derive_seed(0, "abd", 3)
    assert 0 <= sampling.derive_seed(2**40, "x") < 2**63


def test_sample_pairs_constraints_and_determinism():
    cfg = {"pairs_per_video": 12, "gap_frames": [2, 5]}
    a = sampling.sample_pairs(100, 25.0, cfg, seed=7)
    assert a == sampling.sample_pairs(100, 25.0, cfg, seed=7)
    assert a != sampling.sample_pairs(100, 25.0, cfg, seed=8)
    assert len(a) == 12 and len(set(a)) == 12 and a == sorted(a)
    assert all(isinstance(t, int) for p in a for t in p)
    assert all(0 <= t0 < t1 < 100 and 2 <= t1 - t0 <= 5 for t0, t1 in a)
    # Too few candidates → all of them; too short → none.
    assert sampling.sample_pairs(4, 25.0, {"pairs_per_video": 50, "gap_frames": [1, 2]}, 0) == \
        [(0, 1), (0, 2), (1, 2), (1, 3), (2, 3)]
    assert sampling.sample_pairs(2, 25.0, {"gap_frames": [2, 4]}, 0) == []


def test_sample_pairs_gap_in_seconds_and_uniformity():
    pairs = sampling.sample_pairs(600, 30.0, {"pairs_per_video": 200, "gap_seconds": [0.1, 0.2]}, seed=1)
    gaps = {t1 - t0 for t0, t1 in pairs}
    assert gaps <= set(range(3, 7)) and len(gaps) == 4                 # 0.1 s..0.2 s at 30 fps = 3..6
    t0s = np.array([p[0] for p in pairs])
    assert 0.35 < (t0s < 300).mean() < 0.65                            # spread over the whole video


def test_sample_pairs_never_span_a_shot_boundary():
    shots = [(0, 30), (30, 76), (76, 137), (137, 187), (187, 242), (242, 250)]
    for seed in range(5):
        pairs = sampling.sample_pairs(250, 25.0, {"pairs_per_video": 60, "gap_frames": [1, 12]}, seed, shots=shots)
        assert len(pairs) == 60
        for t0, t1 in pairs:
            assert any(a <= t0 and t1 < b for a, b in shots), (t0, t1)
    # A shot shorter than the smallest gap contributes nothing.
    assert sampling.sample_pairs(10, 25.0, {"gap_frames": [3, 3], "pairs_per_video": 9}, 0,
                                 shots=[(0, 3), (3, 10)]) == [(3, 6), (4, 7), (5, 8), (6, 9)]


def test_sample_pairs_rejects_bad_config():
    for cfg, key in [({"gap_frames": [0, 3]}, "gap_frames"), ({"gap_frames": [5, 2]}, "gap_frames"),
                     ({"gap_frames": [1]}, "gap_frames"), ({"pairs_per_video": 0}, "pairs_per_video"),
                     ({"gap_seconds": [-1, 1]}, "gap_seconds")]:
        with pytest.raises(InputError) as e:
            sampling.sample_pairs(100, 25.0, cfg, 0)
        assert e.value.input == f"sampling.{key}"


def _checkerboard(h=96, w=128, cell=12):
    yy, xx = np.mgrid[:h, :w]
    img = (((yy // cell) + (xx // cell)) % 2 * 255).astype(np.uint8)
    return np.repeat(img[..., None], 3, axis=2)


def test_sample_queries_mixed_methods():
    frame = _checkerboard()
    cfg = {"num_points": 100, "mix": {"grid": 0.3, "random": 0.2, "corners": 0.5}, "border": 4}
    q = sampling.sample_queries(frame, cfg, seed=3)
    assert q.dtype == np.float32 and q.shape == (100, 2)
    assert np.array_equal(q, sampling.sample_queries(frame, cfg, seed=3))
    assert not np.array_equal(q, sampling.sample_queries(frame, cfg, seed=4))
    assert np.all(q - np.floor(q) == 0.5)                               # pixel centres
    assert q[:, 0].min() >= 4.5 and q[:, 0].max() <= 128 - 4 - 0.5
    assert q[:, 1].min() >= 4.5 and q[:, 1].max() <= 96 - 4 - 0.5
    assert len(np.unique(q, axis=0)) == 100
    # The last 50 are corners: the board's 70 inner corners sit at multiples of 12 (within 1 px).
    corners = q[50:]
    d = np.abs((corners + 6) % 12 - 6)                                  # distance to nearest multiple of 12
    assert np.all(d.max(axis=1) <= 1.0)


def test_sample_queries_grid_only_and_corner_fallback():
    frame = _checkerboard()
    g = sampling.sample_queries(frame, {"num_points": 48, "mix": {"grid": 1.0}, "border": 0}, seed=0)
    assert np.array_equal(g, sampling.sample_queries(frame, {"num_points": 48, "mix": {"grid": 1}, "border": 0},
                                                     seed=99))             # grid ignores the seed
    xs, ys = np.unique(g[:, 0]), np.unique(g[:, 1])
    assert len(xs) * len(ys) == 48 and np.ptp(np.diff(xs)) <= 1 and np.ptp(np.diff(ys)) <= 1
    flat = np.full((40, 50, 3), 128, np.uint8)                           # no corners at all
    q = sampling.sample_queries(flat, {"num_points": 64, "mix": {"corners": 1.0}, "border": 2}, seed=1)
    assert q.shape == (64, 2) and len(np.unique(q, axis=0)) == 64
    tiny = np.zeros((10, 10, 3), np.uint8)                               # fewer interior pixels than asked
    q = sampling.sample_queries(tiny, {"num_points": 500, "border": 3}, seed=0)
    assert q.shape == (16, 2)
    with pytest.raises(InputError, match="unknown method"):
        sampling.sample_queries(flat, {"mix": {"sift": 1.0}}, 0)


def test_truncated_matroska_and_tolerated_trailing_junk(tmp_path):
    for ext in (".webm", ".mkv"):
        full = badinputs.make_good_video(tmp_path / f"v{ext}", n_frames=24, seed=9)
        cut = tmp_path / f"cut{ext}"
        cut.write_bytes(full.read_bytes()[: full.stat().st_size * 6 // 10])
        with pytest.raises(InputError) as e:
            decode.open_video(cut)
        assert e.value.input == str(cut) and "truncated" in e.value.reason
    good = badinputs.make_good_video(tmp_path / "g.mp4", n_frames=10, seed=10)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(good.read_bytes() + b"\0" * 5)
    with decode.open_video(junk) as r, decode.open_video(good) as g:
        assert r.num_frames == 10 and np.array_equal(r.read([9, 4]), g.read([9, 4]))
