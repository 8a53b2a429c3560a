"""TAP-Vid metrics pinned on hand-computed cases, query sampling, the safe pickle reader, flow sources and
the two-frame driver (DIS beats zero flow; runs reproduce exactly)."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline import evaluate as E
from pipeline import synthetic as S
from pipeline.common import InputError
from pipeline.flowsources import (FLOW_SOURCE_DEFAULTS, FLOW_SOURCES, DISFlow, ZeroFlow, bilinear_sample, make_flow_source,
                                  register_flow_source)

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------------
# Hand-computed case. One video, 2 tracks, 4 frames; ground truth at (10, 10); predictions offset along
# y by a chosen distance so that squared distances are exact in float.
#
#   track 0: query t=0; gt occluded at frame 3 only; predicted visible everywhere
#            distances per frame: f1 0.5, f2 2.0 (exactly a threshold), f3 0.0 (but gt occluded -> FP)
#   track 1: query t=1 (given as 0.6: rounds to 1); never gt-occluded; predicted occluded at frame 3
#            distances: f0 3.0, f2 10.0, f3 1.0 (exactly a threshold; predicted occluded -> not TP, not FP)
# --------------------------------------------------------------------------------------------------
T = 4


def _hand_case():
    q = np.array([[[0.0, 10.0, 10.0], [0.6, 10.0, 10.0]]])                    # [1, 2, 3] (t, y, x)
    gt = np.full((1, 2, T, 2), 10.0)
    gt_occ = np.array([[[False, False, False, True], [False, False, False, False]]])
    dist = np.array([[[0.0, 0.5, 2.0, 0.0], [3.0, 0.0, 10.0, 1.0]]])
    pred = gt.copy()
    pred[..., 1] += dist
    pred_occ = np.array([[[False, False, False, False], [False, False, False, True]]])
    return q, gt_occ, gt, pred_occ, pred


# first mode: scored entries t0:{1,2,3}, t1:{2,3}
FIRST = {
    "occlusion_accuracy": 3 / 5,
    "pts_within_1": 1 / 4, "pts_within_2": 2 / 4, "pts_within_4": 3 / 4, "pts_within_8": 3 / 4, "pts_within_16": 4 / 4,
    "jaccard_1": 1 / 7, "jaccard_2": 1 / 7, "jaccard_4": 2 / 6, "jaccard_8": 2 / 6, "jaccard_16": 3 / 5,
}
# strided mode: scored entries t0:{1,2,3}, t1:{0,2,3}
STRIDED = {
    "occlusion_accuracy": 4 / 6,
    "pts_within_1": 1 / 5, "pts_within_2": 2 / 5, "pts_within_4": 4 / 5, "pts_within_8": 4 / 5, "pts_within_16": 5 / 5,
    "jaccard_1": 1 / 9, "jaccard_2": 1 / 9, "jaccard_4": 3 / 7, "jaccard_8": 3 / 7, "jaccard_16": 4 / 6,
}


def _with_averages(d):
    d = dict(d)
    d["average_jaccard"] = np.mean([d[f"jaccard_{t}"] for t in (1, 2, 4, 8, 16)])
    d["average_pts_within_thresh"] = np.mean([d[f"pts_within_{t}"] for t in (1, 2, 4, 8, 16)])
    return d


@pytest.mark.parametrize("mode,expected", [("first", FIRST), ("strided", STRIDED)])
def test_metrics_hand_computed(mode, expected):
    q, gt_occ, gt, pred_occ, pred = _hand_case()
    # second video: a perfect prediction -> every metric is exactly 1
    q2 = np.concatenate([q, q])
    gt_occ2 = np.concatenate([gt_occ, gt_occ])
    gt2 = np.concatenate([gt, gt])
    pred_occ2 = np.concatenate([pred_occ, gt_occ])
    pred2 = np.concatenate([pred, gt])
    m = E.compute_tapvid_metrics(q2, gt_occ2, gt2, pred_occ2, pred2, mode)
    assert list(m) == list(E.METRIC_KEYS)
    for k, v in _with_averages(expected).items():
        assert m[k].shape == (2,)
        assert m[k].dtype == np.float64
        assert m[k][0] == pytest.approx(v, abs=1e-12), k
        assert m[k][1] == 1.0, k


def test_metrics_trackwise_first():
    m = E.compute_tapvid_metrics(*_hand_case(), "first", get_trackwise_metrics=True)
    assert m["occlusion_accuracy"].shape == (1, 2)
    np.testing.assert_allclose(m["occlusion_accuracy"][0], [2 / 3, 1 / 2])
    # track 0: visible scored f1 (0.5), f2 (2.0); track 1: f2 (10), f3 (1.0)
    np.testing.assert_allclose(m["pts_within_2"][0], [1 / 2, 1 / 2])
    # track 0 delta 2: TP f1; FP f2 (not within), f3 (gt occluded) -> 1 / (2 + 2)
    # track 1 delta 2: TP none (f3 within but predicted occluded); FP f2 -> 0 / (2 + 1)
    np.testing.assert_allclose(m["jaccard_2"][0], [1 / 4, 0.0])


def test_strict_threshold_and_rounding():
    # one track, query frame 0.4 -> 0; gt visible; distances exactly 1, 2, 4 -> not within their own delta
    q = np.array([[[0.4, 0.0, 0.0]]])
    gt = np.zeros((1, 1, 4, 2))
    pred = gt.copy()
    pred[0, 0, 1:, 0] = [1.0, 2.0, 4.0]
    occ = np.zeros((1, 1, 4), bool)
    m = E.compute_tapvid_metrics(q, occ, gt, occ, pred, "first")
    assert m["pts_within_1"][0] == 0.0          # 1.0 is not < 1
    assert m["pts_within_2"][0] == pytest.approx(1 / 3)
    assert m["pts_within_4"][0] == pytest.approx(2 / 3)
    assert m["pts_within_8"][0] == 1.0
    # query at 2.6 rounds to 3 = last frame: nothing left to score in 'first' mode -> NaN, like the reference
    q[0, 0, 0] = 2.6
    m = E.compute_tapvid_metrics(q, occ, gt, occ, pred, "first")
    assert np.isnan(m["occlusion_accuracy"][0])


def _brute_force(q, gt_occ, gt, pred_occ, pred, mode):
    """Entry-by-entry loops straight from the definitions (an independent second implementation)."""
    b_, n_, t_ = gt_occ.shape
    out = {k: np.zeros(b_) for k in E.METRIC_KEYS}
    for b in range(b_):
        ev = [(n, t) for n in range(n_) for t in range(t_)
              if (t > round(q[b, n, 0]) if mode == "first" else t != round(q[b, n, 0]))]
        out["occlusion_accuracy"][b] = sum(pred_occ[b, n, t] == gt_occ[b, n, t] for n, t in ev) / len(ev)
        for d in (1, 2, 4, 8, 16):
            vis = [(n, t) for n, t in ev if not gt_occ[b, n, t]]
            near = {(n, t) for n, t in ev
                    if (pred[b, n, t, 0] - gt[b, n, t, 0]) ** 2 + (pred[b, n, t, 1] - gt[b, n, t, 1]) ** 2 < d * d}
            tp = sum(1 for e in vis if e in near and not pred_occ[b][e])
            fp = sum(1 for e in ev if not pred_occ[b][e] and (gt_occ[b][e] or e not in near))
            out[f"pts_within_{d}"][b] = sum(1 for e in vis if e in near) / len(vis)
            out[f"jaccard_{d}"][b] = tp / (len(vis) + fp)
        out["average_jaccard"][b] = np.mean([out[f"jaccard_{d}"][b] for d in (1, 2, 4, 8, 16)])
        out["average_pts_within_thresh"][b] = np.mean([out[f"pts_within_{d}"][b] for d in (1, 2, 4, 8, 16)])
    return out


@pytest.mark.parametrize("mode", ["first", "strided"])
def test_metrics_match_brute_force_on_random_inputs(mode):
    rng = np.random.default_rng(7)
    b, n, t = 3, 9, 7
    gt = rng.uniform(0, 64, size=(b, n, t, 2))
    pred = gt + rng.normal(0, 6, size=gt.shape)
    gt_occ = rng.uniform(size=(b, n, t)) < 0.3
    pred_occ = rng.uniform(size=(b, n, t)) < 0.3
    q = np.stack([rng.integers(0, t - 2, size=(b, n)).astype(float), rng.uniform(0, 64, (b, n)),
                  rng.uniform(0, 64, (b, n))], axis=-1)
    m = E.compute_tapvid_metrics(q, gt_occ, gt, pred_occ, pred, mode)
    ref = _brute_force(q, gt_occ, gt, pred_occ, pred, mode)
    for k in E.METRIC_KEYS:
        np.testing.assert_allclose(m[k], ref[k], rtol=0, atol=1e-12, err_msg=k)


def test_metrics_reject_bad_input():
    q, gt_occ, gt, pred_occ, pred = _hand_case()
    with pytest.raises(InputError, match="query_mode"):
        E.compute_tapvid_metrics(q, gt_occ, gt, pred_occ, pred, "last")
    with pytest.raises(InputError, match="pred_tracks"):
        E.compute_tapvid_metrics(q, gt_occ, gt, pred_occ, pred[:, :, :3], "first")


# ------------------------------------------------------------------------------------------- queries

def test_sample_queries_first():
    occ = np.array([[True, False, False], [True, True, True], [False, True, False]])
    pts = np.arange(3 * 3 * 2, dtype=np.float32).reshape(3, 3, 2)      # (x, y)
    frames = np.zeros((3, 4, 4, 3), np.uint8)
    d = E.sample_queries_first(occ, pts, frames)
    assert d["video"].shape == (1, 3, 4, 4, 3)
    # track 1 never visible -> dropped; track 0 first visible at 1, track 2 at 0
    np.testing.assert_array_equal(d["query_points"][0], [[1, pts[0, 1, 1], pts[0, 1, 0]],
                                                         [0, pts[2, 0, 1], pts[2, 0, 0]]])
    np.testing.assert_array_equal(d["target_points"][0], pts[[0, 2]])
    np.testing.assert_array_equal(d["occluded"][0], occ[[0, 2]])


def test_sample_queries_strided():
    occ = np.array([[False, True, True, False, False],
                    [True, False, False, False, True]])
    pts = np.random.default_rng(0).uniform(0, 50, size=(2, 5, 2)).astype(np.float32)
    d = E.sample_queries_strided(occ, pts, np.zeros((5, 2, 2, 3), np.uint8), query_stride=2)
    # frames 0, 2, 4: frame 0 -> track 0; frame 2 -> track 1; frame 4 -> track 0
    np.testing.assert_array_equal(d["trackgroup"][0], [0, 1, 0])
    np.testing.assert_array_equal(d["query_points"][0, :, 0], [0, 2, 4])
    np.testing.assert_array_equal(d["query_points"][0, 1, 1:], [pts[1, 2, 1], pts[1, 2, 0]])
    np.testing.assert_array_equal(d["target_points"][0], pts[[0, 1, 0]])
    np.testing.assert_array_equal(d["occluded"][0], occ[[0, 1, 0]])


# ------------------------------------------------------------------------------------------- readers

class _Plain:
    def __init__(self):
        self.x = 1


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"v": {"video": _Evil(marker)}})
    with pytest.raises(InputError, match="refusing"):
        E.restricted_load(evil)
    # hand-written protocol-0 opcodes: GLOBAL os.system, MARK, STRING, TUPLE, REDUCE, STOP
    raw = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    path = tmp_path / "evil.pkl"
    path.write_bytes(raw)
    with pytest.raises(InputError) as ei:
        E.load_tapvid_pickle(path)
    assert str(path) in str(ei.value) and "os.system" in str(ei.value)
    # an arbitrary class defined in this test module is refused too
    with pytest.raises(InputError, match="_Plain"):
        E.restricted_load(pickle.dumps([_Plain()]))
    assert not marker.exists()


def _tapvid_item(rng, t, h, w, n):
    return {"video": rng.integers(0, 256, size=(t, h, w, 3), dtype=np.uint8),
            "points": rng.uniform(0, 1, size=(n, t, 2)).astype(np.float32),
            "occluded": rng.uniform(size=(n, t)) < 0.3}


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_load_tapvid_pickle_davis_dict(tmp_path, protocol):
    from PIL import Image

    rng = np.random.default_rng(1)
    data = {"bear": _tapvid_item(rng, 3, 40, 60, 5), "cows": _tapvid_item(rng, 2, 30, 50, 4)}
    path = tmp_path / "tapvid_davis.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    items = E.load_tapvid_pickle(path, resize=256)
    assert [it["name"] for it in items] == ["bear", "cows"]
    bear = items[0]
    assert bear["video"].shape == (3, 256, 256, 3) and bear["video"].dtype == np.uint8
    expected = np.asarray(Image.fromarray(data["bear"]["video"][1]).resize((256, 256), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(bear["video"][1], expected)
    np.testing.assert_array_equal(bear["points"], data["bear"]["points"])     # stays normalised
    np.testing.assert_array_equal(bear["occluded"], data["bear"]["occluded"])
    assert E.load_tapvid_pickle(path, resize=None)[1]["video"].shape == (2, 30, 50, 3)


def test_load_tapvid_pickle_list_and_validation(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "tapvid_rgb_stacking.pkl"
    path.write_bytes(pickle.dumps([_tapvid_item(rng, 2, 16, 16, 3) for _ in range(3)]))
    items = E.load_tapvid_pickle(path, resize=32, max_videos=2)
    assert [it["name"] for it in items] == ["0000", "0001"]
    assert items[0]["video"].shape == (2, 32, 32, 3)
    bad = _tapvid_item(rng, 2, 16, 16, 3)
    bad["occluded"] = bad["occluded"][:, :1]
    path.write_bytes(pickle.dumps({"x": bad}))
    with pytest.raises(InputError, match="occluded"):
        E.load_tapvid_pickle(path)
    path.write_bytes(b"not a pickle")
    with pytest.raises(InputError, match="pickle"):
        E.load_tapvid_pickle(path)
    with pytest.raises(InputError, match="not found"):
        E.load_tapvid_pickle(tmp_path / "missing.pkl")


# ------------------------------------------------------------------------------------------- flow sources

def test_bilinear_sample_raster_convention():
    h, w = 5, 7
    field = np.stack(np.meshgrid(np.arange(w), np.arange(h), indexing="xy"), axis=-1).astype(np.float32)  # f = (j, i)
    pts = np.array([[0.5, 0.5], [3.5, 2.5], [2.0, 1.25], [6.5, 4.5], [-3.0, 1.5], [100.0, 100.0]], np.float32)
    out = bilinear_sample(field, pts)
    np.testing.assert_allclose(out, [[0, 0], [3, 2], [1.5, 0.75], [6, 4], [0, 1], [6, 4]], atol=1e-6)


def _textured_pair(shift=(3.0, -2.0), size=96):
    cfg = S.resolve_config({})
    tex = S.make_texture(np.random.default_rng(3), "noise", 256, cfg["texture"])
    ys, xs = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
    pix = np.stack([xs, ys], -1) + 40.0
    f0 = S.to_uint8(S.sample_texture(tex, pix))
    f1 = S.to_uint8(S.sample_texture(tex, pix - np.array(shift)))      # content moves by +shift
    return f0, f1


def test_dis_recovers_translation_and_fb_check():
    f0, f1 = _textured_pair()
    pts = np.array([[48.0, 48.0], [30.5, 60.25], [70.0, 30.0], [94.0, 48.0]], np.float32)
    tgt, vis = DISFlow().track(f0, f1, pts)
    assert tgt.dtype == np.float32 and vis.dtype == np.bool_ and vis.all()
    np.testing.assert_allclose(tgt[:3] - pts[:3], [[3.0, -2.0]] * 3, atol=0.3)
    tgt, vis = DISFlow(fb_check=True).track(f0, f1, pts)
    assert vis[:3].all() and not vis[3]                 # x = 94 + 3 leaves the 96-px frame
    z, zv = ZeroFlow().track(f0, f1, pts)
    np.testing.assert_array_equal(z, pts)
    assert zv.all()
    with pytest.raises(InputError, match="frame0"):
        DISFlow().track(f0.astype(np.float32), f1, pts)


def test_registry():
    assert {"zero", "dis", "farneback"} <= set(FLOW_SOURCES)
    with pytest.raises(InputError, match="unknown flow source"):
        make_flow_source("nope")
    with pytest.raises(InputError, match="unknown option"):
        make_flow_source("dis", {"presett": "fast"})
    assert make_flow_source("dis", {"preset": "fast"}).preset == "fast"
    with pytest.raises(InputError, match="already registered"):
        register_flow_source("zero", lambda cfg: ZeroFlow())
    register_flow_source("test-lazy", "pipeline.flowsources:make_zero", overwrite=True)
    try:
        assert make_flow_source("test-lazy").name == "zero"
        assert callable(FLOW_SOURCES["test-lazy"])      # resolved once, then cached
    finally:
        FLOW_SOURCES.pop("test-lazy")
        FLOW_SOURCE_DEFAULTS.pop("test-lazy")


# ------------------------------------------------------------------------------------------- driver

class _Oracle:
    """Knows the ground truth; frames carry their index in pixel (0, 0). Records every call."""

    name = "oracle"

    def __init__(self, points_px, occluded):
        self.points, self.occluded, self.calls = points_px, occluded, []

    def track(self, frame0, frame1, points):
        q, t = int(frame0[0, 0, 0]), int(frame1[0, 0, 0])
        self.calls.append((q, t, len(points)))
        # which tracks are these? the ones whose gt at frame q equals the query point
        idx = [int(np.argmin(np.abs(self.points[:, q] - p).sum(-1))) for p in points]
        self.last_result = SimpleNamespace(score=np.full(len(points), 10.0 * q + t), fb_error=None)
        return self.points[idx, t].astype(np.float32), ~self.occluded[idx, t]


def test_driver_two_frame_protocol_with_oracle():
    rng = np.random.default_rng(5)
    n, t, size = 12, 6, 64
    video = rng.integers(0, 256, size=(t, size, size, 3), dtype=np.uint8)
    video[:, 0, 0, 0] = np.arange(t)
    pts = rng.uniform(0.05, 0.95, size=(n, t, 2)).astype(np.float32)
    occ = rng.uniform(size=(n, t)) < 0.25
    occ[0] = True                                      # never visible: dropped
    occ[1, :3] = True                                  # first visible at 3
    oracle = _Oracle(pts.astype(np.float64) * size, occ)
    res = E.evaluate_first_two_frame([{"name": "v", "video": video, "points": pts, "occluded": occ}], oracle,
                                     progress=False)
    rec = res["per_video"][0]
    assert rec["num_queries"] == n - 1
    for k in E.METRIC_KEYS:
        assert rec[k] == 1.0, k
    assert rec["ad"] == pytest.approx(0.0, abs=1e-5)
    first = np.argmax(~occ[1:], axis=1)
    # exactly one call per (query frame, later frame); frame0 is always the query frame: no chaining
    expected = sorted((int(q), tt) for q in np.unique(first) for tt in range(int(q) + 1, t))
    assert sorted((q, tt) for q, tt, _ in oracle.calls) == expected
    assert sum(c[2] for c in oracle.calls) == sum(t - 1 - int(q) for q in first)
    assert "predictions" not in rec
    # predictions=True: every entry's prediction and the source's score, null where not scored
    res2 = E.evaluate_two_frame([{"name": "v", "video": video, "points": pts, "occluded": occ}], oracle,
                                progress=False, predictions=True)
    p = res2["per_video"][0]["predictions"]
    assert {k for k in res2["per_video"][0] if k != "predictions"} == set(rec)
    assert set(p) == {"query_points", "gt_tracks", "gt_occluded", "pred_tracks", "pred_occluded", "score"}
    qf = np.round(np.array(p["query_points"])[:, 0]).astype(int)
    scored = np.arange(t)[None, :] > qf[:, None]                       # [N, T]: frames after the query frame
    assert np.allclose(np.array(p["pred_tracks"])[scored], np.array(p["gt_tracks"])[scored], atol=1e-3)
    assert np.array(p["pred_occluded"]).dtype == bool and np.array(p["pred_occluded"]).shape == (n - 1, t)
    for i in range(n - 1):
        assert p["score"][i] == [10.0 * qf[i] + tt if tt > qf[i] else None for tt in range(t)]
    json.dumps(p)                                      # plain JSON


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_eval")
    S.write_set(out, {"num_videos": 2, "num_frames": 8, "points": {"per_video": 64}, "seed": 11})
    return S.load_set(out), out


def test_dis_beats_zero_and_runs_reproduce(small_set):
    data, _ = small_set
    zero = E.evaluate_first_two_frame(data, make_flow_source("zero"), progress=False)
    dis = E.evaluate_first_two_frame(data, make_flow_source("dis"), progress=False)
    dis2 = E.evaluate_first_two_frame(data, make_flow_source("dis"), progress=False)
    assert dis["mean"]["average_pts_within_thresh"] > zero["mean"]["average_pts_within_thresh"] + 0.15
    assert dis["mean"]["average_jaccard"] > zero["mean"]["average_jaccard"] + 0.15
    assert dis["mean"]["ad"] < zero["mean"]["ad"]
    assert dis2["per_video"] == dis["per_video"] and dis2["mean"] == dis["mean"]
    assert dis["mean"]["num_videos"] == 2 and len(dis["per_video"]) == 2
    table = E.format_table({"zero": zero, "dis": dis})
    assert "mean" in table and "dis" in table and "zero" in table
    assert f"{dis['mean']['average_jaccard'] * 100:.1f}" in table


def test_eval_cli(small_set, tmp_path, capsys):
    from pipeline.cli import main

    _, folder = small_set
    out = tmp_path / "res.json"
    rc = main(["eval", "--source", "zero,farneback", "--data", str(folder), "--out", str(out), "--max-videos", "1",
               "--no-progress", "--set", "sources.farneback.levels=3", "--predictions"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"zero", "farneback"}
    assert len(res["results"]["zero"]["per_video"]) == 1
    assert res["config"]["sources"]["farneback"]["levels"] == 3
    assert res["config"]["predictions"] is True
    zp = res["results"]["zero"]["per_video"][0]["predictions"]
    q = np.array(zp["query_points"])                   # (t, y, x); zero flow predicts (x, y) of the query
    assert "score" not in zp and np.allclose(np.array(zp["pred_tracks"]), q[:, None, [2, 1]])
    assert "AJ" in capsys.readouterr().out
    assert main(["eval", "--source", "nope", "--data", str(folder)]) == 2
    assert main(["eval", "--source", "zero", "--data", str(tmp_path / "missing")]) == 2


def test_shipped_eval_config():
    from pipeline.config import load_config

    cfg = load_config(ROOT / "configs/eval/tapvid_first.yaml", [], E.DEFAULTS)
    assert cfg == E.DEFAULTS
    assert cfg["query_mode"] == "first" and cfg["resize"] == 256
