"""Shard contract: schema v1 validation, deterministic encoding, atomic reproducible shards, strict reader."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.common import InputError, sha256_file
from pipeline.schema import (META_FIELDS, SCHEMA_VERSION, LabelSample, decode_sample, encode_sample, make_key,
                             make_meta, parse_key, validate_sample)
from pipeline.shards import (ShardWriter, check_tar_complete, index_path_for, iter_raw, iter_samples, list_shards,
                             read_index, rewrite_shards, verify_shard, write_index)

H, W, N = 24, 32, 12


def make_sample(i: int, n: int = N, h: int = H, w: int = W) -> LabelSample:
    """A valid sample: smooth frames shifted by one pixel, tracks inside the frame."""
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    f0 = np.stack([128 + 100 * np.sin(xx / 5 + i), 128 + 100 * np.cos(yy / 4), 128 + 90 * np.sin((xx + yy) / 7)],
                  -1).round().astype(np.uint8)
    f1 = np.roll(f0, 1, axis=1)
    tr = np.zeros((n, 6), np.float32)
    tr[:, 0] = rng.uniform(0, w, n)
    tr[:, 1] = rng.uniform(0, h, n)
    tr[:, 2] = np.clip(tr[:, 0] + 1.0, 0, w)
    tr[:, 3] = tr[:, 1]
    tr[:, 4] = (rng.random(n) > 0.3).astype(np.float32)
    tr[:, 5] = rng.uniform(0, 8, n)
    meta = make_meta(video_id=f"v{i:04x}ab", source=f"file:///videos/{i}.mp4", t0=2 * i, t1=2 * i + 3, fps=25.0,
                     orig_size=(4 * w, 4 * h),
                     teacher={"id": "tiny-lras", "checkpoint_sha256": "c" * 64, "config_hash": "d" * 16},
                     tracer={"method": "kl", "sigma": 0.5}, label_set="demo", version="v0001", rank=0,
                     created="2025-01-01T00:00:00Z")
    return LabelSample(make_key(meta["video_id"], meta["t0"], meta["t1"]), f0, f1, tr, meta)


def write(out: Path, samples, **kw) -> list[dict]:
    with ShardWriter(out, **kw) as w:
        for s in samples:
            w.write(s)
    return w.closed_shards


def tar_files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.suffix == ".tar"}


# ------------------------------------------------------------------------------------------- schema

def test_make_key_format_and_rejections():
    assert make_key("abc123", 7, 12) == "abc123_000007_000012"
    assert parse_key("abc_1_000007_000012") == ("abc_1", 7, 12)
    with pytest.raises(InputError, match="no dots"):
        make_key("a.b", 0, 1)
    with pytest.raises(InputError, match="t0=5 must be < t1=5"):
        make_key("abc", 5, 5)
    with pytest.raises(InputError, match="int >= 0"):
        make_key("abc", -1, 3)
    assert set(META_FIELDS) <= set(make_sample(0).meta) and make_sample(0).meta["schema_version"] == SCHEMA_VERSION


def test_encoding_is_deterministic_and_decodes_back():
    s = make_sample(1)
    a, b = encode_sample(s, "png"), encode_sample(s, "png")
    assert a == b
    assert sorted(a) == ["__key__", "frame0.png", "frame1.png", "meta.json", "tracks.npy"]
    assert json.loads(a["meta.json"]) == s.meta
    d = decode_sample(a, "mem")
    assert np.array_equal(d.frame0, s.frame0) and np.array_equal(d.frame1, s.frame1)
    assert d.tracks.dtype == np.float32 and np.array_equal(d.tracks, s.tracks)


def _mutations():
    """(name, function making a bad sample from a good one, expected reason fragment)."""
    def tracks(fn):
        def f(s):
            t = s.tracks.copy()
            return dataclasses.replace(s, tracks=fn(t))
        return f

    def meta(fn):
        def f(s):
            m = json.loads(json.dumps(s.meta))
            fn(m)
            return dataclasses.replace(s, meta=m)
        return f

    def nan(t):
        t[3, 2] = np.nan
        return t

    def vis(t):
        t[0, 4] = 1.5
        return t

    def query(t):
        t[1, 0] = W + 2
        return t

    def target(t):
        t[2, 4] = 1.0
        t[2, 3] = H + 5
        return t

    return [
        ("tracks_float64", tracks(lambda t: t.astype(np.float64)), "tracks dtype float64"),
        ("tracks_shape", tracks(lambda t: t[:, :5].copy()), "tracks shape"),
        ("tracks_nan", tracks(nan), "NaN"),
        ("visible_range", tracks(vis), "visible=1.5 outside [0, 1]"),
        ("query_outside", tracks(query), "query"),
        ("visible_target_outside", tracks(target), "visible target"),
        ("key_dot", lambda s: dataclasses.replace(s, key=s.key.replace("_", ".", 1)), "dot"),
        ("key_mismatch", lambda s: dataclasses.replace(s, key=s.key[:-1] + "9"), "does not match meta"),
        ("frame_dtype", lambda s: dataclasses.replace(s, frame0=s.frame0.astype(np.float32)), "frame0 dtype"),
        ("frame_gray", lambda s: dataclasses.replace(s, frame1=s.frame1[..., 0].copy()), "frame1 shape"),
        ("frame_size", lambda s: dataclasses.replace(s, frame1=s.frame1[:-2].copy()), "differ in size"),
        ("meta_missing", meta(lambda m: m.pop("teacher")), "missing teacher"),
        ("meta_version", meta(lambda m: m.update(schema_version=2)), "schema_version"),
        ("meta_fps_nan", meta(lambda m: m.update(fps=float("nan"))), "fps"),
    ]


MUTATIONS = _mutations()


@pytest.mark.parametrize("name,mutate,reason", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_bad_sample_rejected_on_write(tmp_path, name, mutate, reason):
    good, bad = make_sample(0), mutate(make_sample(1))
    with pytest.raises(InputError) as ei:
        validate_sample(bad, "x")
    assert reason in ei.value.reason and str(ei.value).startswith(f"x:{bad.key}")
    with ShardWriter(tmp_path, maxcount=10) as w:
        w.write(good)
        with pytest.raises(InputError) as ei:
            w.write(bad)
    msg = str(ei.value)
    assert "labels-0-000000.tar" in msg and bad.key in msg and reason in msg
    # the rejected sample never reached the shard
    assert [s.key for s in iter_samples(tmp_path)] == [good.key]


def _write_raw_shard(path: Path, raws: list[dict]) -> None:
    """Write raw member dicts with webdataset's TarWriter directly (bypassing our validation)."""
    import webdataset as wds

    with wds.TarWriter(str(path), encoder=False, mtime=0) as tw:
        for r in raws:
            tw.write(r)


@pytest.mark.parametrize("name,mutate,reason", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_bad_sample_rejected_on_read(tmp_path, name, mutate, reason):
    bad = mutate(make_sample(1))
    if name == "frame_dtype":  # the stored form of a non-uint8 frame: a 16-bit PNG
        import cv2

        raw_bad = encode_sample(make_sample(1), "png")
        raw_bad["frame0.png"] = cv2.imencode(".png", make_sample(1).frame0.astype(np.uint16) * 257)[1].tobytes()
    elif name == "meta_fps_nan":  # NaN written by a non-strict JSON encoder
        raw_bad = encode_sample(make_sample(1), "png")
        raw_bad["meta.json"] = json.dumps(bad.meta).encode()
    else:
        raw_bad = encode_sample(bad, "png", validate=False)
    raws = [encode_sample(make_sample(0), "png"), raw_bad]
    shard = tmp_path / "bad-000000.tar"
    _write_raw_shard(shard, raws)
    got = []
    with pytest.raises(InputError) as ei:
        for s in iter_samples(shard):
            got.append(s.key)
    assert got == [make_sample(0).key]  # the good sample before it was read
    msg = str(ei.value)
    assert str(shard) in msg
    if name != "key_dot":  # a dotted key is split by webdataset: the reader sees key "v0001ab" + odd members
        assert bad.key in msg and reason in msg
    else:
        assert "unexpected member" in msg or "missing member" in msg


@pytest.mark.parametrize("case,reason", [
    ("missing_tracks", "missing member tracks.npy"),
    ("missing_frame", "missing member frame1"),
    ("extra_member", "unexpected member(s) depth.npy"),
    ("corrupt_npy", "corrupt tracks.npy"),
    ("pickled_npy", "corrupt tracks.npy"),
    ("corrupt_image", "corrupt image frame0.jpg"),
    ("corrupt_json", "corrupt meta.json"),
])
def test_malformed_members_rejected_on_read(tmp_path, case, reason):
    s = make_sample(2)
    raw = encode_sample(s, "jpg")
    if case == "missing_tracks":
        del raw["tracks.npy"]
    elif case == "missing_frame":
        del raw["frame1.jpg"]
    elif case == "extra_member":
        raw["depth.npy"] = raw["tracks.npy"]
    elif case == "corrupt_npy":
        raw["tracks.npy"] = raw["tracks.npy"][:20]
    elif case == "pickled_npy":
        buf = io.BytesIO()
        np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        raw["tracks.npy"] = buf.getvalue()
    elif case == "corrupt_image":
        raw["frame0.jpg"] = b"\xff\xd8not a jpeg at all"
    elif case == "corrupt_json":
        raw["meta.json"] = b"{not json"
    shard = tmp_path / "m-000000.tar"
    _write_raw_shard(shard, [raw])
    with pytest.raises(InputError) as ei:
        list(iter_samples(shard))
    assert str(ei.value).startswith(f"{shard}:{s.key}") and reason in str(ei.value)


# ------------------------------------------------------------------------------------ write / read

def test_round_trip_png_exact(tmp_path):
    samples = [make_sample(i) for i in range(5)]
    entries = write(tmp_path, samples, maxcount=2, image_format="png")
    assert [e["shard"] for e in entries] == ["labels-0-000000.tar", "labels-0-000001.tar", "labels-0-000002.tar"]
    assert [e["samples"] for e in entries] == [2, 2, 1]
    back = list(iter_samples(tmp_path))
    assert [b.key for b in back] == [s.key for s in samples]
    for s, b in zip(samples, back):
        assert np.array_equal(s.frame0, b.frame0) and np.array_equal(s.frame1, b.frame1)
        assert b.tracks.dtype == np.float32 and np.array_equal(s.tracks, b.tracks)
        assert b.meta == s.meta


def test_round_trip_jpg_and_byte_identical_rewrite(tmp_path):
    samples = [make_sample(i) for i in range(5)]
    write(tmp_path / "a", samples, maxcount=2)
    write(tmp_path / "b", samples, maxcount=2)
    a, b = tar_files(tmp_path / "a"), tar_files(tmp_path / "b")
    assert len(a) == 3 and a == b  # same samples → same bytes
    back = list(iter_samples(tmp_path / "a"))
    for s, r in zip(samples, back):
        assert np.array_equal(s.tracks, r.tracks) and r.meta == s.meta
        assert np.abs(s.frame0.astype(int) - r.frame0.astype(int)).mean() < 4  # JPEG q95
    rewrite_shards(tmp_path / "a", tmp_path / "c", maxcount=2)
    assert tar_files(tmp_path / "c") == a  # read back + re-write → identical bytes (JPEG not re-encoded)
    assert (index_path_for(tmp_path / "c", "labels-0").read_bytes()
            == index_path_for(tmp_path / "a", "labels-0").read_bytes())


def test_rewrite_reencodes_a_changed_frame(tmp_path):
    write(tmp_path / "a", [make_sample(3)], image_format="png")
    s = next(iter_samples(tmp_path / "a"))
    s.frame0 = s.frame0.copy()
    s.frame0[:4] = 0
    write(tmp_path / "b", [s], image_format="png")
    assert tar_files(tmp_path / "a") != tar_files(tmp_path / "b")
    again = next(iter_samples(tmp_path / "b"))
    assert np.array_equal(again.frame0, s.frame0) and again.frame0[:4].max() == 0


def test_tar_headers_fixed_and_members_sorted(tmp_path):
    write(tmp_path, [make_sample(0), make_sample(1)])
    with tarfile.open(tmp_path / "labels-0-000000.tar") as tf:
        members = tf.getmembers()
    k0 = make_sample(0).key
    assert [m.name for m in members[:4]] == [f"{k0}.frame0.jpg", f"{k0}.frame1.jpg", f"{k0}.meta.json",
                                             f"{k0}.tracks.npy"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == \
        {(0, 0, 0, "flowdistill", "flowdistill", 0o444)}


def test_index_matches_files_and_round_trips(tmp_path):
    seen = []

    def on_closed(entry):
        # called only after the rename: the shard is complete under its final name
        p = tmp_path / entry["shard"]
        assert p.is_file() and sha256_file(p) == entry["sha256"]
        seen.append(entry["shard"])

    entries = write(tmp_path, [make_sample(i) for i in range(3)], maxcount=2, on_shard_closed=on_closed)
    assert seen == ["labels-0-000000.tar", "labels-0-000001.tar"]
    for e in entries:
        p = tmp_path / e["shard"]
        assert e["sha256"] == sha256_file(p) and e["bytes"] == p.stat().st_size
        assert check_tar_complete(p) == 4 * e["samples"]
        verify_shard(p, e)
    assert entries[0]["keys"] == [make_sample(0).key, make_sample(1).key]
    assert read_index(index_path_for(tmp_path, "labels-0")) == entries
    write_index(tmp_path / "copy.json", entries)
    assert read_index(tmp_path / "copy.json") == entries
    (tmp_path / "broken.json").write_text('{"kind": "something-else", "shards": []}')
    with pytest.raises(InputError, match="not a shard index"):
        read_index(tmp_path / "broken.json")
    # a modified shard no longer verifies
    p = tmp_path / entries[1]["shard"]
    data = bytearray(p.read_bytes())
    data[600] ^= 1
    p.write_bytes(bytes(data))
    with pytest.raises(InputError, match="sha256"):
        verify_shard(p, entries[1])


def test_exception_mid_write_publishes_nothing_partial(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path / "one", maxcount=100) as w:
            w.write(make_sample(0))
            w.write(make_sample(1))
            raise RuntimeError("boom")
    assert list((tmp_path / "one").iterdir()) == []  # temp removed, no shard, no index

    closed = []
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path / "three", maxcount=1, on_shard_closed=closed.append) as w:
            for i in range(3):
                w.write(make_sample(i))
            raise RuntimeError("boom")
    names = sorted(p.name for p in (tmp_path / "three").iterdir())
    assert names == ["labels-0-000000.tar", "labels-0-000001.tar", "labels-0.index.json"]
    assert [e["shard"] for e in closed] == names[:2]
    assert [e["shard"] for e in read_index(tmp_path / "three" / "labels-0.index.json")] == names[:2]


def test_no_empty_shard_and_existing_shard_refused(tmp_path):
    with ShardWriter(tmp_path) as w:
        pass
    assert w.closed_shards == [] and list(tmp_path.iterdir()) == []
    write(tmp_path, [make_sample(0)])
    with pytest.raises(InputError, match="already exists"):
        ShardWriter(tmp_path)
    # resuming after the last shard extends the same index
    write(tmp_path, [make_sample(1)], start_shard=1)
    assert [e["shard"] for e in read_index(tmp_path / "labels-0.index.json")] == \
        ["labels-0-000000.tar", "labels-0-000001.tar"]
    with pytest.raises(InputError, match="duplicate key"):
        with ShardWriter(tmp_path / "dup") as w:
            w.write(make_sample(4))
            w.write(make_sample(4))


def test_truncated_tar_names_the_shard(tmp_path):
    write(tmp_path / "src", [make_sample(i) for i in range(3)])
    src = tmp_path / "src" / "labels-0-000000.tar"
    data = src.read_bytes()
    half = tmp_path / "half.tar"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as ei:
        list(iter_samples(half))
    assert str(half) in str(ei.value) and ("truncated" in str(ei.value) or "corrupt" in str(ei.value))
    # cut exactly after the first sample's members: a valid-looking shorter tar without its end marker
    with tarfile.open(src) as tf:
        m = tf.getmembers()[3]
    boundary = tmp_path / "boundary.tar"
    boundary.write_bytes(data[: m.offset_data + ((m.size + 511) // 512) * 512])
    with pytest.raises(InputError, match="truncated tar"):
        list(iter_samples(boundary))
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        list(iter_samples(empty))


def test_list_shards_resolution(tmp_path):
    write(tmp_path, [make_sample(i) for i in range(3)], maxcount=1)
    (tmp_path / ".labels-0-000009.tar.partial").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    names = [Path(p).name for p in list_shards(tmp_path)]
    assert names == ["labels-0-000000.tar", "labels-0-000001.tar", "labels-0-000002.tar"]
    brace = str(tmp_path / "labels-0-{000000..000001}.tar")
    assert [Path(p).name for p in list_shards(brace)] == names[:2]
    assert len(list_shards(str(tmp_path / "*.tar"))) == 3
    assert len(list_shards([str(tmp_path / names[0]), str(tmp_path / names[2])])) == 2
    with pytest.raises(InputError, match="shard not found"):
        list_shards(str(tmp_path / "labels-0-{000000..000005}.tar"))
    with pytest.raises(InputError, match="no such shard"):
        list_shards(tmp_path / "missing.tar")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(InputError, match="no .tar shards"):
        list_shards(tmp_path / "emptydir")


def test_readable_by_plain_webdataset(tmp_path):
    """The student side can use webdataset's own pipeline and our decoder as a map."""
    import webdataset as wds

    samples = [make_sample(i) for i in range(4)]
    write(tmp_path, samples, maxcount=2)
    ds = wds.WebDataset(list_shards(tmp_path), shardshuffle=False, nodesplitter=wds.split_by_node,
                        empty_check=False).map(lambda r: decode_sample(r, r["__url__"]))
    got = list(ds)
    assert [g.key for g in got] == [s.key for s in samples]
    assert all(np.array_equal(g.tracks, s.tracks) for g, s in zip(got, samples))
    raw = next(iter_raw(list_shards(tmp_path)[0]))
    assert set(raw) == {"__key__", "__url__", "frame0.jpg", "frame1.jpg", "meta.json", "tracks.npy"}
    assert os.path.basename(raw["__url__"]) == "labels-0-000000.tar"
