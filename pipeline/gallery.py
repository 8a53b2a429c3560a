"""A teacher's progress in pictures: ``flowdistill eval --gallery DIR`` (teacher sources ``kltrace`` / ``rgbdiff``).

For the first ``num_pairs`` videos of the evaluation set, pair (frame 0, frame ``gap``):

- ``pred_<video>.png``: frame 0 | true frame 1 | the model's greedy prediction of frame 1 (one reveal mask, the
  tracer's first mask seed) | the revealed patches, all at the model's resolution. A model that tracks moves
  content to where it went; the "copy in place, blurred" failure shows as a blurred frame 0.
- ``kl_<video>.png``: for ``num_points`` ground-truth points visible in both frames, the mask-averaged KL map of
  the full-frame level and of the finest zoom level over frame 1 (inferno), with the true target (green circle)
  and the traced target (red cross); the caption gives the error in px and the peak KL.

Pictures only; metrics come from ``pipeline.evaluate``. Written atomically (``viz.save_png``).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .viz import caption, heatmap_overlay, save_png


def _resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    return cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_AREA)


def _mark(img: np.ndarray, xy, color, kind: str, scale: float) -> None:
    import cv2

    p = (int(round(float(xy[0]) * scale)), int(round(float(xy[1]) * scale)))
    if kind == "circle":
        cv2.circle(img, p, 5, color, 1, cv2.LINE_AA)
    else:
        cv2.drawMarker(img, p, color, cv2.MARKER_CROSS, 9, 1, cv2.LINE_AA)


def prediction_panel(model, frame0: np.ndarray, frame1: np.ndarray, mask_ratio: float, seed: int,
                     scale: int = 3) -> np.ndarray:
    """[frame 0 | true frame 1 | predicted frame 1 | reveal mask] at the model's size, upscaled ``scale``x."""
    import torch

    from teacher.kltrace import sample_reveal

    h, w = (int(v) for v in model.image_size)
    f0, f1 = _resize(frame0, (h, w)), _resize(frame1, (h, w))
    t0 = torch.from_numpy(f0).permute(2, 0, 1)[None].float()
    t1 = torch.from_numpy(f1).permute(2, 0, 1)[None].float()
    P = int(model.num_patches)
    reveal = sample_reveal(P, mask_ratio, seed)
    with torch.no_grad():
        pred = model.predict_frame1(t0, t1, reveal, seed)
    pred = pred[0].permute(1, 2, 0).float().clamp(0, 255).round().byte().cpu().numpy()
    cell = int(model.cell)
    g = reveal.reshape(h // cell, w // cell).numpy().astype(np.uint8) * 255
    mask = np.repeat(np.repeat(g, cell, 0), cell, 1)
    mask = np.stack([mask] * 3, -1)
    mask = (0.5 * mask + 0.5 * f1).astype(np.uint8)
    tiles = []
    for img, text in ((f0, "frame 0"), (f1, "true frame 1"), (pred, "predicted frame 1"), (mask, "revealed")):
        big = np.repeat(np.repeat(img, scale, 0), scale, 1)
        tiles.append(caption(big, text))
    return np.concatenate(tiles, 1)


def kl_panel(source, frame0: np.ndarray, frame1: np.ndarray, p0: np.ndarray, p1: np.ndarray,
             scale: int = 2) -> np.ndarray:
    """Rows of [full-frame KL map | finest-level KL map] over frame 1 for queries p0 with true targets p1."""
    import torch

    from teacher.kltrace import kl_trace, kl_maps_naive

    fn = source.engine if getattr(source, "engine", None) is not None else kl_maps_naive
    res = kl_trace(source.tracer, frame0, frame1, torch.from_numpy(p0.astype(np.float64)), source.tracer_cfg,
                   kl_maps_fn=fn, return_maps=True)
    H, W = frame1.shape[:2]
    rows = []
    for i in range(len(p0)):
        tiles = []
        for lv in (res.maps[0], res.maps[-1]):
            left, top, bw, bh = (float(v) for v in lv["box1"][i])
            heat = lv["kl"][i].float().numpy()
            x0, y0 = int(max(0, round(left))), int(max(0, round(top)))
            x1, y1 = int(min(W, round(left + bw))), int(min(H, round(top + bh)))
            crop = frame1[y0:y1, x0:x1]
            if crop.size == 0:
                crop, x0, y0 = frame1, 0, 0
            s = 256.0 / max(crop.shape[:2])
            img = _resize(crop, (max(1, int(round(crop.shape[0] * s))), max(1, int(round(crop.shape[1] * s)))))
            img = heatmap_overlay(img, heat, alpha=0.6)
            _mark(img, (p1[i][0] - x0, p1[i][1] - y0), (0, 255, 0), "circle", s)
            tgt = res.targets[i].numpy()
            _mark(img, (tgt[0] - x0, tgt[1] - y0), (255, 0, 0), "cross", s)
            err = float(np.hypot(*(tgt - p1[i])))
            tiles.append(caption(img, f"level {lv['level']}: err {err:.1f} px, peak {float(res.score[i]):.2f}"))
        hmax = max(t.shape[0] for t in tiles)
        tiles = [np.pad(t, ((0, hmax - t.shape[0]), (0, 0), (0, 0))) for t in tiles]
        rows.append(np.concatenate(tiles, 1))
    wmax = max(r.shape[1] for r in rows)
    return np.concatenate([np.pad(r, ((0, 0), (0, wmax - r.shape[1]), (0, 0))) for r in rows], 0)


def write_gallery(source, dataset, out_dir: str | os.PathLike, num_pairs: int = 3, num_points: int = 3,
                  gap: int = 1, seed: int = 0) -> list[Path]:
    """Write the pictures described in the module docstring; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    model, cfg = source.tracer, source.tracer_cfg
    written = []
    for item in list(dataset)[: int(num_pairs)]:
        name = str(item.get("name", "video"))
        video = np.asarray(item["video"])
        t = min(int(gap), video.shape[0] - 1)
        if t < 1:
            continue
        f0, f1 = video[0], video[t]
        panel = prediction_panel(model, f0, f1, cfg.mask_ratio, cfg.seed)
        p = out / f"pred_{name}.png"
        save_png(p, panel)
        written.append(p)
        H, W = video.shape[1:3]
        pts = np.asarray(item["points"], dtype=np.float64) * np.array([W, H])     # TAP-Vid: normalised (x, y)
        occ = np.asarray(item["occluded"], bool)
        ok = np.flatnonzero(~occ[:, 0] & ~occ[:, t])
        if ok.size == 0 or cfg.method != "kl":
            continue
        sel = rng.choice(ok, size=min(int(num_points), ok.size), replace=False)
        panel = kl_panel(source, f0, f1, pts[sel, 0].astype(np.float32), pts[sel, t].astype(np.float32))
        p = out / f"kl_{name}.png"
        save_png(p, panel)
        written.append(p)
    return written
