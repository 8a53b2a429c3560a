"""Where a teacher's occlusion calls go wrong: read ``flowdistill eval --predictions --out R.json`` results and split
the occlusion errors by how well the point was tracked.

  python bench/eval_occlusion.py R.json [R2.json ...] [--source kltrace] [--far 8]

Per results file (scored entries of the TAP-Vid "first" protocol, ground truth from the JSON): entries, occluded
entries, visible entries called occluded (and how many of those were tracked more than ``--far`` px off — a wrong
track, which a round-trip check rightly cannot close), occluded entries called visible, occlusion accuracy vs
"always visible", and the AUC of the KL peak and of the round-trip error (when stored) for visible vs occluded.
Reads only; traces nothing. OA here is pooled over entries (``flowdistill eval`` reports the mean over videos).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from notes import report  # bench/notes.py
from occ_threshold import auc  # bench/occ_threshold.py

ROOT = Path(__file__).resolve().parents[1]


def entries(result: dict) -> dict:
    """Scored entries of one source's result (``evaluate_two_frame(..., predictions=True)``) as flat arrays."""
    cols: dict[str, list] = {k: [] for k in ("occluded", "pred_occluded", "dist", "score", "fb_error")}
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
        for k in ("score", "fb_error"):
            if k in p:
                cols[k].append(np.asarray(p[k], dtype=float)[scored])
    return {k: np.concatenate(v) for k, v in cols.items() if v}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="flowdistill eval --predictions --out JSON files")
    ap.add_argument("--source", default="kltrace")
    ap.add_argument("--far", type=float, default=8.0, help="px: a visible entry this far off is a failed track")
    ap.add_argument("--names", default=None, help="comma-separated labels for the files (default: file stems)")
    ap.add_argument("--notes", default=str(ROOT / "bench" / "NOTES.md"), help="NOTES.md to update ('' : none)")
    args = ap.parse_args(argv)
    names = args.names.split(",") if args.names else [Path(r).stem for r in args.results]
    if len(names) != len(args.results):
        raise SystemExit("--names must give one label per results file")
    lines = ["## bench/eval_occlusion.py — where the occlusion calls go wrong (from eval --predictions)", ""]
    results = []
    for name, path in zip(names, args.results):
        res = json.loads(Path(path).read_text())["results"]
        if args.source not in res:
            raise SystemExit(f"{path}: no results for source {args.source!r} (has {sorted(res)})")
        e = entries(res[args.source])
        o, po, d = e["occluded"], e["pred_occluded"], e["dist"]
        false_occ = po & ~o
        oa, always = float(np.mean(po == o)), float(np.mean(~o))
        a_kl = auc(e["score"][~o], e["score"][o]) if "score" in e else float("nan")
        a_fb = auc(-e["fb_error"][~o], -e["fb_error"][o]) if "fb_error" in e else float("nan")
        far = d > args.far
        lines.append(
            f"- {name} ({Path(path).name}, source {args.source}): {len(o)} entries, {int(o.sum())} occluded; "
            f"visible called occluded {int(false_occ.sum())} (tracked > {args.far:g} px off: "
            f"{int((false_occ & far).sum())}; visible entries tracked that far off: {int((~o & far).sum())} of "
            f"{int((~o).sum())}); occluded called visible {int((o & ~po).sum())}; OA pooled over entries "
            f"{100 * oa:.1f} % (always visible {100 * always:.1f} %); AUC KL peak {a_kl:.3f}, round-trip error "
            f"{a_fb:.3f}")
        results.append((name, oa, always, int(false_occ.sum()), int((false_occ & far).sum())))
    lines.append("")
    for name, oa, always, fo, fo_far in results:
        lines += [f"RESULT {name}_occ_accuracy {oa:.4f}", f"RESULT {name}_occ_accuracy_always_visible {always:.4f}",
                  f"RESULT {name}_false_occluded {fo}", f"RESULT {name}_false_occluded_far {fo_far}"]
    report(lines, args.notes or None, "eval_occlusion")
    return 0


if __name__ == "__main__":
    sys.exit(main())
