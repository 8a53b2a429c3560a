"""Calibrate a teacher's occlusion threshold (KL peak below it = occluded) on a *training-distribution* synthetic set
(configs/synth/val_teacher.yaml: training textures, its own seed, half the points occluded somewhere) — never on
the held-out evaluation sets — and report how separable occlusion is.

  python bench/occ_threshold.py --teacher teacher/weights/tiny [--num-masks 2 --zoom-levels 3] [--write]

Tracer settings not given here are the bundle's (teacher.json "tracer" over the KLTraceConfig defaults: 5 masks, 4
zoom levels), i.e. the settings the threshold will be used with.

Pairs (frame 0, frame t), t = 1 .. num_frames - 1, queries = ground-truth points visible in frame 0. For every
candidate threshold (the midpoints between sorted peak scores) the occlusion accuracy is computed; the best one is
printed (put it in the bundle's tracer settings or pass ``--set sources.kltrace.tracer.occ_threshold=...``), with
the accuracy of "always visible" and the AUC of the peak score for visible vs occluded.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from notes import machine_line, report  # bench/notes.py

ROOT = Path(__file__).resolve().parents[1]


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a random visible point > score of a random occluded one) (ties count half)."""
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    s = np.concatenate([pos, neg])
    ranks = np.argsort(np.argsort(s, kind="stable"), kind="stable").astype(np.float64) + 1
    for v in np.unique(s):                          # average ranks of ties
        m = s == v
        ranks[m] = ranks[m].mean()
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default=str(ROOT / "teacher" / "weights" / "tiny"))
    ap.add_argument("--num-masks", type=int, default=None, help="default: the bundle's tracer setting")
    ap.add_argument("--zoom-levels", type=int, default=None, help="default: the bundle's tracer setting")
    ap.add_argument("--sigma", type=float, default=None, help="bump sigma, model px (default: the tracer's)")
    ap.add_argument("--data-config", default=str(ROOT / "configs" / "synth" / "val_teacher.yaml"),
                    help="synthetic set config (default: the validation set, training textures, seed 500)")
    ap.add_argument("--videos", type=int, default=None, help="override num_videos")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write", action="store_true",
                    help="store the calibrated threshold in the bundle's teacher.json (teacher.checkpoints."
                         "set_bundle_tracer; the weights and teacher_id are unchanged)")
    ap.add_argument("--notes", default=str(ROOT / "bench" / "NOTES.md"))
    args = ap.parse_args(argv)

    from pipeline import synthetic
    from pipeline.config import load_config
    from pipeline.flowsources import make_flow_source

    machine = machine_line(args.threads)
    t_start = time.perf_counter()
    given = {"num_masks": args.num_masks, "zoom_levels": args.zoom_levels, "sigma": args.sigma}
    tracer = {k: v for k, v in given.items() if v is not None}
    src = make_flow_source("kltrace", {"teacher": args.teacher, "threads": args.threads, "tracer": tracer})
    cfg = synthetic.resolve_config(load_config(Path(args.data_config), [], synthetic.DEFAULTS))
    if args.videos is not None:
        cfg["num_videos"] = args.videos
    with tempfile.TemporaryDirectory(prefix="fd_occ_") as tmp:
        synthetic.write_set(Path(tmp) / "set", cfg)
        items = synthetic.load_set(Path(tmp) / "set")
    scores, occluded = [], []
    for it in items:
        video, pts, occ = it["video"], np.asarray(it["points"]), np.asarray(it["occluded"], bool)
        H, W = video.shape[1:3]
        sel = np.flatnonzero(~occ[:, 0])
        p0 = (pts[sel, 0] * np.array([W, H])).astype(np.float32)
        for t in range(1, video.shape[0]):
            src.track(video[0], video[t], p0)
            scores.append(src.last_result.score.numpy().astype(np.float64))
            occluded.append(occ[sel, t])
    s, o = np.concatenate(scores), np.concatenate(occluded)
    cand = np.unique(np.concatenate([[-np.inf], (np.sort(s)[1:] + np.sort(s)[:-1]) / 2]))
    acc = np.array([np.mean((s < c) == o) for c in cand])
    best = int(np.argmax(acc))
    thr = float(cand[best]) if np.isfinite(cand[best]) else 0.0
    always = float(np.mean(~o))
    a = auc(s[~o], s[o])
    secs = time.perf_counter() - t_start
    written: list[str] = []
    if args.write:
        from teacher.checkpoints import set_bundle_tracer

        record = {"command": "python bench/occ_threshold.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "tracer": {"num_masks": src.tracer_cfg.num_masks, "zoom_levels": src.tracer_cfg.zoom_levels,
                             "sigma": src.tracer_cfg.sigma},
                  "data": Path(args.data_config).name, "queries": int(len(s)), "occluded": int(o.sum()),
                  "occ_accuracy": round(float(acc[best]), 4), "always_visible": round(always, 4), "auc": round(a, 4)}
        set_bundle_tracer(args.teacher, {"occ_threshold": round(thr, 4)}, record)
        written.append(f"- written to {args.teacher}/teacher.json: tracer.occ_threshold = {round(thr, 4)}")
    lines = [
        "## bench/occ_threshold.py — occlusion threshold of a teacher, calibrated on training-distribution videos",
        "",
        f"- machine: {machine}; {secs:.0f} s",
        f"- teacher: {args.teacher}; tracer {src.tracer_cfg.num_masks} masks, {src.tracer_cfg.zoom_levels} zoom levels, "
        f"sigma {src.tracer_cfg.sigma}",
        f"- data: {Path(args.data_config).name} ({'+'.join(cfg['texture']['families'])} textures, seed {cfg['seed']}, "
        f"{cfg['num_videos']} videos x {cfg['num_frames']} frames x {cfg['points']['per_video']} points, "
        f"occluded_fraction {cfg['points']['occluded_fraction']}); pairs (0, t); {len(s)} queries, "
        f"{int(o.sum())} occluded",
        f"- peak KL: visible median {np.median(s[~o]):.3g}, occluded median "
        f"{(np.median(s[o]) if o.any() else float('nan')):.3g}; AUC {a:.3f}",
        f"- best threshold {thr:.4g}: occlusion accuracy {100 * acc[best]:.1f} % (always visible {100 * always:.1f} %)",
        *written,
        "",
        f"RESULT occ_threshold {thr:.6g}",
        f"RESULT occ_accuracy {acc[best]:.4f}",
        f"RESULT occ_accuracy_always_visible {always:.4f}",
        f"RESULT occ_auc {a:.4f}",
    ]
    report(lines, args.notes, "occ_threshold")
    return 0


if __name__ == "__main__":
    sys.exit(main())
