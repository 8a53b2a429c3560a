"""Do a teacher's KL-tracing tracks follow the visible motion of the real clips? Agreement with OpenCV DIS flow.

  python bench/teacher_real.py [--teacher teacher/weights/tiny] [--threads 1]

No real clip has ground-truth tracks, so the reference is OpenCV DIS (medium preset, ``pipeline.flowsources``) on
the full-resolution frames: a classical tracker that is usually right on textured real footage and wrong in flat
regions. For each clip of ``flowdistill clips`` one frame pair, fixed here before any teacher was run on it (gap
3 frames, inside one shot), and the same 6 × 4 grid of query points the README pictures use. Distances are
measured after scaling both axes to 256 px (as TAP-Vid does). Per source (the teacher's KL-tracing with its
bundle's tracer settings, and zero flow):

 agree@4     share of queries whose target is within 4 px (at 256) of DIS's
 moving      the same over the queries DIS moves by more than 4 px (zero flow agrees with none of them by design)
 med         median distance to DIS's target (px at 256)
 visible     (teacher) agree@4 over the queries the teacher calls visible — what a label set keeps — and how many

Figures are written to bench/NOTES.md; the last lines are ``RESULT`` lines.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from notes import machine_line, report  # bench/notes.py

ROOT = Path(__file__).resolve().parents[1]

# (clip, frame0, frame1): gap 3 inside a shot (bikes has cuts at 30, 76, ...); chosen before measuring
PAIRS = [("realshort", 10, 13), ("bikes", 40, 43), ("cockatoo", 100, 103), ("carphone_pristine", 60, 63)]
GRID = (6, 4)          # columns x rows of queries, cell centres


def grid_points(width: int, height: int, cols: int = GRID[0], rows: int = GRID[1]) -> np.ndarray:
    xs = (np.arange(cols) + 0.5) * width / cols
    ys = (np.arange(rows) + 0.5) * height / rows
    return np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2).astype(np.float32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default=str(ROOT / "teacher" / "weights" / "tiny"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache-dir", default=None, help="clip cache (default: $FLOWDISTILL_CACHE or ~/.cache/flowdistill)")
    ap.add_argument("--notes", default=str(ROOT / "bench" / "NOTES.md"))
    args = ap.parse_args(argv)

    import torch

    from pipeline.clips import fetch_clips
    from pipeline.decode import open_video
    from pipeline.flowsources import make_flow_source

    torch.set_num_threads(args.threads)
    machine = machine_line(args.threads)
    clips = fetch_clips(args.cache_dir, names=[p[0] for p in PAIRS])      # verified; fetched once if missing
    dis = make_flow_source("dis", {"preset": "medium", "threads": args.threads})
    zero = make_flow_source("zero", {})
    kl = make_flow_source("kltrace", {"teacher": args.teacher, "threads": args.threads})
    shown = Path(args.teacher).resolve()
    shown = shown.relative_to(ROOT) if ROOT in shown.parents else shown
    rows, per = [], {"kltrace": [], "zero": []}
    vis_all = []
    moving_all = []
    t_start = time.perf_counter()
    for name, t0, t1 in PAIRS:
        with open_video(clips[name]) as reader:
            f0, f1 = (np.ascontiguousarray(f) for f in reader.read([t0, t1]))
        h, w = f0.shape[:2]
        scale = np.array([256.0 / w, 256.0 / h])
        q = grid_points(w, h)
        ref, _ = dis.track(f0, f1, q)
        moving = np.linalg.norm((ref - q) * scale, axis=1) > 4.0
        moving_all.append(moving)
        line = [f"{name} {t0},{t1} ({w}x{h}): DIS moves {int(moving.sum())} of {len(q)} queries by > 4 px"]
        for src_name, src in (("kltrace", kl), ("zero", zero)):
            tic = time.perf_counter()
            tgt, vis = src.track(f0, f1, q)
            d = np.linalg.norm((np.asarray(tgt, np.float64) - ref) * scale, axis=1)
            per[src_name].append(d)
            mv = f"{np.mean(d[moving] < 4):.2f}" if moving.any() else "-"
            extra = ""
            if src_name == "kltrace":
                vis = np.asarray(vis, bool)
                vis_all.append(vis)
                extra = (f", visible {np.mean(d[vis] < 4):.2f} of {int(vis.sum())} called visible"
                         if vis.any() else ", none called visible")
            line.append(f"{src_name} agree@4 {np.mean(d < 4):.2f}, moving {mv}, med {np.median(d):.2f} px{extra} "
                        f"({time.perf_counter() - tic:.0f} s)")
        rows.append("; ".join(line))
        print(rows[-1], flush=True)
    mv = np.concatenate(moving_all)
    summary = {}
    for src_name, ds in per.items():
        d = np.concatenate(ds)
        summary[src_name] = (float(np.mean(d < 4)), float(np.mean(d[mv] < 4)) if mv.any() else float("nan"),
                             float(np.median(d)))
    vis = np.concatenate(vis_all)
    d_kl = np.concatenate(per["kltrace"])
    agree_vis = float(np.mean(d_kl[vis] < 4)) if vis.any() else float("nan")
    agree_vis_mv = float(np.mean(d_kl[vis & mv] < 4)) if (vis & mv).any() else float("nan")
    secs = time.perf_counter() - t_start
    lines = [
        "## bench/teacher_real.py — KL-tracing tracks vs OpenCV DIS on the real clips",
        "",
        f"- machine: {machine}; {secs:.0f} s",
        f"- teacher: {shown} (its bundle's tracer settings); reference: DIS medium at full resolution; "
        f"{GRID[0]}x{GRID[1]} grid per clip; distances at 256 px",
        *[f"- {r}" for r in rows],
        f"- all clips ({len(mv)} queries, {int(mv.sum())} moving): " + "; ".join(
            f"{k} agree@4 {v[0]:.2f}, moving {v[1]:.2f}, med {v[2]:.2f} px" for k, v in summary.items()),
        f"- kltrace, queries called visible ({int(vis.sum())} of {len(vis)}; moving {int((vis & mv).sum())} of "
        f"{int(mv.sum())}): agree@4 {agree_vis:.2f}, moving {agree_vis_mv:.2f}",
        "",
        f"RESULT teacher_real_agree4_kltrace {summary['kltrace'][0]:.4f}",
        f"RESULT teacher_real_agree4_zero {summary['zero'][0]:.4f}",
        f"RESULT teacher_real_agree4_moving_kltrace {summary['kltrace'][1]:.4f}",
        f"RESULT teacher_real_agree4_moving_zero {summary['zero'][1]:.4f}",
        f"RESULT teacher_real_agree4_visible_kltrace {agree_vis:.4f}",
        f"RESULT teacher_real_agree4_visible_moving_kltrace {agree_vis_mv:.4f}",
    ]
    report(lines, args.notes, "teacher_real")
    return 0


if __name__ == "__main__":
    sys.exit(main())
