"""Synthetic videos: ground truth is exact (colours follow the tracks, occlusion and frame exits are right),
generation is deterministic, and sets are written atomically / idempotently and validated on load."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline import synthetic as S
from pipeline.common import InputError
from pipeline.flowsources import bilinear_sample

ROOT = Path(__file__).resolve().parents[1]

SMALL = {"num_frames": 10, "points": {"per_video": 96}}


@pytest.fixture(scope="module")
def gen():
    return S.generate_video(SMALL, 123, return_scene=True)


def test_shapes_and_conventions(gen):
    v = gen
    t, h, w = 10, 256, 256
    assert v["video"].shape == (t, h, w, 3) and v["video"].dtype == np.uint8
    assert v["points"].shape == (96, t, 2) and v["points"].dtype == np.float32
    assert v["occluded"].shape == (96, t) and v["occluded"].dtype == np.bool_
    # every point is visible at the frame it was drawn in, inside the frame
    n = np.arange(96)
    assert not v["occluded"][n, v["sample_frame"]].any()
    p = v["points"][n, v["sample_frame"]]
    assert (p >= 0).all() and (p < 1).all()
    # points on background and on sprites
    assert (v["surface"] == 0).any() and (v["surface"] > 0).any()
    # normalised = raster px / (W, H), as the exact float positions say
    pos, _ = S.track_points(v["scene"], v["surface_points"])
    np.testing.assert_allclose(v["points"], (pos / [w, h]).astype(np.float32))


def _edge_distance(scene, xy, t):
    """Distance (px) from screen points xy [M, 2] at frames t [M] to the nearest sprite outline."""
    d = np.full(len(xy), np.inf)
    for k in range(len(scene.sprites)):
        d = np.minimum(d, np.abs(S.sprite_distance(scene, k, xy, t)))
    return d


SMOOTH = {"num_frames": 10, "texture": {"families": ["noise"], "min_wavelength": 12.0}}


@pytest.mark.parametrize("cfg,seed,median_tol,p95_tol", [
    (SMOOTH, 5, 0.005, 0.015),     # smooth texture: interpolation error is tiny, so the check is sharp
    (SMALL, 123, 0.015, 0.06),     # default textures (finest octave 4 px, sharp blob edges)
])
def test_colours_follow_ground_truth(cfg, seed, median_tol, p95_tol):
    """Bilinear samples of the rendered frames at GT positions of visible points equal each point's own
    texture colour (up to interpolation error); the same samples 2 px off are far worse (so the check
    can fail)."""
    g = S.generate_video(cfg, seed, return_scene=True)
    scene, sp = g["scene"], g["surface_points"]
    frames = S.render_video(scene)
    pos, occ = S.track_points(scene, sp)
    colours = S.point_colours(scene, sp)
    n_idx, t_idx = np.nonzero(~occ)
    xy = pos[n_idx, t_idx]
    # keep entries away from outlines (edge pixels blend two surfaces) and the frame border (clamping)
    keep = (_edge_distance(scene, xy, t_idx) > 2.0) & (xy.min(1) > 1.0) & (xy[:, 0] < 255) & (xy[:, 1] < 255)
    n_idx, t_idx, xy = n_idx[keep], t_idx[keep], xy[keep]
    assert len(n_idx) > 500

    def err(offset, use_uint8=False):
        out = []
        for t in np.unique(t_idx):
            m = t_idx == t
            img = g["video"][t].astype(np.float32) / 255.0 if use_uint8 else frames[t]
            out.append(np.abs(bilinear_sample(img, xy[m] + offset) - colours[n_idx[m]]).max(axis=1))
        return np.concatenate(out)

    exact = err(np.zeros(2))
    assert np.median(exact) < median_tol and np.percentile(exact, 95) < p95_tol
    assert np.median(err(np.zeros(2), use_uint8=True)) < median_tol + 0.002
    off = err(np.array([2.0, 0.0]))
    assert np.median(off) > 4 * np.median(exact) and np.median(off) > 0.04


def _manual_scene(n_t, pan=0.0):
    """A 256x128 frame whose camera (zoom 1) starts at screen = world and pans right by ``pan`` px/frame;
    a 20x60 box (corner radius 2.5) moving right 5 px/frame under a static disc of radius 12 at (150, 64)."""
    t = np.arange(n_t, dtype=np.float64)
    tex = np.random.default_rng(0).uniform(size=(64, 64, 3)).astype(np.float32)
    cam = S.Camera(center=np.stack([128.0 + pan * t, np.full(n_t, 64.0)], axis=1), zoom=np.ones(n_t))
    box = S.Sprite(shape="box", half=np.array([10.0, 30.0]), texture=tex[::-1].copy(), tex_offset=np.zeros(2),
                   pos=np.stack([60.0 + 5.0 * t, np.full(n_t, 64.0)], axis=1), angle=np.zeros(n_t),
                   scale=np.ones(n_t))
    disc = S.Sprite(shape="ellipse", half=np.array([12.0, 12.0]), texture=tex, tex_offset=np.zeros(2),
                    pos=np.tile([150.0, 64.0], (n_t, 1)), angle=np.zeros(n_t), scale=np.ones(n_t))
    return S.Scene(height=128, width=256, background=tex, camera=cam, sprites=[box, disc])


def test_occlusion_by_sprites_exact():
    n_t = 22
    scene = _manual_scene(n_t)
    pts = S.SurfacePoints(surface=np.array([0, 1, 2, 0]), coords=np.array(
        [[100.3, 64.2],                # background point at screen (100.3, 64.2)
         [0.0, 0.0],                   # centre of the box (sprite 1)
         [0.0, 0.0],                   # centre of the disc (top sprite)
         [200.0, 10.0]]),              # background point far from both sprites
        sample_frame=np.zeros(4, np.int32))
    pos, occ = S.track_points(scene, pts)
    np.testing.assert_allclose(pos[0, :, 0], 100.3)
    np.testing.assert_allclose(pos[1, :, 0], 60.0 + 5.0 * np.arange(n_t))
    # the box (|dx| < 10 at its mid-height) covers x = 100.3 when |40.3 - 5t| < 10  <=>  t in 7..10
    np.testing.assert_array_equal(np.flatnonzero(occ[0]), [7, 8, 9, 10])
    # the disc (above the box) covers the box centre when |60 + 5t - 150| < 12  <=>  t in 16..20
    np.testing.assert_array_equal(np.flatnonzero(occ[1]), [16, 17, 18, 19, 20])
    assert not occ[2].any() and not occ[3].any()
    # rendering agrees, exactly at pixel (row 64, col 100) whose centre is (100.5, 64.5): background texel
    # (100.5, 64.5) at t = 3; at t = 8 the box (centre x = 100) shows its local (0.5, 0.5) = texel (0, 0)
    f3, f8 = S.render_frame(scene, 3), S.render_frame(scene, 8)
    bg = S.sample_texture(scene.background, np.array([[100.5, 64.5]]))[0]
    np.testing.assert_allclose(f3[64, 100], bg, atol=1e-6)
    np.testing.assert_allclose(f8[64, 100], scene.sprites[0].texture[0, 0], atol=1e-6)
    assert np.abs(bg - scene.sprites[0].texture[0, 0]).max() > 0.05


def test_points_leaving_the_frame_are_occluded():
    n_t = 8
    scene = _manual_scene(n_t, pan=6.0)              # background moves left 6 px/frame on screen
    pts = S.SurfacePoints(surface=np.array([0, 0, 0]), coords=np.array([[20.0, 100.0], [255.9, 100.0], [280.0, 100.0]]),
                          sample_frame=np.zeros(3, np.int32))
    pos, occ = S.track_points(scene, pts)
    np.testing.assert_allclose(pos[0, :, 0], 20.0 - 6.0 * np.arange(n_t))
    np.testing.assert_array_equal(occ[0], np.arange(n_t) >= 4)     # x = -4 at t = 4
    assert not occ[1].any()                                        # 255.9 - 6t stays in [0, 256)
    assert pos[2, 4, 0] == 256.0                                   # enters: x = W is still outside
    np.testing.assert_array_equal(occ[2], np.arange(n_t) <= 4)


def test_random_scenes_have_exits_and_occlusions():
    outside = hidden = 0
    for seed in range(3):
        v = S.generate_video({"num_frames": 12, "points": {"per_video": 64}}, seed)
        p, o = v["points"], v["occluded"]
        out_of_frame = (p < 0).any(-1) | (p >= 1).any(-1)
        assert o[out_of_frame].all()                   # outside the frame => occluded
        outside += out_of_frame.sum()
        hidden += (o & ~out_of_frame).sum()
    assert outside > 0 and hidden > 0


def test_occluded_fraction_sets_the_share_of_occluded_tracks():
    base = {"num_frames": 4, "points": {"per_video": 24}}
    plain = S.generate_video(base, 11)
    rich = S.generate_video({**base, "points": {"per_video": 24, "occluded_fraction": 0.5}}, 11)
    np.testing.assert_array_equal(plain["video"], rich["video"])       # same scene, only the points differ
    assert plain["occluded"].any(axis=1).sum() < 12
    assert rich["occluded"].any(axis=1).sum() == 12                    # exactly round(24 * 0.5) tracks
    frame_of = rich["sample_frame"]
    assert not rich["occluded"][np.arange(24), frame_of].any()         # each visible where it was sampled
    again = S.generate_video({**base, "points": {"per_video": 24, "occluded_fraction": 0.5}}, 11)
    np.testing.assert_array_equal(rich["points"], again["points"])
    with pytest.raises(InputError, match="occluded_fraction"):
        S.generate_video({"num_frames": 2, "num_sprites": [0, 0], "camera": {"pan": 0.0, "zoom": 0.0},
                          "points": {"per_video": 8, "occluded_fraction": 0.5}}, 1)
    with pytest.raises(InputError, match="occluded_fraction"):
        S.resolve_config({"points": {"occluded_fraction": 1.5}})


def test_determinism():
    a = S.generate_video({"num_frames": 5, "points": {"per_video": 16}}, 7)
    b = S.generate_video({"num_frames": 5, "points": {"per_video": 16}}, 7)
    c = S.generate_video({"num_frames": 5, "points": {"per_video": 16}}, 8)
    for k in ("video", "points", "occluded", "surface"):
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["video"], c["video"]) and not np.array_equal(a["points"], c["points"])


def test_config_validation():
    with pytest.raises(InputError, match="unknown synth config key"):
        S.resolve_config({"num_vidoes": 3})
    with pytest.raises(InputError, match="num_frames"):
        S.resolve_config({"num_frames": 1})
    with pytest.raises(InputError, match="texture.families"):
        S.resolve_config({"texture": {"families": ["plasma"]}})
    with pytest.raises(InputError, match="size"):
        S.resolve_config({"size": [8, 8]})


TINY = {"num_videos": 2, "num_frames": 4, "size": [64, 96], "points": {"per_video": 12}, "seed": 3,
        "texture": {"tile": 128, "max_wavelength": 24.0}}


def test_write_set_load_set_and_mp4(tmp_path):
    import av

    out = tmp_path / "set"
    index = S.write_set(out, TINY)
    assert index["kind"] == "synthetic" and index["names"] == ["synth_0000", "synth_0001"]
    on_disk = json.loads((out / "index.json").read_text())
    assert on_disk["config_hash"] == index["config_hash"] and on_disk["seed"] == 3 and "created" in on_disk
    data = S.load_set(out)
    ref = S.generate_video(TINY, S.video_seed(3, 1))
    assert data[1]["name"] == "synth_0001"
    for k in ("video", "points", "occluded"):
        np.testing.assert_array_equal(data[1][k], ref[k])
    with av.open(str(out / "synth_0000.mp4")) as c:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert decoded.shape == data[0]["video"].shape
    assert np.abs(decoded.astype(float) - data[0]["video"]).mean() < 3.0
    # idempotent: same config -> nothing rewritten
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert S.write_set(out, TINY) == on_disk
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    # another config replaces the set; stale videos go away; no temporary files are left behind
    S.write_set(out, {**TINY, "num_videos": 1, "seed": 4})
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "synth_0000.mp4", "synth_0000.npz"]
    assert not np.array_equal(S.load_set(out)[0]["video"], data[0]["video"])


def test_load_set_validation(tmp_path):
    with pytest.raises(InputError, match="no index.json"):
        S.load_set(tmp_path)
    out = tmp_path / "set"
    S.write_set(out, {**TINY, "num_videos": 1})
    good = dict(np.load(out / "synth_0000.npz"))

    def expect(arrays, match, **kw):
        np.savez(out / "synth_0000.npz", **arrays, **kw)
        with pytest.raises(InputError, match=match):
            S.load_set(out)

    expect({**good, "video": good["video"].astype(np.float32)}, "video must be uint8")
    expect({**good, "occluded": good["occluded"][:, :2]}, "occluded must be bool")
    expect({**good, "points": good["points"][:, :2], "occluded": good["occluded"][:, :2]}, "cover 2 frames")
    expect({k: v for k, v in good.items() if k != "points"}, "missing array 'points'")
    expect({**good, "points": np.array([{"a": 1}], dtype=object)}, "without pickle")
    (out / "synth_0000.npz").unlink()
    with pytest.raises(InputError, match="missing"):
        S.load_set(out)
    (out / "index.json").write_text("{not json")
    with pytest.raises(InputError, match="JSON"):
        S.load_set(out)


def test_synth_cli(tmp_path):
    from pipeline.cli import main

    out = tmp_path / "cli"
    assert main(["synth", "--out", str(out), "--num-videos", "1", "--set", "num_frames=3", "--set", "size=[48,48]",
                 "--set", "points.per_video=8", "--set", "texture.tile=128", "--set", "texture.max_wavelength=16"]) == 0
    assert len(S.load_set(out)) == 1 and S.load_set(out)[0]["video"].shape == (3, 48, 48, 3)
    assert main(["synth", "--out", str(tmp_path / "bad"), "--set", "num_frames=1"]) == 2


def test_shipped_configs():
    from pipeline.config import load_config

    default = load_config(ROOT / "configs/synth/default.yaml", [], S.DEFAULTS)
    assert S.resolve_config(default) == S.resolve_config({})         # the file documents the defaults
    held = S.resolve_config(load_config(ROOT / "configs/synth/heldout.yaml", [], S.DEFAULTS))
    assert held["seed"] != default["seed"]
    assert not set(held["texture"]["families"]) & set(default["texture"]["families"])
    # issue 4's sets: held-out (plain and occlusion-rich twin with the same videos) vs validation (training textures)
    ht = S.resolve_config(load_config(ROOT / "configs/synth/heldout_teacher.yaml", [], S.DEFAULTS))
    hto = S.resolve_config(load_config(ROOT / "configs/synth/heldout_teacher_occ.yaml", [], S.DEFAULTS))
    val = S.resolve_config(load_config(ROOT / "configs/synth/val_teacher.yaml", [], S.DEFAULTS))
    assert {k: v for k, v in hto.items() if k != "points"} == {k: v for k, v in ht.items() if k != "points"}
    assert hto["points"]["occluded_fraction"] == val["points"]["occluded_fraction"] == 0.5
    assert len({ht["seed"], val["seed"], default["seed"]}) == 3
    assert not set(ht["texture"]["families"]) & set(val["texture"]["families"])
    assert val["texture"] == default["texture"]                      # validation = training textures
    assert (val["motion"], val["camera"]) == (ht["motion"], ht["camera"])
    # the unseen-texture validation set: a family neither training nor held-out uses, its own seed, else = val
    valu = S.resolve_config(load_config(ROOT / "configs/synth/val_teacher_unseen.yaml", [], S.DEFAULTS))
    assert not set(valu["texture"]["families"]) & (set(ht["texture"]["families"]) | set(val["texture"]["families"]))
    assert len({ht["seed"], val["seed"], valu["seed"], default["seed"]}) == 4
    same = ("num_videos", "num_frames", "size", "num_sprites", "sprite_size", "shapes", "camera", "motion", "points")
    assert all(valu[k] == val[k] for k in same)


def test_cells_texture():
    """Voronoi cells: flat regions split by sharp edges, tile-periodic, seeded; no grating-like periodicity inside."""
    tcfg = S.resolve_config({})["texture"]
    a = S.make_texture(np.random.default_rng(7), "cells", 128, tcfg)
    assert a.shape == (128, 128, 3) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    np.testing.assert_array_equal(a, S.make_texture(np.random.default_rng(7), "cells", 128, tcfg))
    assert not np.array_equal(a, S.make_texture(np.random.default_rng(8), "cells", 128, tcfg))
    grad = np.abs(np.diff(a, axis=1)).sum(-1)
    assert np.median(grad) < 0.15 < np.quantile(grad, 0.99)           # mostly flat, with strong edges
    # the tile wraps: the seam is no stronger than the inside
    seam = np.abs(a[:, 0] - a[:, -1]).sum(-1)
    assert seam.mean() < 3 * grad.mean()
    # not periodic below the tile: no shift by the grid pitch maps the texture onto itself
    for p in (8, 16, 32):
        assert np.abs(np.roll(a, p, axis=1) - a).mean() > 0.05
