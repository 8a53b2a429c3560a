"""Forward-backward filter: precision / recall of "visible" labels against exact ground truth, with and without
the round-trip check (``pipeline.label.forward_backward``, the function the labeler applies).

  python bench/label_fb.py                      default run (a few minutes on 2 shared CPU cores)
  python bench/label_fb.py --teacher DIR        another teacher bundle for the "kltrace" source
  python bench/label_fb.py --quick              smoke run (numbers not written to NOTES.md unless --notes)

Data: procedural videos (``pipeline.synthetic.write_set``) with more occlusion than the default set (more and
larger sprites, faster motion, more edge crossings); exact frames and tracks from the npz files. Pairs:
(frame 0, frame k) for each gap k in --gaps; queries: every ground-truth point visible in frame 0, at its exact
position. Sources:

 dis      OpenCV DIS (``pipeline.flowsources``), an informative classical tracker; it calls every point visible,
          so "without" = all points kept.
 kltrace  the teacher (``pipeline.label.Tracker``, as the labeler runs it) with a bundle: --teacher, default
          teacher/weights/tiny when it exists, else the random micro teacher (teacher.checkpoints.write_micro_teacher) (its numbers say
          nothing about tracking quality; the script prints which one ran). A strided subset of the queries
          (--kl-points per video and gap) keeps its run time down.

For each source the forward call gives (targets, visible); ``forward_backward`` traces the targets back and
returns the round-trip error, from which the filtered labels at each threshold in --thresholds are
visible & (err <= threshold) (checked against a direct call at one threshold). Scores per filter, over all pairs:

 kept               fraction of queries labelled visible
 prec_vis           P(ground truth visible | labelled visible)
 prec@d             P(ground truth visible and |target - truth| < d px | labelled visible)   (a correct label)
 recall@d           P(labelled visible | ground truth visible and the source's target within d px)
                    -- the share of the source's correct labels the filter keeps (without a filter: 1 for dis)
 vis_recall         P(labelled visible | ground truth visible)
 epe_med            median |target - truth| over kept points that are visible in truth
"""
from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
from notes import machine_line, write_notes  # bench/notes.py

ROOT = Path(__file__).resolve().parents[1]

RESULTS: list[tuple[str, float]] = []

SYNTH = {                                 # more occlusion than configs/synth/default.yaml
    "num_sprites": [8, 14],
    "sprite_size": [0.12, 0.28],
    "motion": {"max_speed": 6.0, "cross_edge_prob": 0.8},
    "camera": {"pan": 3.0},
}


def result(name, value):
    RESULTS.append((name, float(value)))


class DenseTrack:
    """A flow source as the labeler's ``track(f0, f1, points) -> (targets, visible, score)``."""

    def __init__(self, source):
        self.source = source
        self.seconds = 0.0

    def track(self, f0, f1, points):
        t = time.perf_counter()
        targets, visible = self.source.track(f0, f1, points)
        self.seconds += time.perf_counter() - t
        return targets.astype(np.float32), visible.astype(bool), np.zeros(len(points), np.float32)


def collect(track, items, gaps, thresholds, max_points):
    """Per pair: forward targets/visible, round-trip error, ground truth. Returns a dict of concatenated arrays."""
    from pipeline.label import forward_backward

    rows = {"vis": [], "err": [], "epe": [], "gt_vis": [], "gap": []}
    checked = False
    for it in items:
        video, pts, occ = it["video"], it["points"], it["occluded"]
        h, w = video.shape[1:3]
        px = pts.astype(np.float64) * np.array([w, h])
        q_idx = np.flatnonzero(~occ[:, 0])
        if max_points and len(q_idx) > max_points:
            q_idx = q_idx[np.linspace(0, len(q_idx) - 1, max_points).round().astype(int)]
        p0 = px[q_idx, 0].astype(np.float32)
        for k in gaps:
            if k >= video.shape[0]:
                continue
            f0, f1 = video[0], video[k]
            p1, vis, _ = track(f0, f1, p0)
            vis_fb, err = forward_backward(track, f0, f1, p0, p1, vis, max(thresholds))
            if not checked:              # the per-threshold labels derived below equal a direct call
                vis_direct, _ = forward_backward(track, f0, f1, p0, p1, vis, min(thresholds))
                assert np.array_equal(vis_direct, vis & (err <= min(thresholds))), "forward_backward not deterministic"
                checked = True
            assert np.array_equal(vis_fb, vis & (err <= max(thresholds)))
            rows["vis"].append(vis)
            rows["err"].append(err)
            rows["epe"].append(np.linalg.norm(p1 - px[q_idx, k], axis=1))
            rows["gt_vis"].append(~occ[q_idx, k])
            rows["gap"].append(np.full(len(q_idx), k))
    return {k: np.concatenate(v) for k, v in rows.items()}


def _ratio(a, b) -> float:
    return float(a) / float(b) if b else float("nan")


def scores(d, keep, deltas):
    """The module docstring's scores (NaN where the denominator is empty)."""
    gt = d["gt_vis"]
    n_keep = int(keep.sum())
    out = {"kept": keep.mean(), "n_kept": n_keep,
           "prec_vis": _ratio((keep & gt).sum(), n_keep),
           "vis_recall": _ratio((keep & gt).sum(), gt.sum())}
    for dl in deltas:
        good = gt & (d["epe"] < dl)
        out[f"prec@{dl:g}"] = _ratio((keep & good).sum(), n_keep)
        out[f"recall@{dl:g}"] = _ratio((keep & good).sum(), good.sum())
    kv = keep & gt
    out["epe_med"] = float(np.median(d["epe"][kv])) if kv.any() else float("nan")
    return out


def pct(x: float) -> str:
    return f"{100 * x:5.1f}%" if np.isfinite(x) else "    -"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=None,
                    help="teacher bundle for kltrace (default: teacher/weights/tiny if present, "
                         "else the micro teacher)")
    ap.add_argument("--videos", type=int, default=6)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--points", type=int, default=160, help="ground-truth points per video (synth points.per_video)")
    ap.add_argument("--gaps", default="2,6,12", help="frame gaps k: pairs (0, k)")
    ap.add_argument("--thresholds", default="1,2,4", help="forward-backward thresholds (px)")
    ap.add_argument("--deltas", default="2,4", help="a label is correct when within this many px of the truth")
    ap.add_argument("--kl-points", type=int, default=None,
                    help="kltrace: at most this many queries per (video, gap) (default 8 micro / 12 real teacher)")
    ap.add_argument("--sources", default="dis,kltrace")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 videos, gaps 2,6, 4 kltrace queries")
    ap.add_argument("--scratch", default=None, help="work dir (default: a fresh /tmp/fd_bench_label_fb_*, removed)")
    ap.add_argument("--notes", default=None, help="NOTES.md to update (default: bench/NOTES.md unless --quick)")
    args = ap.parse_args(argv)
    argv_used = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.videos, args.gaps, args.kl_points = 2, "2,6", 4
    gaps = [int(x) for x in args.gaps.split(",")]
    thresholds = [float(x) for x in args.thresholds.split(",")]
    deltas = [float(x) for x in args.deltas.split(",")]
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]

    import torch

    from pipeline import label, synthetic
    from pipeline.flowsources import make_flow_source

    torch.set_num_threads(args.threads)
    machine = machine_line(args.threads)
    t_start = time.perf_counter()
    own = args.scratch is None
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="fd_bench_label_fb_", dir="/tmp"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        if args.teacher is not None:
            teacher, teacher_name = Path(args.teacher), f"bundle {args.teacher}"
            micro = False
        elif (ROOT / "teacher" / "weights" / "tiny" / "teacher.json").is_file():
            teacher, teacher_name, micro = ROOT / "teacher" / "weights" / "tiny", "teacher/weights/tiny", False
        else:
            from teacher.checkpoints import write_micro_teacher

            teacher = write_micro_teacher(scratch / "micro_teacher")
            teacher_name = "RANDOM micro teacher (write_micro_teacher; teacher/weights/tiny absent) -- kltrace numbers meaningless"
            micro = True
        kl_points = args.kl_points if args.kl_points is not None else (8 if micro else 12)
        data = scratch / "synth"
        cfg = copy.deepcopy(SYNTH)
        cfg.update(num_videos=args.videos, num_frames=max(gaps) + 1, size=[args.size, args.size],
                   name_prefix="fb", seed=11, points={"per_video": args.points})
        t = time.perf_counter()
        synthetic.write_set(data, cfg)
        items = synthetic.load_set(data)
        synth_s = time.perf_counter() - t
        print(f"kltrace teacher: {teacher_name}", flush=True)

        tab_rows, per_source = [], {}
        for name in sources:
            if name == "dis":
                tr = DenseTrack(make_flow_source("dis", {"threads": 1}))
                track, maxp = tr.track, None
            elif name == "kltrace":
                lcfg = copy.deepcopy(label.DEFAULTS)
                lcfg.update(teacher=str(teacher), threads=args.threads, sources=["unused"])
                tr = label.Tracker(label.check_config(lcfg))
                track, maxp = tr.track, kl_points
            else:
                tr = DenseTrack(make_flow_source(name, {}))
                track, maxp = tr.track, None
            t = time.perf_counter()
            d = collect(track, items, gaps, thresholds, maxp)
            secs = time.perf_counter() - t
            n = len(d["vis"])
            occ_frac = 1 - d["gt_vis"].mean()
            print(f"{name}: {n} queries over {len(items)} videos x gaps {gaps}; {100 * occ_frac:.1f}% occluded in "
                  f"truth at frame k; {secs:.0f} s", flush=True)
            filters = [("without", d["vis"])] + [(f"fb {thr:g}px", d["vis"] & (d["err"] <= thr)) for thr in thresholds]
            per_source[name] = {"n": n, "occluded": occ_frac, "seconds": secs, "scores": {}}
            for fname, keep in filters:
                s = scores(d, keep, deltas)
                per_source[name]["scores"][fname] = s
                tab_rows.append((name, fname, n, s))
                key = "without" if fname == "without" else f"with_{fname.split()[1]}"
                result(f"label_fb_{name}_precision_visible_{key}", s["prec_vis"])
                for dl in deltas:
                    result(f"label_fb_{name}_precision_at{dl:g}px_{key}", s[f"prec@{dl:g}"])
                    result(f"label_fb_{name}_recall_at{dl:g}px_{key}", s[f"recall@{dl:g}"])
                result(f"label_fb_{name}_kept_{key}", s["kept"])
            # per gap, for the first threshold that is >= 2 px (the labeler's default is 2 px)
            thr = next((x for x in thresholds if x >= 2), thresholds[-1])
            per_gap = []
            for k in gaps:
                m = d["gap"] == k
                sub = {kk: v[m] for kk, v in d.items()}
                a, b = scores(sub, sub["vis"], deltas), scores(sub, sub["vis"] & (sub["err"] <= thr), deltas)
                per_gap.append((k, int(m.sum()), 1 - sub["gt_vis"].mean(), a, b))
            per_source[name]["per_gap"] = (thr, per_gap)

        dl0 = deltas[-1]
        cols = ["kept", "prec_vis", *[f"prec@{x:g}" for x in deltas], *[f"recall@{x:g}" for x in deltas],
                "vis_recall", "epe_med"]
        head = f"{'source':<9} {'filter':<10} {'queries':>7} " + " ".join(f"{c:>10}" for c in cols)
        lines = [head, "-" * len(head)]
        for name, fname, n, s in tab_rows:
            lines.append(f"{name:<9} {fname:<10} {n:>7} " + " ".join(
                f"{'-':>10}" if not np.isfinite(s[c]) else f"{s[c]:>10.2f}" if c == "epe_med"
                else f"{100 * s[c]:>9.1f}%" for c in cols))
        tab = "\n".join(lines)
        glines = []
        for name, info in per_source.items():
            thr, rows = info["per_gap"]
            glines.append(f"{name}: per gap, without -> fb {thr:g}px (prec_vis, prec@{dl0:g}, recall@{dl0:g})")
            for k, n, occ, a, b in rows:
                glines.append(f"  k={k:<2} {n:>5} queries, {100 * occ:4.1f}% occluded: "
                              f"prec_vis {pct(a['prec_vis'])} -> "
                              f"{pct(b['prec_vis'])}, prec@{dl0:g} {pct(a[f'prec@{dl0:g}'])} -> "
                              f"{pct(b[f'prec@{dl0:g}'])}, recall@{dl0:g} {pct(b[f'recall@{dl0:g}'])}; kept "
                              f"{pct(b['kept'])}")
        gtab = "\n".join(glines)
        reading = []
        for name, info in per_source.items():
            sc = info["scores"]
            base = sc["without"]
            parts = []
            for thr in thresholds:
                w = sc[f"fb {thr:g}px"]
                parts.append(f"fb {thr:g}px: prec_vis {pct(w['prec_vis']).strip()}, prec@{dl0:g} "
                             f"{pct(w[f'prec@{dl0:g}']).strip()}, keeps {pct(w[f'recall@{dl0:g}']).strip()} of the "
                             f"correct labels")
            caveat = " (random micro teacher: not informative)" if name == "kltrace" and micro else ""
            reading.append(f"{name}{caveat}: without the check prec_vis {pct(base['prec_vis']).strip()}, prec@{dl0:g} "
                           f"{pct(base[f'prec@{dl0:g}']).strip()}; " + "; ".join(parts) + ".")
        total = time.perf_counter() - t_start
        print(tab)
        print(gtab)
        print("\n".join(reading))
        print(f"kltrace teacher: {teacher_name}")
        print(f"machine: {machine}; total {total:.0f} s (synthetic set {synth_s:.0f} s)")
        for n_, v in RESULTS:
            print(f"RESULT {n_} {v:.4g}")
        notes = args.notes if args.notes is not None else (None if args.quick else str(ROOT / "bench" / "NOTES.md"))
        if notes:
            cmd = " ".join(["python bench/label_fb.py", *argv_used])
            text = [
                "## bench/label_fb.py — forward-backward filter vs ground truth",
                "",
                f"Run: `{cmd}` ({time.strftime('%Y-%m-%d')}, {total:.0f} s). Machine: {machine}.",
                "",
                f"Data: {len(items)} synthetic videos ({args.size}x{args.size}; more occlusion than the default set: "
                f"{SYNTH}), pairs (frame 0, frame k) for k in {gaps}, queries = all ground-truth points visible in "
                f"frame 0 (kltrace: at most {kl_points} per video and gap, strided). kltrace teacher: {teacher_name}. "
                "Filter = `pipeline.label.forward_backward` (trace the targets back, keep visible iff round-trip "
                "error <= threshold). prec@d = share of 'visible' labels that are visible in truth and within d px; "
                "recall@d = share of the source's correct labels (visible, within d px) that stay 'visible'.",
                "",
                "```",
                tab,
                "",
                gtab,
                "```",
                "",
                *[line for r in reading for line in textwrap.wrap(r, 115)],
                "",
                *textwrap.wrap(
                    "What the check costs: the correct labels it drops (recall@d < 100%) and a second tracing call per"
                    " pair (the backward one), i.e. twice the teacher time when it is on.", 115),
                "",
                "```",
                *[f"RESULT {n_} {v:.4g}" for n_, v in RESULTS],
                "```",
            ]
            write_notes(Path(notes), "\n".join(text), "bench/label_fb.py")
            print(f"notes -> {notes}")
        return 0
    finally:
        if own:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
