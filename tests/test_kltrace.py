"""teacher/kltrace.py with the ideal-predictor fixture (teacher/ideal.py) and a tiny random model.

The ideal predictor knows the true motion, so these tests measure the read-out itself: bump, KL, mask averaging,
centroid, zoom bookkeeping. It is a fixture only: it never labels data.
"""
import dataclasses
import functools
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from teacher.ideal import IdealPredictor, fit_codebook
from teacher.kltrace import (KLTraceConfig, TracerModel, View, appearance_error, average_masks, bump_pixels,
                             forward_backward, gaussian_bump, group_crops, kl_divergence, kl_maps_naive, kl_trace,
                             per_query_crops, readout, rgb_trace, touched_cells, touched_union, zoom_sides)

torch.set_num_threads(1)
cv2.setNumThreads(1)
ROOT = Path(__file__).resolve().parents[1]
FAST_MAPS = functools.partial(kl_maps_naive, share_clean=True)      # identical maps, one clean pass per call


# ---------------------------------------------------------------------------------------------- fixtures

def texture(H, W, seed):
    """Seeded multi-scale colour noise, uint8 [H, W, 3]."""
    rng = np.random.default_rng(seed)
    img = np.zeros((H, W, 3), np.float64)
    for s, a in ((4, 1.0), (8, 0.7), (16, 0.5), (32, 0.35)):
        n = rng.standard_normal((max(2, H // s + 2), max(2, W // s + 2), 3))
        img += a * cv2.resize(n, (W, H), interpolation=cv2.INTER_CUBIC)
    img = (img - img.mean()) / img.std()
    return np.clip(128 + 50 * img, 0, 255).astype(np.uint8)


def warp_frame(img, inverse):
    """frame 1 = frame 0 at inverse(x1) (bilinear, raster pixel centres)."""
    H, W = img.shape[:2]
    ys, xs = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")
    p0 = inverse(torch.tensor(np.stack([xs, ys], -1).reshape(-1, 2))).numpy().reshape(H, W, 2)
    return cv2.remap(img, (p0[..., 0] - 0.5).astype(np.float32), (p0[..., 1] - 0.5).astype(np.float32),
                     cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


@pytest.fixture(scope="module")
def scene():
    f0 = texture(64, 64, 0)
    cb = fit_codebook(torch.from_numpy(f0).permute(2, 0, 1)[None].float(), k=256, seed=0)
    return f0, cb


def chw(img):
    return torch.from_numpy(img).permute(2, 0, 1).float()


def trace_errors(model, f0, queries, cfg, fn=kl_trace, **kw):
    f1 = warp_frame(f0, model.inverse_map)
    res = fn(model, f0, f1, queries, cfg, **kw)
    err = (res.targets.double() - model.track(queries)).norm(dim=1)
    return err, res


REDUCED = dict(num_masks=2, zoom_levels=4)           # fewer masks than the lab's 5, all 4 zoom levels


# ---------------------------------------------------------------------------------------------- bump

def test_bump_clipped_and_exactly_zero_beyond_radius():
    sigma, r = 2.0, 8.0
    xy = torch.tensor([[10.3, 20.7], [0.2, 31.9], [16.0, 16.0]])
    zero = torch.zeros(1, 3, 32, 32)
    out = gaussian_bump(zero, xy, sigma, 255.0, r)
    assert out.shape == (3, 3, 32, 32)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])     # white: every channel
    ys, xs = torch.meshgrid(torch.arange(32) + 0.5, torch.arange(32) + 0.5, indexing="ij")
    for q in range(3):
        d2 = (xs - xy[q, 0]) ** 2 + (ys - xy[q, 1]) ** 2
        expect = 255.0 * torch.exp(-d2 / (2 * sigma ** 2)) * (d2 <= r * r)
        assert torch.allclose(out[q, 0], expect, atol=1e-4)
        assert (out[q, 0][d2 > r * r] == 0).all()
        assert (out[q, 0][d2 <= r * r] > 0).all()
    # raster convention: pixel (15, 15) has its centre at (15.5, 15.5), d^2 = 0.5 from (16, 16)
    assert out[2, 0, 15, 15].item() == pytest.approx(255.0 * math.exp(-0.5 / 8.0), rel=1e-5)
    on_centre = gaussian_bump(zero, torch.tensor([[15.5, 15.5]]), sigma, 255.0, r)
    assert on_centre[0, :, 15, 15].tolist() == [255.0] * 3
    bright = gaussian_bump(torch.full((1, 3, 32, 32), 250.0), xy, sigma, 255.0, r)
    assert bright.max() == 255.0 and bright.min() == 250.0                              # clipped to [0, 255]
    dark = gaussian_bump(torch.zeros(1, 3, 32, 32), xy, sigma, -255.0, r)
    assert dark.min() == 0.0 and dark.max() == 0.0


def test_touched_cells_cover_every_changed_pixel():
    cfg = KLTraceConfig()
    g = torch.Generator().manual_seed(0)
    H, W, cell = 64, 48, 8
    frame = torch.randint(0, 256, (1, 3, H, W), generator=g).float()
    xy = torch.rand(200, 2, generator=g) * torch.tensor([W + 6.0, H + 6.0]) - 3.0       # includes off-edge centres
    xy = torch.cat([xy, torch.tensor([[0.5, 0.5], [8.0, 8.0], [47.99, 63.99], [24.0, 60.5]])])
    cells = touched_cells(xy, cfg, (H, W), cell)
    bumped = gaussian_bump(frame, xy, cfg.sigma, cfg.amplitude, cfg.bump_radius)
    zero_bumped = gaussian_bump(torch.zeros(1, 3, H, W), xy, cfg.sigma, cfg.amplitude, cfg.bump_radius)
    gw = W // cell
    for q in range(xy.shape[0]):
        changed = torch.nonzero((bumped[q] != frame[0]).any(0))
        changed_cells = set(((changed[:, 0] // cell) * gw + changed[:, 1] // cell).tolist())
        t = set(cells[q].tolist())
        assert changed_cells <= t
        # tight: on a black frame every touched cell really changes
        nz = torch.nonzero(zero_bumped[q, 0] > 0)
        assert set(((nz[:, 0] // cell) * gw + nz[:, 1] // cell).tolist()) == t
        assert len(bump_pixels(xy[q:q + 1], cfg.bump_radius, (H, W))[0]) == len(nz)
    union = touched_union(xy[:3], cfg, (H, W), cell)
    assert union.tolist() == sorted(set().union(*[set(c.tolist()) for c in cells[:3]]))


# ---------------------------------------------------------------------------------------------- KL pieces

def test_kl_divergence_fp32_and_broadcast():
    g = torch.Generator().manual_seed(0)
    p = torch.log_softmax(torch.randn(1, 5, 7, generator=g), -1)
    q = torch.log_softmax(torch.randn(3, 5, 7, generator=g), -1)
    kl = kl_divergence(p, q)
    assert kl.shape == (3, 5) and kl.dtype == torch.float32 and (kl > 0).all()
    ref = (p.exp() * (p - q)).sum(-1)
    assert torch.allclose(kl, ref, atol=1e-6)
    assert kl_divergence(q, q).abs().max() < 1e-6
    # zero-probability entries contribute nothing (no NaN from -inf - -inf)
    lp = torch.tensor([[0.0, -math.inf]])
    lq = torch.tensor([[math.log(0.5), -math.inf]])
    assert kl_divergence(lp, lq).item() == pytest.approx(math.log(2.0))
    assert kl_divergence(lp.bfloat16(), lq.bfloat16()).dtype == torch.float32


def test_average_masks_excludes_revealed_cells():
    nan = float("nan")
    maps = torch.tensor([[[1.0, nan, 3.0, nan]], [[3.0, 4.0, nan, nan]]])      # [M=2, Q=1, P=4]
    avg = average_masks(maps)
    assert avg[0, :3].tolist() == [2.0, 4.0, 3.0] and math.isnan(avg[0, 3].item())
    zero = average_masks(torch.nan_to_num(maps, nan=0.0))                       # the lab's counting as 0
    assert zero[0].tolist() == [2.0, 2.0, 1.5, 0.0]
    # a peak revealed in one of two masks: excluded -> found; counted as 0 -> lost to the neighbour
    kl = torch.zeros(2, 1, 4, 4)
    kl[:, 0, 1, 1] = 10.0
    kl[:, 0, 1, 2] = 6.0
    kl[0, 0, 1, 1] = nan
    xy_ex, _ = readout(average_masks(kl).reshape(1, 4, 4), 8, "argmax")
    xy_zero, _ = readout(average_masks(torch.nan_to_num(kl, nan=0.0)).reshape(1, 4, 4), 8, "argmax")
    assert xy_ex[0].tolist() == [10.0, 10.0] and xy_zero[0].tolist() == [18.0, 10.0]


def test_readout_formula_on_hand_maps():
    kl = torch.zeros(2, 4, 4)
    kl[0, 2, 1] = 9.0
    kl[0, 2, 2] = 9.0                       # equal neighbours -> halfway between their response centres
    kl[1, 0, 3] = 4.0
    kl[1, 1, 3] = 1.0                       # corner peak: window clipped to the grid
    xy, peak = readout(kl, 8, "centroid3x3", power=1.0, floor="none")
    assert peak.tolist() == [9.0, 4.0]
    assert xy[0].tolist() == pytest.approx([8 * 1.5 + 2, 8 * 2 + 2])
    assert xy[1].tolist() == pytest.approx([8 * 3 + 2, 8 * 0.2 + 2])
    xy_p, _ = readout(kl, 8, "centroid3x3", power=0.5, floor="none")
    assert xy_p[1, 1].item() == pytest.approx(8 * (1.0 / 3.0) + 2)             # sqrt weights 2 : 1
    xy_a, _ = readout(kl, 8, "argmax")
    assert xy_a[1].tolist() == [26.0, 2.0]
    xy_c, _ = readout(kl, 8, "argmax", center=4.0)
    assert xy_c[1].tolist() == [28.0, 4.0]
    # a constant side-effect floor does not move the median-floored centroid
    xy_f, _ = readout(kl + 0.5, 8, "centroid3x3", power=1.0, floor="median")
    assert torch.allclose(xy_f, xy, atol=1e-5)
    # NaN cells are ignored; an all-NaN map is finite (peak 0, image centre)
    nanmap = torch.full((1, 4, 4), float("nan"))
    xy_n, pk_n = readout(nanmap, 8)
    assert torch.isfinite(xy_n).all() and pk_n.item() == 0.0


def test_kl_maps_naive_nan_at_revealed_and_shared_clean_identical(scene):
    f0, cb = scene
    model = IdealPredictor.translation(2.3, -1.4, cb, image_size=(64, 64), side_effect=0.05)
    f1 = warp_frame(f0, model.inverse_map)
    reveal = torch.zeros(64, dtype=torch.bool)
    reveal[[3, 20, 41]] = True
    q = torch.tensor([[20.2, 30.1], [40.7, 12.5], [33.3, 50.0]])
    cfg = KLTraceConfig(batch=2)
    a = kl_maps_naive(model, chw(f0), chw(f1), q, reveal, 7, cfg)
    b = kl_maps_naive(model, chw(f0), chw(f1), q, reveal, 7, cfg, share_clean=True)
    assert a.shape == (3, 64)
    assert torch.isnan(a[:, reveal]).all() and torch.isfinite(a[:, ~reveal]).all()
    assert (a[:, ~reveal] >= -1e-5).all()
    assert torch.allclose(a, b, equal_nan=True, atol=1e-5)


# ---------------------------------------------------------------------------------------------- ideal read-out

def test_readout_centre_offset_is_unbiased(scene):
    """Full-frame maps of random sub-pixel points under random translations: with the first-code sub-block
    centre (cell/4) the read-out is unbiased; the patch centre (cell/2) is off by ~2 px in x and y."""
    f0, cb = scene
    rng = np.random.default_rng(3)
    reveal = torch.zeros(64, dtype=torch.bool)
    cfg = KLTraceConfig()
    signed, signed_mid, err_pow, err_lin = [], [], [], []
    for k in range(3):
        dx, dy = rng.uniform(-5, 5, 2)
        model = IdealPredictor.translation(dx, dy, cb, image_size=(64, 64))
        q = torch.tensor(rng.uniform(14, 50, (60, 2)), dtype=torch.float32)
        maps = FAST_MAPS(model, chw(f0), chw(warp_frame(f0, model.inverse_map)), q, reveal, k, cfg)
        maps = maps.reshape(-1, 8, 8)
        gt = model.track(q.double())
        xy, _ = readout(maps, 8)                                           # defaults: cell/4, power 0.25, median
        signed.append(xy.double() - gt)
        signed_mid.append(readout(maps, 8, center=4.0)[0].double() - gt)
        err_pow.append((xy.double() - gt).norm(dim=1))
        err_lin.append((readout(maps, 8, power=1.0, floor="none")[0].double() - gt).norm(dim=1))
    s, sm = torch.cat(signed), torch.cat(signed_mid)
    assert s.mean(0).abs().max() < 0.25, s.mean(0)
    assert (sm.mean(0) - 2.0).abs().max() < 0.25, sm.mean(0)
    e, el = torch.cat(err_pow), torch.cat(err_lin)
    assert e.median() < 1.0, e.median()                  # one full-frame level, one mask: ~0.4 px
    assert el.median() > 1.5 * e.median()               # plain KL weights snap to the peak cell (~2.4 px)


@pytest.mark.parametrize("dx,dy", [(3.3, -2.6), (-4.7, 1.45), (0.6, 5.2)])
def test_kl_trace_ideal_translation_subpixel(scene, dx, dy):
    f0, cb = scene
    model = IdealPredictor.translation(dx, dy, cb, image_size=(64, 64))
    q = torch.tensor(np.random.default_rng(int(10 * dx) % 97).uniform(8, 56, (24, 2)))
    err, res = trace_errors(model, f0, q, KLTraceConfig(**REDUCED), kl_maps_fn=FAST_MAPS)
    assert err.median() < 1.0, err
    assert (err <= 1.0).float().mean() >= 0.75
    assert res.visible.float().mean() >= 0.9
    # each zoom level refines: the last level is better than the full frame
    lvl = (res.levels.double() - model.track(q)).norm(dim=2).median(dim=1).values
    assert res.levels.shape == (5, 24, 2) and lvl[-1] < lvl[0]


def test_kl_trace_ideal_rotation_zoom_and_nonsquare_frames(scene):
    """A small rotation + zoom about the centre, on 96x80 frames traced by a 64x64 model (squish, then
    min-side square crops: the bookkeeping maps everything back)."""
    _, cb = scene
    H, W = 80, 96
    f0 = texture(H, W, 5)
    a, s = math.radians(3.0), 1.04
    c = np.array([W / 2, H / 2])
    R = s * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    A = np.concatenate([R, (c - R @ c + np.array([1.3, -0.8]))[:, None]], 1)
    model = IdealPredictor.affine(A, cb, image_size=(64, 64))
    q = torch.tensor(np.random.default_rng(4).uniform(12, [W - 12, H - 12], (24, 2)))
    err, res = trace_errors(model, f0, q, KLTraceConfig(**REDUCED), kl_maps_fn=FAST_MAPS)
    assert zoom_sides((H, W), 4, 0.75) == [80, 60, 45, 34]
    assert err.median() < 1.0, err
    assert res.targets.shape == (24, 2) and res.visible.all()


@pytest.mark.parametrize("transfer", [1.0, 0.25])
def test_rgb_difference_is_worse_than_kl(scene, transfer):
    """Perfect predictor (transfer 1): the decoded difference holds the whole bump, but its argmax is at pixel
    resolution on blocky greedy codes. transfer 0.25: the predictor carries only part of the bump into its
    prediction; the KL still reads the shifted distributions, greedy codes mostly do not flip (paper Table 2:
    5.08 vs 8.48 px)."""
    f0, cb = scene
    rng = np.random.default_rng(6)
    e_kl, e_rgb = [], []
    for dx, dy in ((3.3, -2.6), (-2.2, 4.1)):
        model = IdealPredictor.translation(dx, dy, cb, image_size=(64, 64), transfer=transfer)
        q = torch.tensor(rng.uniform(8, 56, (14, 2)))
        e_kl.append(trace_errors(model, f0, q, KLTraceConfig(**REDUCED), kl_maps_fn=FAST_MAPS)[0])
        err, res = trace_errors(model, f0, q, KLTraceConfig(**REDUCED, method="rgb"), fn=rgb_trace)
        e_rgb.append(err)
        assert res.targets.shape == (14, 2) and torch.isfinite(res.score).all()
    kl, rgb = torch.cat(e_kl), torch.cat(e_rgb)
    print(f"transfer {transfer}: KL median {kl.median():.3f} mean {kl.mean():.3f}; "
          f"RGB median {rgb.median():.3f} mean {rgb.mean():.3f}")
    assert kl.median() < 0.5
    assert rgb.median() > 1.8 * kl.median(), (kl.median(), rgb.median())
    assert rgb.mean() > 1.8 * kl.mean(), (kl.mean(), rgb.mean())
    assert (rgb <= 0.5).float().mean() < (kl <= 0.5).float().mean()


def test_kl_trace_method_rgb_dispatches_to_rgb_trace(scene):
    f0, cb = scene
    model = IdealPredictor.translation(1.0, 1.0, cb, image_size=(64, 64))
    f1 = warp_frame(f0, model.inverse_map)
    q = torch.tensor([[20.0, 20.0], [40.5, 33.2]])
    cfg = KLTraceConfig(num_masks=1, zoom_levels=0, method="rgb")
    a = kl_trace(model, f0, f1, q, cfg)
    b = rgb_trace(model, f0, f1, q, cfg)
    assert torch.equal(a.targets, b.targets) and torch.equal(a.score, b.score)
    assert a.stats["kl_maps_calls"] == 0 and a.stats["model_calls"] == 2


def test_excluding_revealed_cells_is_no_worse_than_counting_zero(scene):
    f0, cb = scene
    rng = np.random.default_rng(7)
    res = {True: [], False: []}
    for dx, dy in ((1.7, -3.2), (-2.9, 0.8)):
        model = IdealPredictor.translation(dx, dy, cb, image_size=(64, 64))
        q = torch.tensor(rng.uniform(8, 56, (40, 2)))
        for ex in (True, False):
            cfg = KLTraceConfig(mask_ratio=0.6, num_masks=3, zoom_levels=0, exclude_revealed=ex, refine_power=1.0,
                                refine_floor="none")
            res[ex].append(trace_errors(model, f0, q, cfg, kl_maps_fn=FAST_MAPS)[0])
    ex, zero = torch.cat(res[True]), torch.cat(res[False])
    assert ex.mean() <= zero.mean() + 0.05, (ex.mean(), zero.mean())
    assert ex.median() <= zero.median() + 0.05, (ex.median(), zero.median())


def test_shared_crops_match_per_query_crops_with_far_fewer_calls(scene):
    f0, cb = scene
    model = IdealPredictor.translation(3.3, -2.6, cb, image_size=(64, 64))
    q = torch.tensor(np.random.default_rng(8).uniform(6, 58, (36, 2)))
    calls = {}
    errs = {}
    for share in (True, False):
        n = [0]

        def counting(*a, **k):
            n[0] += 1
            return FAST_MAPS(*a, **k)
        err, res = trace_errors(model, f0, q, KLTraceConfig(**REDUCED, share_crops=share), kl_maps_fn=counting)
        calls[share], errs[share] = n[0], err
        assert res.stats["kl_maps_calls"] == n[0]
    assert errs[True].median() <= errs[False].median() + 0.1, (errs[True].median(), errs[False].median())
    assert errs[True].median() < 1.0
    assert calls[False] == 2 * (1 + 4 * 36)
    assert calls[True] * 3 <= calls[False], calls


def test_occlusion_points_leaving_the_frame(scene):
    f0, cb = scene
    model = IdealPredictor.translation(36.0, 0.0, cb, image_size=(64, 64))
    q = torch.tensor([[6.5, 20.0], [12.0, 40.0], [15.3, 10.0], [40.0, 20.0], [50.5, 44.0], [58.0, 30.0]])
    f1 = warp_frame(f0, model.inverse_map)
    for level in ("mean", "final", "first", "max"):
        res = kl_trace(model, f0, f1, q, KLTraceConfig(num_masks=1, zoom_levels=2, occ_level=level),
                       kl_maps_fn=FAST_MAPS)
        assert res.visible.tolist() == [True, True, True, False, False, False], (level, res.score)
        assert (res.score[:3] > 10 * res.score[3:].max()).all()


def test_forward_backward_flags_points_with_no_match(scene):
    """Points that leave the frame have no true match; with the KL-peak test off (occ_threshold 0) the round trip
    alone must find them, and visible points must come back within a few model px. The ideal predictor knows one
    motion, so the backward trace uses the inverse translation's predictor."""
    f0, cb = scene
    fwd_model = IdealPredictor.translation(36.0, 0.0, cb, image_size=(64, 64))
    bwd_model = IdealPredictor.translation(-36.0, 0.0, cb, image_size=(64, 64))
    f1 = warp_frame(f0, fwd_model.inverse_map)
    q = torch.tensor([[6.5, 20.0], [12.0, 40.0], [15.3, 10.0], [40.0, 20.0], [50.5, 44.0], [58.0, 30.0]])
    calls = []

    def trace(a, b, pts, cfg):
        calls.append(cfg.fb_threshold)
        model = fwd_model if a is f0 else bwd_model
        return kl_trace(model, a, b, pts, cfg, kl_maps_fn=FAST_MAPS)

    cfg = KLTraceConfig(num_masks=1, zoom_levels=2, occ_threshold=0.0, fb_threshold=4.0)
    res = forward_backward(trace, fwd_model, f0, f1, q, cfg)
    assert calls == [None, None]                        # both traces run without the check (no recursion)
    assert res.fb_error.shape == (6,) and (res.fb_error[:3] < 3.0).all(), res.fb_error
    assert (res.fb_error[3:] > 10.0).all(), res.fb_error
    assert res.visible.tolist() == [True, True, True, False, False, False]
    assert res.stats["backward_kl_maps_calls"] >= 3 and len(res.stats["backward_crop_pairs"]) == 3   # 1 + 2 levels


def test_fb_threshold_in_kl_trace_and_rgb_trace():
    model = TinyRandomTracer()
    f0, f1 = texture(48, 40, 1), texture(48, 40, 2)
    q = torch.tensor([[3.0, 4.0], [20.5, 30.2], [39.0, 47.0], [10.0, 10.0]])
    base = KLTraceConfig(num_masks=1, zoom_levels=1, occ_threshold=0.0)
    plain = kl_trace(model, f0, f1, q, base)
    assert plain.fb_error is None
    for fn in (kl_trace, rgb_trace):
        loose = fn(model, f0, f1, q, dataclasses.replace(base, fb_threshold=1e6))
        tight = fn(model, f0, f1, q, dataclasses.replace(base, fb_threshold=1e-6))
        assert torch.equal(loose.targets, fn(model, f0, f1, q, base).targets)    # the forward estimate is kept
        assert loose.fb_error.shape == (4,) and torch.isfinite(loose.fb_error).all()
        assert torch.equal(tight.visible, loose.visible & (loose.fb_error <= 1e-6))
        for none in (0.0, float("inf")):                          # 0 (what overrides a bundle's) or inf: off
            off = fn(model, f0, f1, q, dataclasses.replace(base, fb_threshold=none))
            assert off.fb_error is None and "backward_kl_maps_calls" not in off.stats
    for bad in (-1.0, "near"):
        with pytest.raises(ValueError, match="fb_threshold"):
            KLTraceConfig(fb_threshold=bad)
    assert KLTraceConfig(fb_threshold="inf").fb_threshold == float("inf")     # what --set ...=inf gives


def test_appearance_error_finds_moved_content_and_flags_hidden_or_lost_points():
    """Frame 1 = frame 0 moved by (5, -3) px with a foreign square pasted over one region: points whose content is
    in frame 1 near their estimate (exact, or up to the search radius off) score low; points under the square, or
    whose estimate is further off than the search radius, score high; a patch partly outside frame 1 is compared
    on its pixels inside."""
    f0 = texture(64, 64, 0)
    f1 = np.roll(f0, (-3, 5), axis=(0, 1)).copy()
    f1[34:54, 8:28] = texture(20, 20, 7)                                  # occluder over x 8..27, y 34..53
    q = torch.tensor([[20.5, 20.5], [40.5, 15.5], [10.2, 30.7], [8.5, 45.5], [12.5, 40.5], [20.5, 20.5]])
    move = torch.tensor([5.0, -3.0])
    p = q + move
    p[2] += torch.tensor([3.0, -2.0])                                      # 3 px off: within the search
    p[5] += torch.tensor([9.0, 0.0])                                       # 9 px off: beyond it
    e = appearance_error(f0, f1, q, p, radius=3, search=4)
    assert e.shape == (6,) and e.dtype == torch.float32
    assert (e[[0, 1, 2]] < 0.05).all(), e                                 # visible: exact match (np.roll)
    assert (e[[3, 4, 5]] > 0.3).all(), e                                  # hidden by the square, or lost
    edge = appearance_error(f0, f1, torch.tensor([[57.5, 20.5]]), torch.tensor([[62.5, 17.5]]), radius=3, search=0)
    assert edge.item() < 1e-6                                             # columns past x=63 are left out, not 0
    assert torch.equal(appearance_error(f0, f1, q, p, 3, 4), e)           # deterministic
    with pytest.raises(ValueError, match="differ"):
        appearance_error(f0, f1, q, p[:2])


def test_app_threshold_in_kl_trace_and_rgb_trace():
    model = TinyRandomTracer()
    f0, f1 = texture(48, 40, 1), texture(48, 40, 2)
    q = torch.tensor([[3.0, 4.0], [20.5, 30.2], [39.0, 47.0], [10.0, 10.0]])
    base = KLTraceConfig(num_masks=1, zoom_levels=1, occ_threshold=0.0)
    for fn in (kl_trace, rgb_trace):
        plain = fn(model, f0, f1, q, base)
        assert plain.app_error is None
        on = fn(model, f0, f1, q, dataclasses.replace(base, app_threshold=0.5, fb_threshold=1e6))
        assert torch.equal(on.targets, plain.targets)                    # the estimate is kept
        want = appearance_error(f0, f1, q, plain.targets, base.app_radius, base.app_search, base.app_floor)
        assert torch.equal(on.app_error, want) and on.fb_error is not None
        assert torch.equal(on.visible, plain.visible & (on.fb_error <= 1e6) & (want <= 0.5))
        for none in (None, 0.0, float("inf")):
            assert fn(model, f0, f1, q, dataclasses.replace(base, app_threshold=none)).app_error is None
    for bad in (-1.0, "near"):
        with pytest.raises(ValueError, match="app_threshold"):
            KLTraceConfig(app_threshold=bad)
    with pytest.raises(ValueError, match="app_radius"):
        KLTraceConfig(app_search=-1)


# ---------------------------------------------------------------------------------------------- crops

def test_group_crops_properties():
    rng = np.random.default_rng(9)
    H, W, side, margin = 100, 140, 40, 6.0
    p0 = torch.tensor(rng.uniform(0, [W, H], (150, 2)))
    p1 = p0 + torch.tensor(rng.normal(0, 3, (150, 2)))
    p1 = p1.clamp(torch.zeros(2), torch.tensor([W - 1e-3, H - 1e-3]))
    pairs = group_crops(p0, p1, side, (H, W), margin)
    again = group_crops(p0, p1, side, (H, W), margin)
    assert [(a.box0, a.box1, a.members.tolist()) for a in pairs] == \
        [(b.box0, b.box1, b.members.tolist()) for b in again]                     # deterministic
    seen = torch.cat([p.members for p in pairs]).sort().values
    assert torch.equal(seen, torch.arange(150))                                    # each query exactly once
    assert len(pairs) < 60
    for pair in pairs:
        for box, pts in ((pair.box0, p0[pair.members]), (pair.box1, p1[pair.members])):
            L, T, w, h = box
            assert (w, h) == (side, side) and 0 <= L <= W - side and 0 <= T <= H - side
            for (x, y) in pts.tolist():
                for v, lo, lim in ((x, L, W), (y, T, H)):
                    if margin <= v <= lim - margin:            # not at the image edge: margin kept (+-0.5 px)
                        assert lo + margin - 0.5 <= v <= lo + side - margin + 0.5
                    else:
                        assert lo <= v <= lo + side
    # singletons equal per-query crops; with margin = side / 2 nothing can share unless identical
    single = group_crops(p0[:1], p1[:1], side, (H, W), margin)
    pq = per_query_crops(p0[:1], p1[:1], side, (H, W))
    assert (single[0].box0, single[0].box1) == (pq[0].box0, pq[0].box1)
    assert len(per_query_crops(p0, p1, side, (H, W))) == 150
    with pytest.raises(ValueError, match="does not fit"):
        group_crops(p0, p1, 101, (H, W), margin)


def test_view_round_trip():
    v = View.of_box((10, 20, 48, 48), (64, 64))
    xy = torch.tensor([[0.0, 0.0], [64.0, 64.0], [12.5, 40.25]])
    assert torch.allclose(v.to_model(v.to_orig(xy)), xy.double())
    assert v.to_orig(torch.tensor([[64.0, 64.0]])).tolist() == [[58.0, 68.0]]


# ---------------------------------------------------------------------------------------------- tiny random model

class TinyRandomTracer:
    """A randomly initialised small conv net: per-cell first-code logits from both frames, and a decoded frame."""

    def __init__(self, seed=0, size=32, cell=8, K=32):
        self.image_size, self.cell, self.K = (size, size), cell, K
        g = torch.Generator().manual_seed(seed)
        self.c1 = nn.Conv2d(6, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, K, cell, stride=cell)
        self.dec = nn.Conv2d(6, 3, 5, padding=2)
        with torch.no_grad():
            for p in [*self.c1.parameters(), *self.c2.parameters(), *self.dec.parameters()]:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def _x(self, frame0, frame1):
        f1 = frame1.expand(frame0.shape[0], -1, -1, -1)
        return torch.cat([frame0, f1], 1) / 255.0

    @torch.no_grad()
    def first_code_logprobs(self, frame0, frame1, reveal, seed, last0=None):
        h = self.c2(torch.relu(self.c1(self._x(frame0, frame1))))                  # [B, K, gh, gw]
        return F.log_softmax(h.flatten(2).transpose(1, 2), -1)                       # [B, P, K]

    @torch.no_grad()
    def predict_frame1(self, frame0, frame1, reveal, seed):
        return torch.sigmoid(self.dec(self._x(frame0, frame1))) * 255.0


def test_tiny_random_model_outputs_finite_and_shaped():
    model = TinyRandomTracer()
    assert isinstance(model, TracerModel)
    f0, f1 = texture(48, 40, 1), texture(48, 40, 2)
    q = torch.tensor([[3.0, 4.0], [20.5, 30.2], [39.0, 47.0], [10.0, 10.0], [35.0, 5.0]])
    cfg = KLTraceConfig(num_masks=2, zoom_levels=2)
    res = kl_trace(model, f0, f1, q, cfg, return_maps=True)
    assert res.targets.shape == (5, 2) and res.targets.dtype == torch.float32
    assert res.visible.shape == (5,) and res.visible.dtype == torch.bool
    assert res.score.shape == (5,) and res.levels.shape == (3, 5, 2)
    for t in (res.targets, res.score, res.levels):
        assert torch.isfinite(t).all()
    assert (res.targets[:, 0] >= 0).all() and (res.targets[:, 0] <= 40).all()
    assert (res.targets[:, 1] >= 0).all() and (res.targets[:, 1] <= 48).all()
    assert len(res.maps) == 3
    for m in res.maps:
        assert m["kl"].shape == (5, 4, 4) and m["box0"].shape == (5, 4) and m["box1"].shape == (5, 4)
        assert torch.isfinite(m["kl"]).all() and (m["kl"] >= -1e-5).all()
    assert res.maps[0]["box0"][0].tolist() == [0, 0, 40, 48]
    assert res.maps[1]["box0"][0, 2:].tolist() == [40, 40]
    rgb = rgb_trace(model, f0, f1, q, cfg, return_maps=True)
    assert rgb.targets.shape == (5, 2) and torch.isfinite(rgb.targets).all() and torch.isfinite(rgb.score).all()
    assert rgb.maps[0]["kl"].shape == (5, 32, 32)
    # no queries
    empty = kl_trace(model, f0, f1, torch.zeros(0, 2), cfg)
    assert empty.targets.shape == (0, 2) and empty.visible.shape == (0,)
    # deterministic
    again = kl_trace(model, f0, f1, q, cfg)
    assert torch.equal(again.targets, res.targets) and torch.equal(again.score, res.score)


# ---------------------------------------------------------------------------------------------- config

def test_default_yaml_equals_dataclass_and_fast_yaml_loads():
    d = yaml.safe_load((ROOT / "configs/teacher/kltrace_default.yaml").read_text())
    assert d["tracer"] == KLTraceConfig().to_dict()
    assert KLTraceConfig.from_dict(d["tracer"]) == KLTraceConfig()
    fast = KLTraceConfig.from_dict(yaml.safe_load((ROOT / "configs/teacher/kltrace_fast.yaml").read_text())["tracer"])
    assert fast.num_masks < 5 and fast.zoom_levels < 4 and fast.sigma == 2.0
    c = KLTraceConfig()
    assert (c.mask_ratio, c.num_masks, c.sigma, c.occ_threshold, c.zoom_levels, c.zoom_keep, c.seed) == \
        (0.9, 5, 2.0, 0.4, 4, 0.75, 1110)
    with pytest.raises(ValueError, match="unknown tracer config key"):
        KLTraceConfig.from_dict({"sigmaa": 2.0})
    with pytest.raises(ValueError, match="occ_level"):
        KLTraceConfig(occ_level="last")
