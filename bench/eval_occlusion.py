"""Where a teacher's occlusion calls go wrong: read ``flowdistill eval --predictions --out R.json`` results and split
the occlusion errors by how well the point was tracked.

  python bench/eval_occlusion.py R.json [R2.json ...] [--source kltrace] [--far 8] [--data D[,D2 ...]]
                                 [--occ-threshold T --fb-threshold E --app-threshold A] [--calibrate]

Per results file (scored entries of the TAP-Vid "first" protocol, ground truth from the JSON): entries, occluded
entries, visible entries called occluded (and how many of those were tracked more than ``--far`` px off — a wrong
track, which a round-trip check rightly cannot close), occluded entries called visible, occlusion accuracy vs
"always visible", and the AUC of the KL peak and of the round-trip error (when stored) for visible vs occluded.
Reads only; traces nothing. OA here is pooled over entries (``flowdistill eval`` reports the mean over videos).

``--occ-threshold`` / ``--fb-threshold`` re-score the stored entries under another occlusion rule (visible = KL peak
>= T and round-trip error <= E; E 0 = no round trip): the tracks do not depend on the rule, so AJ, delta_avg and OA
are recomputed exactly as ``flowdistill eval`` computes them (means over videos) without tracing again. The scores
are stored to 4 decimals; the stored calls are first re-derived under the thresholds the run used
(``--used-occ-threshold`` / ``--used-fb-threshold`` / ``--used-app-threshold``, the tracer's) to check the
re-scoring reads them right.

``--app-threshold A`` adds the appearance check (``teacher.kltrace.appearance_error``: visible also needs
e_app <= A). It reads only the frames, the queries and the stored estimates, so when a run did not store e_app it
is computed here from the videos (``--data``: the synthetic set directory of each results file, as given to
``flowdistill eval --data``; ``--app-radius/--app-search/--app-floor`` as the tracer's). ``--calibrate`` searches,
on the files given (a VALIDATION set's results, never the held-out ones), the round-trip and appearance
thresholds that maximise the pooled occlusion accuracy (the KL-peak threshold kept at ``--used-occ-threshold``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from notes import report  # bench/notes.py
from occ_threshold import auc  # bench/occ_threshold.py

from teacher.kltrace_config import KLTraceConfig

ROOT = Path(__file__).resolve().parents[1]


def add_app_errors(result: dict, data_dir: str, radius: int, search: int, floor: float) -> None:
    """Fill each video's stored predictions with "app_error" [N, T] (NaN where not scored) computed from the
    videos of ``data_dir`` (a ``pipeline.synthetic`` set) with ``teacher.kltrace.appearance_error``; in place."""
    from pipeline import synthetic
    from teacher.kltrace import appearance_error

    videos = {it["name"]: it["video"] for it in synthetic.load_set(Path(data_dir))}
    for rec in result["per_video"]:
        p = rec.get("predictions")
        if p is None or "app_error" in p:
            continue
        if rec["name"] not in videos:
            raise SystemExit(f"{data_dir}: no video {rec['name']!r} (is it the set this result was computed on?)")
        video = videos[rec["name"]]
        qp = np.asarray(p["query_points"], float)
        qf = np.round(qp[:, 0]).astype(int)
        tracks = np.asarray(p["pred_tracks"], float)
        err = np.full(tracks.shape[:2], np.nan)
        for q in np.unique(qf):
            sel = np.flatnonzero(qf == q)
            for t in range(q + 1, video.shape[0]):
                err[sel, t] = appearance_error(video[q], video[t], qp[sel][:, [2, 1]], tracks[sel, t], radius,
                                               search, floor).numpy()
        p["app_error"] = err.tolist()


def entries(result: dict) -> dict:
    """Scored entries of one source's result (``evaluate_two_frame(..., predictions=True)``) as flat arrays."""
    cols: dict[str, list] = {k: [] for k in ("occluded", "pred_occluded", "dist", "score", "fb_error", "app_error")}
    for rec in result["per_video"]:
        p = rec.get("predictions")
        if p is None:
            raise SystemExit(f"{rec['name']}: no predictions stored (run flowdistill eval with --predictions)")
        qf = np.round(np.asarray(p["query_points"], float)[:, 0]).astype(int)
        occ = np.asarray(p["gt_occluded"], bool)
        scored = np.arange(occ.shape[1])[None] > qf[:, None]
        dist = np.linalg.norm(np.asarray(p["pred_tracks"], float) - np.asarray(p["gt_tracks"], float), axis=-1)
        cols["occluded"].append(occ[scored])
        cols["pred_occluded"].append(np.asarray(p["pred_occluded"], bool)[scored])
        cols["dist"].append(dist[scored])
        for k in ("score", "fb_error", "app_error"):
            if k in p:
                cols[k].append(np.asarray(p[k], dtype=float)[scored])
    return {k: np.concatenate(v) for k, v in cols.items() if v}


def rule_occluded(score: np.ndarray, fb_error: np.ndarray | None, occ_threshold: float,
                  fb_threshold: float | None, app_error: np.ndarray | None = None,
                  app_threshold: float | None = None) -> np.ndarray:
    """Occluded under the rule visible = (score >= occ_threshold) and (fb_error <= fb_threshold) and (app_error <=
    app_threshold); a threshold of None / 0 for the round trip or the appearance check = no such check
    (``teacher.kltrace`` semantics). NaN (unscored) -> visible."""
    vis = ~(score < occ_threshold)
    if fb_threshold:
        if fb_error is None:
            raise SystemExit("--fb-threshold needs round-trip errors in the results (eval with the check on)")
        vis &= ~(fb_error > fb_threshold)
    if app_threshold:
        if app_error is None:
            raise SystemExit("--app-threshold needs appearance errors (stored by the run, or --data to compute them)")
        vis &= ~(app_error > app_threshold)
    return ~vis


def rescore(result: dict, occ_threshold: float, fb_threshold: float | None,
            app_threshold: float | None = None) -> dict:
    """Per-video TAP-Vid metrics of the stored tracks under another occlusion rule, and their means over videos as
    ``pipeline.evaluate.evaluate_two_frame`` takes them (AD does not depend on the rule: copied). Returns
    {"mean": {...}, "per_video": [{name, metrics, ad}], "pred_occluded": [bool [N, T] per video]}."""
    from pipeline.evaluate import METRIC_KEYS, compute_tapvid_metrics

    per, calls = [], []
    for rec in result["per_video"]:
        p = rec["predictions"]
        arr = {k: np.asarray(p[k], dtype=float) for k in ("score", "fb_error", "app_error") if k in p}  # null -> NaN
        po = rule_occluded(arr["score"], arr.get("fb_error"), occ_threshold, fb_threshold, arr.get("app_error"),
                           app_threshold)
        m = compute_tapvid_metrics(np.asarray(p["query_points"], float)[None], np.asarray(p["gt_occluded"], bool)[None],
                                   np.asarray(p["gt_tracks"], float)[None], po[None],
                                   np.asarray(p["pred_tracks"], float)[None], "first")
        per.append({"name": rec["name"], **{k: float(m[k][0]) for k in METRIC_KEYS}, "ad": rec.get("ad")})
        calls.append(po)
    mean = {k: float(np.nanmean([r[k] for r in per])) for k in METRIC_KEYS}
    mean["ad"] = result["mean"].get("ad")
    mean["num_videos"] = len(per)
    return {"mean": mean, "per_video": per, "pred_occluded": calls}


def calibrate(e: dict, occ_threshold: float) -> tuple[list[str], list[str], dict]:
    """Best round-trip / appearance thresholds on pooled validation entries ``e`` (``entries``), the KL-peak test
    kept at ``occ_threshold``: (lines for NOTES, RESULT lines, {rule: (fb_threshold, app_threshold, accuracy)})."""
    from occ_threshold import best_rule  # bench/occ_threshold.py

    o = e["occluded"]
    base = e["score"] >= occ_threshold if "score" in e else np.ones(len(o), bool)
    lines, results, rules = [], [], {}
    fb, app = e.get("fb_error"), e.get("app_error")
    for name, err, sc in (("fb", fb, None), ("app", None, app), ("fb+app", fb, app)):
        if (err is None and name != "app") or (sc is None and name != "fb"):
            continue
        # visible = base & (-app >= -t_app) & (fb <= t_fb): best_rule's score test is "score >= t"
        score = np.where(base, -sc, -np.inf) if sc is not None else np.where(base, 0.0, -np.inf)
        t_neg, t_fb, acc = best_rule(score, err, o)
        t_app = -t_neg if sc is not None and t_neg != 0.0 else None
        rules[name] = (t_fb, t_app, acc)
        lines.append(f"- rule {name}: best pooled OA {100 * acc:.1f} % (always visible {100 * np.mean(~o):.1f} %) "
                     f"at fb_threshold {t_fb if t_fb is not None else 'off'}, app_threshold "
                     f"{t_app if t_app is not None else 'off'}")
        results.append(f"RESULT calibrated_{name.replace('+', '_')}_occ_accuracy {acc:.4f}")
        if t_app is not None:
            results.append(f"RESULT calibrated_{name.replace('+', '_')}_app_threshold {t_app:.5g}")
        if t_fb is not None:
            results.append(f"RESULT calibrated_{name.replace('+', '_')}_fb_threshold {t_fb:.5g}")
    return lines, results, rules


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="flowdistill eval --predictions --out JSON files")
    ap.add_argument("--source", default="kltrace")
    ap.add_argument("--far", type=float, default=8.0, help="px: a visible entry this far off is a failed track")
    ap.add_argument("--names", default=None, help="comma-separated labels for the files (default: file stems)")
    ap.add_argument("--occ-threshold", type=float, default=None, help="re-score under this KL-peak threshold")
    ap.add_argument("--fb-threshold", type=float, default=None, help="re-score under this round-trip threshold")
    ap.add_argument("--used-occ-threshold", type=float, default=0.0, help="the KL-peak threshold the run used")
    ap.add_argument("--used-fb-threshold", type=float, default=None, help="the round-trip threshold the run used")
    ap.add_argument("--app-threshold", type=float, default=None, help="re-score with this appearance threshold")
    ap.add_argument("--used-app-threshold", type=float, default=None, help="the appearance threshold the run used")
    ap.add_argument("--data", default=None,
                    help="comma-separated synthetic set dirs, one per results file: compute appearance errors the "
                         "run did not store")
    ap.add_argument("--app-radius", type=int, default=KLTraceConfig.app_radius)
    ap.add_argument("--app-search", type=int, default=KLTraceConfig.app_search)
    ap.add_argument("--app-floor", type=float, default=KLTraceConfig.app_floor)
    ap.add_argument("--calibrate", action="store_true",
                    help="search the round-trip / appearance thresholds on these (validation) files, pooled")
    ap.add_argument("--write", default=None, metavar="TEACHER",
                    help="with --calibrate: store --rule's thresholds in this bundle's teacher.json (teacher."
                         "checkpoints.set_bundle_tracer; weights and teacher_id unchanged)")
    ap.add_argument("--rule", choices=("fb", "app", "fb+app"), default=None, help="the calibrated rule --write stores")
    ap.add_argument("--out", default=None, metavar="JSON",
                    help="with a re-scoring: write each file's re-scored metrics here ({label: {rule, source, mean, "
                         "per_video}}, means over videos as flowdistill eval)")
    ap.add_argument("--notes", default=str(ROOT / "bench" / "NOTES.md"), help="NOTES.md to update ('' : none)")
    args = ap.parse_args(argv)
    do_rescore = any(v is not None for v in (args.occ_threshold, args.fb_threshold, args.app_threshold))
    names = args.names.split(",") if args.names else [Path(r).stem for r in args.results]
    if len(names) != len(args.results):
        raise SystemExit("--names must give one label per results file")
    data = args.data.split(",") if args.data else [None] * len(args.results)
    if len(data) != len(args.results):
        raise SystemExit("--data must give one set directory per results file")
    if args.write and not (args.calibrate and args.rule):
        raise SystemExit("--write needs --calibrate and --rule")
    cmd = "python bench/eval_occlusion.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["## bench/eval_occlusion.py — where the occlusion calls go wrong (from eval --predictions)", "",
             f"- command: `{cmd}`"]
    results = []
    rescored: dict[str, dict] = {}
    pooled: list[dict] = []
    made_by: list[dict] = []                       # how each results file was made (for a --write record)
    default = KLTraceConfig().to_dict()            # tracer values at their defaults were the bundle's own (then)
    for name, path, data_dir in zip(names, args.results, data):
        doc = json.loads(Path(path).read_text())
        res = doc["results"]
        src_cfg = dict((doc.get("config") or {}).get("sources", {}).get(args.source) or {})
        src_cfg["tracer_set"] = {k: v for k, v in (src_cfg.pop("tracer", None) or {}).items() if default.get(k) != v}
        made_by.append({"file": str(path), "data": doc.get("data"), "source_config": src_cfg})
        if args.source not in res:
            raise SystemExit(f"{path}: no results for source {args.source!r} (has {sorted(res)})")
        if data_dir:
            add_app_errors(res[args.source], data_dir, args.app_radius, args.app_search, args.app_floor)
        e = entries(res[args.source])
        pooled.append(e)
        o, po, d = e["occluded"], e["pred_occluded"], e["dist"]
        false_occ = po & ~o
        oa, always = float(np.mean(po == o)), float(np.mean(~o))
        a_kl = auc(e["score"][~o], e["score"][o]) if "score" in e else float("nan")
        a_fb = auc(-e["fb_error"][~o], -e["fb_error"][o]) if "fb_error" in e else float("nan")
        a_app = auc(-e["app_error"][~o], -e["app_error"][o]) if "app_error" in e else float("nan")
        far = d > args.far
        lines.append(
            f"- {name} ({Path(path).name}, source {args.source}): {len(o)} entries, {int(o.sum())} occluded; "
            f"visible called occluded {int(false_occ.sum())} (tracked > {args.far:g} px off: "
            f"{int((false_occ & far).sum())}; visible entries tracked that far off: {int((~o & far).sum())} of "
            f"{int((~o).sum())}); occluded called visible {int((o & ~po).sum())}; OA pooled over entries "
            f"{100 * oa:.1f} % (always visible {100 * always:.1f} %); AUC KL peak {a_kl:.3f}, round-trip error "
            f"{a_fb:.3f}, appearance error {a_app:.3f}")
        results.append((name, oa, always, int(false_occ.sum()), int((false_occ & far).sum())))
        if do_rescore:
            used = rescore(res[args.source], args.used_occ_threshold, args.used_fb_threshold, args.used_app_threshold)
            stored = [np.asarray(r["predictions"]["pred_occluded"], bool) for r in res[args.source]["per_video"]]
            mism = sum(int((a != b).sum()) for a, b in zip(used["pred_occluded"], stored))
            if mism > 0.01 * sum(a.size for a in stored):
                raise SystemExit(f"{path}: re-deriving the stored calls under occ {args.used_occ_threshold}, fb "
                                 f"{args.used_fb_threshold}, app {args.used_app_threshold} disagrees on {mism} "
                                 f"entries: pass the thresholds the run used")
            occ_t = args.occ_threshold if args.occ_threshold is not None else args.used_occ_threshold
            fb_t = args.fb_threshold if args.fb_threshold is not None else args.used_fb_threshold
            app_t = args.app_threshold if args.app_threshold is not None else args.used_app_threshold
            new = rescore(res[args.source], occ_t, fb_t, app_t)
            stored_mean = res[args.source]["mean"]
            m = new["mean"]
            fmt = lambda d: (f"AJ {100 * d['average_jaccard']:.1f}, delta_avg {100 * d['average_pts_within_thresh']:.1f}, "
                             f"OA {100 * d['occlusion_accuracy']:.1f}")
            lines.append(f"  - re-scored with occ_threshold {occ_t:g}, fb_threshold {fb_t or 'off'}, app_threshold "
                         f"{app_t or 'off'} ({mism} stored calls "
                         f"differ from their re-derivation by rounding): {fmt(m)} (stored run: {fmt(stored_mean)}; "
                         f"means over videos as flowdistill eval)")
            results[-1] += (m,)
            rescored[name] = {"from": str(path), "source": args.source,
                              "rule": {"occ_threshold": occ_t, "fb_threshold": fb_t or None,
                                       "app_threshold": app_t or None},
                              "mean": m, "per_video": new["per_video"]}
    cal_results: list[str] = []
    if args.calibrate:
        pool = {k: np.concatenate([e[k] for e in pooled]) for k in pooled[0] if all(k in e for e in pooled)}
        cal_lines, cal_results, rules = calibrate(pool, args.used_occ_threshold)
        if args.write:
            if args.rule not in rules:
                raise SystemExit(f"rule {args.rule!r} could not be calibrated (no round-trip / appearance errors)")
            from teacher.checkpoints import set_bundle_tracer

            t_fb, t_app, acc = rules[args.rule]
            update = {"fb_threshold": None if t_fb is None else round(t_fb, 4),
                      "app_threshold": None if t_app is None else round(t_app, 4),
                      "app_radius": args.app_radius, "app_search": args.app_search, "app_floor": args.app_floor}
            record = {"command": cmd,
                      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "results": made_by, "data": [str(d) for d in data], "rule": args.rule, "entries": int(len(pool["occluded"])),
                      "occluded": int(pool["occluded"].sum()), "occ_accuracy": round(float(acc), 4),
                      "always_visible": round(float(np.mean(~pool["occluded"])), 4)}
            set_bundle_tracer(args.write, update, record)
            cal_lines.append(f"written to {args.write}/teacher.json: tracer {update}")
        lines += [f"- calibration on {', '.join(names)} pooled ({len(pool['occluded'])} entries, "
                  f"{int(pool['occluded'].sum())} occluded; KL-peak threshold kept at {args.used_occ_threshold:g}; "
                  f"appearance radius {args.app_radius}, search {args.app_search}, floor {args.app_floor:g}):",
                  *("  " + ln for ln in cal_lines)]
    lines.append("")
    for name, oa, always, fo, fo_far, *new in results:
        lines += [f"RESULT {name}_occ_accuracy {oa:.4f}", f"RESULT {name}_occ_accuracy_always_visible {always:.4f}",
                  f"RESULT {name}_false_occluded {fo}", f"RESULT {name}_false_occluded_far {fo_far}"]
        if new:
            lines += [f"RESULT {name}_rescored_average_jaccard {new[0]['average_jaccard']:.4f}",
                      f"RESULT {name}_rescored_occ_accuracy {new[0]['occlusion_accuracy']:.4f}"]
    lines += cal_results
    if args.out and rescored:
        from pipeline.common import atomic_write_json

        atomic_write_json(args.out, rescored)
        lines.append(f"- re-scored metrics -> {args.out}")
    tag = ("eval_occlusion_calibrated" if args.calibrate else
           "eval_occlusion_rescored" if do_rescore else "eval_occlusion")
    report(lines, args.notes or None, tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
