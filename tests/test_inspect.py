"""Pictures (pipeline.viz) and ``flowdistill inspect`` on shards, label-set dirs and synthetic sets."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline import cli
from pipeline.common import InputError
from pipeline.inspect import inspect_path
from pipeline.schema import LabelSample, make_key, make_meta
from pipeline.shards import ShardWriter
from pipeline.viz import draw_tracks, flow_to_color, heatmap_overlay, save_png, sparse_flow_image

H, W, N = 32, 40, 16


def sample(i: int) -> LabelSample:
    rng = np.random.default_rng(100 + i)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    f0 = np.stack([128 + 90 * np.sin(xx / 4 + i), 128 + 90 * np.cos(yy / 5), 128 + 60 * np.sin((xx - yy) / 6)],
                  -1).round().astype(np.uint8)
    t = np.zeros((N, 6), np.float32)
    t[:, 0], t[:, 1] = rng.uniform(2, W - 2, N), rng.uniform(2, H - 2, N)
    t[:, 2], t[:, 3] = t[:, 0] + 2.0, t[:, 1] - 1.0
    t[:, 4] = (np.arange(N) % 4 != 0).astype(np.float32)      # 3 in 4 visible
    t[:, 5] = np.arange(N, dtype=np.float32)
    meta = make_meta(video_id=f"vid{i:03d}", source=f"file:///v{i}.mp4", t0=0, t1=4, fps=30, orig_size=[W, H],
                     teacher={"id": "tiny", "checkpoint_sha256": "e" * 64, "config_hash": "f" * 16},
                     tracer={"method": "kl"}, label_set="demo", version="v0001", rank=0, created="2025-01-01")
    return LabelSample(make_key(meta["video_id"], 0, 4), f0, np.roll(f0, 2, axis=1), t, meta)


def write_shards(d: Path, n: int, maxcount: int = 2) -> None:
    with ShardWriter(d, maxcount=maxcount) as w:
        for i in range(n):
            w.write(sample(i))


# ---------------------------------------------------------------------------------------------- viz

def test_flow_to_color_wheel():
    flow = np.array([[[0, 0], [4, 0], [-4, 0], [0, -4], [np.nan, 1], [8, 0]]], np.float32)  # [1, 6, 2]
    c = flow_to_color(flow, max_mag=4).astype(int)[0]
    assert c.shape == (6, 3)
    assert (c[0] == 255).all()                                  # zero flow → white
    assert c[1, 0] == 255 and c[1, 1] < 30 and c[1, 2] < 30      # right → red
    assert c[2, 2] > 200 and c[2, 0] < 30                        # left → blue/cyan
    assert tuple(c[3]) != tuple(c[1]) and tuple(c[3]) != tuple(c[2])
    assert (c[4] == 0).all()                                     # NaN → black
    assert c[5].max() <= 192                                     # beyond max_mag → darkened
    # default max_mag is the largest magnitude: the 8 px vector is fully saturated red
    assert tuple(flow_to_color(flow)[0, 5]) == (255, 0, 0)


def test_draw_tracks_and_sparse_flow():
    s = sample(0)
    side = draw_tracks(s.frame0, s.frame1, s.tracks, mode="side", scale=2)
    assert side.shape == (2 * H, 4 * W, 3) and side.dtype == np.uint8
    over = draw_tracks(s.frame0, s.frame1, s.tracks, mode="overlay")
    assert over.shape == (H, W, 3)
    vis = s.tracks[:, 4] > 0.5
    same = draw_tracks(s.frame0, s.frame1, (s.tracks[:, :2], s.tracks[:, 2:4], vis), mode="overlay")
    assert np.array_equal(over, same)
    assert not np.array_equal(side[:, : 2 * W], np.repeat(np.repeat(s.frame0, 2, 0), 2, 1))  # something drawn
    sp = sparse_flow_image(s.frame0.shape, s.tracks, scale=1)
    assert sp.shape == (H, W, 3)
    # every visible query dot is coloured; far from all points the background stays
    for x, y in s.tracks[vis, :2]:
        assert tuple(sp[int(y), int(x)]) != (24, 24, 24)
    yy, xx = np.mgrid[0:H, 0:W] + 0.5
    dist = np.min(np.hypot(xx[..., None] - s.tracks[:, 0], yy[..., None] - s.tracks[:, 1]), axis=-1)
    far = np.unravel_index(np.argmax(dist), dist.shape)
    assert dist[far] > 4 and tuple(sp[far]) == (24, 24, 24)
    with pytest.raises(InputError, match="differ in size"):
        draw_tracks(s.frame0, s.frame1[:-1], s.tracks)


def test_heatmap_overlay_and_save_png(tmp_path):
    frame = np.full((16, 24, 3), 100, np.uint8)
    heat = np.zeros((4, 6))
    heat[1, 2] = 5.0
    assert np.array_equal(heatmap_overlay(frame, heat, alpha=0.0), frame)
    full = heatmap_overlay(frame, heat, alpha=1.0)
    assert full.shape == frame.shape
    hot, cold = full[4:8, 8:12], full[0:4, 0:4]      # the cell (1, 2) scaled by 4
    assert hot.mean() > 200 and cold.mean() < 20       # inferno: bright max, near-black min
    with pytest.raises(InputError):
        heatmap_overlay(frame, np.zeros(5))
    save_png(tmp_path / "x.png", full)
    back = cv2.imread(str(tmp_path / "x.png"))[..., ::-1]
    assert np.array_equal(back, full)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]   # no temp left behind
    with pytest.raises(InputError, match="uint8"):
        save_png(tmp_path / "y.png", full.astype(np.float32))


# ------------------------------------------------------------------------------------------- inspect

def test_inspect_cli_on_shards(tmp_path, capsys):
    write_shards(tmp_path / "shards", 5)
    out = tmp_path / "out"
    rc = cli.main(["inspect", str(tmp_path / "shards"), "--out", str(out), "--num", "2", "--seed", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "shards 3   samples 5" in printed and "visible fraction 0.750" in printed and "score:" in printed
    stats = json.loads((out / "stats.json").read_text())
    assert stats["samples"] == 5 and stats["shards"] == 3 and stats["points"] == 5 * N
    assert stats["visible_fraction"] == pytest.approx(0.75)
    assert stats["motion_px"]["quantiles"]["0.5"] == pytest.approx(np.hypot(2, 1), rel=1e-5)
    assert stats["score"]["quantiles"]["1"] == N - 1 and sum(stats["score"]["histogram"]["counts"]) == 5 * N
    assert stats["image_sizes"] == {f"{W}x{H}": 5} and stats["index"]["verified"] == 3
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2 and [str(p) for p in pngs] == stats["pictures"]
    img = cv2.imread(str(pngs[0]))
    scale = 8  # ceil(256 / 32)
    assert img.shape == (18 + 2 * H * scale, 2 * W * scale, 3)
    # same seed → same pictures
    again = inspect_path(tmp_path / "shards", tmp_path / "out2", num=2, seed=1, verbose=False)
    assert [Path(p).name for p in again["pictures"]] == [p.name for p in pngs]
    assert all((tmp_path / "out2" / p.name).read_bytes() == p.read_bytes() for p in pngs)


def test_inspect_label_set_dir_with_latest(tmp_path, capsys):
    write_shards(tmp_path / "set" / "v0002", 3, maxcount=2)
    (tmp_path / "set" / "LATEST").write_text("v0002\n")
    stats = inspect_path(tmp_path / "set", tmp_path / "out", num=1, verbose=False)
    assert stats["samples"] == 3 and stats["shards"] == 2 and len(stats["pictures"]) == 1
    assert stats["index"] == {"shards_in_index": 2, "verified": 2, "missing": []}
    (tmp_path / "set" / "v0002" / "labels-0-000001.tar").unlink()
    stats = inspect_path(tmp_path / "set", tmp_path / "out", num=1, verbose=True)
    assert stats["samples"] == 2 and stats["index"]["missing"] == ["labels-0-000001.tar"]
    assert "WARNING: 1 shard(s) named in an index are missing" in capsys.readouterr().out


def test_inspect_cli_bad_input(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert cli.main(["inspect", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert str(missing) in capsys.readouterr().err
    write_shards(tmp_path / "s", 2, maxcount=5)
    shard = tmp_path / "s" / "labels-0-000000.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF                                   # silent corruption: caught by the index sha256
    shard.write_bytes(bytes(data))
    assert cli.main(["inspect", str(tmp_path / "s"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(shard) in err and "sha256" in err


def _fake_synthetic_dir(tmp_path: Path) -> tuple[Path, list[dict]]:
    """A synthetic-set dir + the items load_set would return (exact motion: 3 px right, 4 px down)."""
    d = tmp_path / "syn"
    d.mkdir()
    (d / "index.json").write_text(json.dumps({"kind": "synthetic", "names": ["a", "b"]}))
    items = []
    for k, name in enumerate(["a", "b"]):
        video = np.random.default_rng(k).integers(0, 255, (3, 20, 30, 3), dtype=np.uint8)
        p = np.random.default_rng(k).uniform(0.2, 0.8, (6, 1, 2))
        pts = np.concatenate([p, p + [3 / 30, 4 / 20], p + [6 / 30, 8 / 20]], axis=1).astype(np.float32)
        occ = np.zeros((6, 3), bool)
        occ[0, 0] = True   # not a valid query
        occ[1, 1] = True   # occluded at frame 1
        items.append({"name": name, "video": video, "points": pts, "occluded": occ})
    return d, items


def test_inspect_synthetic_contract(tmp_path, monkeypatch):
    d, items = _fake_synthetic_dir(tmp_path)
    try:
        import pipeline.synthetic as syn
        monkeypatch.setattr(syn, "load_set", lambda path, *a, **k: items)
    except ImportError:
        monkeypatch.setitem(sys.modules, "pipeline.synthetic", types.SimpleNamespace(load_set=lambda p: items))
    stats = inspect_path(d, tmp_path / "out", num=5, verbose=False)
    assert stats["kind"] == "synthetic" and stats["videos"] == 2 and stats["frames"] == 6
    assert stats["points"] == 10 and stats["visible_fraction"] == pytest.approx(8 / 10)
    assert stats["motion_px"]["quantiles"]["0"] == pytest.approx(5.0, abs=1e-4)
    assert stats["motion_px"]["quantiles"]["1"] == pytest.approx(5.0, abs=1e-4)
    assert len(stats["pictures"]) == 2 and all(Path(p).is_file() for p in stats["pictures"])


def test_inspect_cli_real_synthetic_set(tmp_path):
    syn = pytest.importorskip("pipeline.synthetic")
    if not hasattr(syn, "write_set"):
        pytest.skip("pipeline.synthetic.write_set not available")
    syn.write_set(tmp_path / "syn", {"num_videos": 2, "num_frames": 3, "size": [48, 64],
                                     "points": {"per_video": 24}})
    rc = cli.main(["inspect", str(tmp_path / "syn"), "--out", str(tmp_path / "out"), "--num", "1"])
    assert rc == 0
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["kind"] == "synthetic" and stats["videos"] == 2 and stats["image_sizes"] == {"64x48": 2}
    assert 0 < stats["points"] <= 48 and len(list((tmp_path / "out").glob("*.png"))) == 1


# ------------------------------------------------------------------------------------- label-set versions

@pytest.fixture(scope="module")
def label_set(tmp_path_factory):
    """A real label set made by ``flowdistill label``: 3 good synthetic videos (2 pairs x 8 points each), one
    file that is not a video (a failed unit) and a missing path (a source error, no unit). Returns (root, set
    dir)."""
    import subprocess

    sys.path.insert(0, str(Path(__file__).parent))
    import badinputs
    from labelkit import REPO, clean_env, label_cmd, make_teacher, make_videos

    from pipeline.label import FAILED_EXIT_BASE

    base = tmp_path_factory.mktemp("inspect_labels")
    teacher = make_teacher(base / "teacher")
    vids = make_videos(base / "vids", 3, seed=3, prefix="ins")
    bad = base / "bad"
    bad.mkdir()
    badinputs.write_non_video(bad / "not_video.mp4")
    root = base / "root"
    r = subprocess.run(label_cmd([vids, bad, base / "missing.mp4"], teacher, root, "t"), capture_output=True,
                       text=True, cwd=REPO, env=clean_env())
    assert r.returncode == FAILED_EXIT_BASE + 2, r.stdout + r.stderr
    return root, root / "t"


def _read_all_tracks(vdir: Path) -> np.ndarray:
    from pipeline import manifest as mf
    from pipeline.shards import iter_samples

    return np.concatenate([s.tracks for e in mf.read_manifest(vdir)["shards"] for s in iter_samples(vdir / e["shard"])])


def test_inspect_label_set_complete(label_set, tmp_path, capsys):
    from pipeline import manifest as mf

    root, sdir = label_set
    vdir = sdir / "v0001"
    man = mf.read_manifest(vdir)
    tracks = _read_all_tracks(vdir)
    out = tmp_path / "out"
    assert cli.main(["inspect", str(sdir), "--out", str(out), "--num", "3"]) == 0
    printed = capsys.readouterr().out
    stats = json.loads((out / "stats.json").read_text())
    ls = stats["label_set"]
    assert stats["kind"] == "label_set" and ls["set"] == "t" and ls["version"] == "v0001"
    assert ls["complete"] and ls["is_latest"] and ls["latest"] == "v0001" and ls["base"] is None
    assert ls["identity"] == mf.read_version(vdir)["identity"] and ls["identity"]["teacher_id"]
    assert ls["units"] == {"total": 4, "done": 3, "failed": 1, "recorded_done": 3, "recorded_failed": 1,
                           "done_here": 3, "recovered_from_shards": 0}
    assert len(ls["source_errors"]) == 1 and "missing.mp4" in ls["source_errors"][0]["input"]
    assert len(ls["failures"]) == 1 and "not_video.mp4" in ls["failures"][0]["input"]
    assert ls["failures"][0]["reason"]
    assert ls["stray_files"] == [] and ls["missing_shards"] == []
    assert ls["ranks"]["0"]["units_done"] == 3 and ls["ranks"]["0"]["units_failed"] == 1
    assert ls["ranks"]["0"]["source_errors"] == 1
    # samples / points / visible fraction / scores are those of the manifest's shards
    assert stats["samples"] == man["samples"] == ls["manifest_samples"] == ls["samples_in_index"] == 6
    assert stats["shards"] == len(man["shards"]) and stats["index"]["verified"] == stats["shards"]
    assert stats["points"] == len(tracks) == 6 * 8 and stats["videos"] == 3
    assert stats["visible_fraction"] == pytest.approx(float((tracks[:, 4] > 0.5).mean()))
    assert sum(stats["score"]["histogram"]["counts"]) == len(tracks)
    assert stats["score"]["quantiles"]["1"] == pytest.approx(float(tracks[:, 5].max()), rel=1e-6)
    assert stats["versions"] == {"v0001": 6} and stats["label_sets"] == {"t": 6}
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 3 and [str(p) for p in pngs] == stats["pictures"]
    assert cv2.imread(str(pngs[0])) is not None
    assert "label set t  version v0001  complete  LATEST v0001 (this version)" in printed
    assert "units: 3 done, 1 failed of 4" in printed and "failed " in printed and "not_video.mp4" in printed
    assert "source error (no work unit): " in printed and "missing.mp4" in printed
    assert "samples 6" in printed and "score:" in printed and "rank 0/1 last run: 3 units done" in printed
    # the version dir itself gives the same summary
    again = inspect_path(vdir, tmp_path / "out2", num=3, verbose=False)
    assert again["label_set"] == ls
    assert {k: again[k] for k in ("samples", "points", "visible_fraction", "score")} == \
           {k: stats[k] for k in ("samples", "points", "visible_fraction", "score")}
    assert [Path(p).name for p in again["pictures"]] == [p.name for p in pngs]


def test_inspect_label_set_incomplete_and_stray_files(label_set, tmp_path, capsys):
    import shutil

    _, sdir = label_set
    sdir2 = tmp_path / "t"
    shutil.copytree(sdir, sdir2)
    vdir = sdir2 / "v0001"
    (sdir2 / "LATEST").unlink()
    (vdir / "manifest.json").unlink()
    ledger = vdir / "ledger-0.jsonl"
    lines = ledger.read_text().splitlines(keepends=True)
    ledger.write_text("".join(lines[1:]))                      # a kill before this unit's ledger line
    first = sorted(vdir.glob("labels-0-*.tar"))[0]
    shutil.copy(first, vdir / "labels-0-000099.tar")           # a kill between rename and index update
    (vdir / ".labels-0-000100.tar.partial").write_bytes(b"x")  # a kill mid-shard
    stats = inspect_path(sdir2, tmp_path / "out", num=1, verbose=True)
    printed = capsys.readouterr().out
    ls = stats["label_set"]
    assert ls["version"] == "v0001" and not ls["complete"] and ls["latest"] is None and not ls["is_latest"]
    assert "no LATEST" in ls["note"]
    assert ls["units"]["total"] is None and ls["units"]["done"] == 3 and ls["units"]["failed"] == 1
    assert ls["units"]["recovered_from_shards"] == 1
    assert ls["stray_files"] == [".labels-0-000100.tar.partial", "labels-0-000099.tar"]
    assert stats["samples"] == 6                                # the unindexed copy is not counted
    assert "INCOMPLETE" in printed and "(total known once complete)" in printed
    assert "1 recovered from shard indexes" in printed and "2 shard file(s) no index names" in printed
    # an indexed shard that went missing is reported, the rest is still read
    (vdir / "labels-0-000099.tar").unlink()
    first.unlink()
    stats = inspect_path(vdir, tmp_path / "out", num=1, verbose=True)
    assert stats["index"]["missing"] == [first.name] and stats["label_set"]["missing_shards"] == [first.name]
    assert stats["samples"] < 6
    assert "WARNING: 1 shard(s) named in an index are missing" in capsys.readouterr().out


def test_side_tracks_stay_inside_their_panels():
    """A query on the right edge of frame 0 whose target is on frame 1's left edge: side mode draws nothing in the
    middle of either panel (the old picture drew a line across both)."""
    f = np.full((20, 40, 3), 100, np.uint8)
    side = draw_tracks(f, f, (np.array([[38.5, 10.5]], np.float32), np.array([[1.5, 10.5]], np.float32),
                              np.array([True])), mode="side")
    assert np.all(side[:, 5:30] == 100)             # frame 0 left of the query: untouched
    assert np.any(side[:, 78:80] != 100)             # frame 1: the line from the query's position (x 38.5 + 40)
    assert np.any(side[:, 40:44] != 100)             # ... to the target (x 1.5 + 40)
