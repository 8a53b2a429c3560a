"""Calibrate a teacher's occlusion rule on a validation set — never on the held-out evaluation sets — and report how
separable occlusion is. Two sets: configs/synth/val_teacher.yaml (default; the training textures, its own seed, half
the points occluded somewhere) and configs/synth/val_teacher_unseen.yaml (``--data-config``; Voronoi-cell textures
that neither training nor the held-out sets use, its own seed): a rule calibrated where tracks rarely fail (training
textures) need not hold where they fail more often (unseen appearance, which is what the held-out sets measure).

  python bench/occ_threshold.py --teacher teacher/weights/tiny [--rule kl|fb|both] [--write]

Rules (visible = ...): ``kl`` KL peak >= occ_threshold; ``fb`` forward-backward error <= fb_threshold (model px,
``teacher.kltrace.forward_backward``; the KL-peak test off); ``both`` the two together (2-D search). With ``fb`` or
``both`` every pair is also traced backward (2x the time) and all three rules are reported; ``--write`` stores the
chosen rule's thresholds.

Tracer settings not given here are the bundle's (teacher.json "tracer" over the KLTraceConfig defaults: 5 masks, 4
zoom levels), i.e. the settings the threshold will be used with.

Pairs (frame 0, frame t), t = 1 .. num_frames - 1, queries = ground-truth points visible in frame 0. For every
candidate threshold (the midpoints between sorted peak scores) the occlusion accuracy is computed; the best one is
printed (put it in the bundle's tracer settings or pass ``--set sources.kltrace.tracer.occ_threshold=...``), with
the accuracy of "always visible" and the AUC of the peak score for visible vs occluded.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from notes import machine_line, report  # bench/notes.py

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / "configs" / "synth" / "val_teacher.yaml"


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


def _cuts(x: np.ndarray) -> np.ndarray:
    """Candidate thresholds: the midpoints between sorted distinct values, plus both infinities."""
    v = np.unique(x)
    return np.concatenate([[-np.inf], (v[1:] + v[:-1]) / 2, [np.inf]])


def best_rule(score: np.ndarray | None, err: np.ndarray | None, occluded: np.ndarray):
    """The thresholds maximising occlusion accuracy of visible = (score >= t_kl) & (err <= t_fb); a None input is
    not used (its test off). Returns (t_kl, t_fb or None, accuracy); t_kl 0.0 when the peak test is off or never
    binds. Ties go to the first candidate (the lowest t_kl, then the lowest t_fb)."""
    n = len(occluded)
    kl_cuts = _cuts(score) if score is not None else np.array([-np.inf])
    fb_cuts = _cuts(err) if err is not None else np.array([np.inf])
    best = (-1.0, 0, 0)
    for i, tk in enumerate(kl_cuts):
        vis_k = score >= tk if score is not None else np.ones(n, bool)
        vis = vis_k[None, :] & (err[None, :] <= fb_cuts[:, None]) if err is not None else vis_k[None, :]
        acc = np.mean(vis == ~occluded[None, :], axis=1)
        j = int(np.argmax(acc))
        if acc[j] > best[0]:
            best = (float(acc[j]), i, j)
    acc, i, j = best
    t_kl = float(kl_cuts[i]) if np.isfinite(kl_cuts[i]) else 0.0
    t_fb = float(fb_cuts[j]) if err is not None and np.isfinite(fb_cuts[j]) else None
    return t_kl, t_fb, acc


def _trace_entries(src, cfg: dict, use_fb: bool):
    """Trace pairs (0, t) of a freshly written set: (KL peak [M], round-trip error [M] or None, occluded [M])."""
    from pipeline import synthetic

    with tempfile.TemporaryDirectory(prefix="fd_occ_") as tmp:
        synthetic.write_set(Path(tmp) / "set", cfg)
        items = synthetic.load_set(Path(tmp) / "set")
    scores, fb_errors, occluded = [], [], []
    for it in items:
        video, pts, occ = it["video"], np.asarray(it["points"]), np.asarray(it["occluded"], bool)
        H, W = video.shape[1:3]
        sel = np.flatnonzero(~occ[:, 0])
        p0 = (pts[sel, 0] * np.array([W, H])).astype(np.float32)
        for t in range(1, video.shape[0]):
            src.track(video[0], video[t], p0)
            scores.append(src.last_result.score.numpy().astype(np.float64))
            if use_fb:
                fb_errors.append(src.last_result.fb_error.numpy().astype(np.float64))
            occluded.append(occ[sel, t])
    return (np.concatenate(scores), np.concatenate(fb_errors) if use_fb else None, np.concatenate(occluded))


def _write_entries(path: str, key: str, s, e, o) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp.npz")
    np.savez(tmp, key=np.array(key), score=s, fb_error=e if e is not None else np.zeros(0), occluded=o)
    tmp.replace(p)


def _read_entries(path: str, key: str):
    """The cached entries if ``path`` exists and holds the same settings (and round-trip errors when needed)."""
    p = Path(path)
    if not p.is_file():
        return None
    with np.load(p, allow_pickle=False) as z:
        if str(z["key"]) != key:
            print(f"{path}: made with other settings, tracing again")
            return None
        e = z["fb_error"] if len(z["fb_error"]) == len(z["score"]) else None
        return z["score"], e, z["occluded"].astype(bool)


def _shown(path: str) -> str:
    """A path as NOTES show it: relative to the repo when inside it."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default=str(ROOT / "teacher" / "weights" / "tiny"))
    ap.add_argument("--num-masks", type=int, default=None, help="default: the bundle's tracer setting")
    ap.add_argument("--zoom-levels", type=int, default=None, help="default: the bundle's tracer setting")
    ap.add_argument("--sigma", type=float, default=None, help="bump sigma, model px (default: the tracer's)")
    ap.add_argument("--data-config", default=str(DEFAULT_DATA),
                    help="synthetic set config (default: the validation set, training textures, seed 500; "
                         "configs/synth/val_teacher_unseen.yaml: textures neither training nor held-out use)")
    ap.add_argument("--videos", type=int, default=None, help="override num_videos")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rule", choices=("kl", "fb", "both"), default="kl",
                    help="which occlusion rule to calibrate (and --write); fb and both trace every pair backward too")
    ap.add_argument("--write", action="store_true",
                    help="store the calibrated threshold in the bundle's teacher.json (teacher.checkpoints."
                         "set_bundle_tracer; the weights and teacher_id are unchanged)")
    ap.add_argument("--entries", default=None, metavar="NPZ",
                    help="per-entry scores, round-trip errors and ground truth: written here after tracing; if the "
                         "file exists and was made with the same settings, read instead of tracing")
    ap.add_argument("--notes", default=str(ROOT / "bench" / "NOTES.md"))
    args = ap.parse_args(argv)

    from pipeline import synthetic
    from pipeline.config import load_config
    from pipeline.flowsources import make_flow_source

    machine = machine_line(args.threads)
    shown = _shown(args.teacher)
    t_start = time.perf_counter()
    given = {"num_masks": args.num_masks, "zoom_levels": args.zoom_levels, "sigma": args.sigma}
    tracer = {k: v for k, v in given.items() if v is not None}
    use_fb = args.rule != "kl"
    if use_fb:
        tracer["fb_threshold"] = 1e9       # compute every round-trip error, flag nothing (the rules are searched here)
    src = make_flow_source("kltrace", {"teacher": args.teacher, "threads": args.threads, "tracer": tracer})
    cfg = synthetic.resolve_config(load_config(Path(args.data_config), [], synthetic.DEFAULTS))
    if args.videos is not None:
        cfg["num_videos"] = args.videos
    traced_with = {k: v for k, v in src.tracer_cfg.to_dict().items()      # what the entries depend on
                   if k not in ("occ_threshold", "rgb_occ_threshold", "fb_threshold")}
    key = json.dumps({"teacher_id": src.tracer.bundle_meta.get("teacher_id"), "tracer": traced_with, "data": cfg},
                     sort_keys=True, default=str)
    cached = _read_entries(args.entries, key) if args.entries else None
    if cached is not None and use_fb and cached[1] is None:
        cached = None                      # made without round trips
    if cached is not None:
        s, e, o = cached
        print(f"entries read from {args.entries} (same teacher, tracer settings and data)")
    else:
        s, e, o = _trace_entries(src, cfg, use_fb)
        if args.entries:
            _write_entries(args.entries, key, s, e, o)
    always = float(np.mean(~o))
    rules = {"kl": best_rule(s, None, o)}
    a = auc(s[~o], s[o])
    if use_fb:
        rules["fb"] = best_rule(None, e, o)
        rules["both"] = best_rule(s, e, o)
        a_fb = auc(-e[~o], -e[o])
    thr_kl, thr_fb, acc_best = rules[args.rule]
    secs = time.perf_counter() - t_start
    written: list[str] = []
    if args.write:
        from teacher.checkpoints import set_bundle_tracer

        record = {"command": "python bench/occ_threshold.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "tracer": {"num_masks": src.tracer_cfg.num_masks, "zoom_levels": src.tracer_cfg.zoom_levels,
                             "sigma": src.tracer_cfg.sigma},
                  "data": Path(args.data_config).name, "queries": int(len(s)), "occluded": int(o.sum()),
                  "rule": args.rule, "occ_accuracy": round(float(acc_best), 4), "always_visible": round(always, 4),
                  "auc": round(a, 4), **({"auc_fb": round(a_fb, 4)} if use_fb else {})}
        update = {"occ_threshold": round(thr_kl, 4), "fb_threshold": None if thr_fb is None else round(thr_fb, 3)}
        set_bundle_tracer(args.teacher, update, record)
        written.append(f"- written to {shown}/teacher.json: tracer {update}")
    fb_lines = []
    if use_fb:
        fb_lines = [f"- forward-backward error (model px): visible median {np.median(e[~o]):.3g}, occluded median "
                    f"{(np.median(e[o]) if o.any() else float('nan')):.3g}; AUC {a_fb:.3f}",
                    *(f"- rule {r}: occ_threshold {t_kl:.4g}, fb_threshold "
                      f"{'off' if t_fb is None else f'{t_fb:.3g}'}: occlusion accuracy {100 * acc_r:.1f} %"
                      for r, (t_kl, t_fb, acc_r) in rules.items())]
    lines = [
        "## bench/occ_threshold.py — occlusion threshold of a teacher, calibrated on a validation set (not held out)",
        "",
        f"- machine: {machine}; {secs:.0f} s" + (f" (entries read from {args.entries}, traced by an earlier run)"
                                                if cached is not None else ""),
        f"- teacher: {shown}; tracer {src.tracer_cfg.num_masks} masks, {src.tracer_cfg.zoom_levels} zoom levels, "
        f"sigma {src.tracer_cfg.sigma}",
        f"- data: {Path(args.data_config).name} ({'+'.join(cfg['texture']['families'])} textures, seed {cfg['seed']}, "
        f"{cfg['num_videos']} videos x {cfg['num_frames']} frames x {cfg['points']['per_video']} points, "
        f"occluded_fraction {cfg['points']['occluded_fraction']}); pairs (0, t); {len(s)} queries, "
        f"{int(o.sum())} occluded",
        f"- peak KL: visible median {np.median(s[~o]):.3g}, occluded median "
        f"{(np.median(s[o]) if o.any() else float('nan')):.3g}; AUC {a:.3f}",
        f"- best threshold {rules['kl'][0]:.4g}: occlusion accuracy {100 * rules['kl'][2]:.1f} % (always visible "
        f"{100 * always:.1f} %)",
        *fb_lines,
        f"- chosen rule: {args.rule}",
        *written,
        "",
        f"RESULT occ_threshold {thr_kl:.6g}",
        *([f"RESULT fb_threshold {thr_fb:.6g}"] if thr_fb is not None else []),
        f"RESULT occ_accuracy {acc_best:.4f}",
        f"RESULT occ_accuracy_always_visible {always:.4f}",
        f"RESULT occ_auc {a:.4f}",
        *([f"RESULT fb_auc {a_fb:.4f}"] if use_fb else []),
    ]
    # the bundle's settings on the default set keep the main section; other tracer settings (e.g. the demo's) and
    # other calibration sets get their own
    tag = "occ_threshold" if not tracer.keys() - {"fb_threshold"} else (
        f"occ_threshold_{src.tracer_cfg.num_masks}m{src.tracer_cfg.zoom_levels}z_sigma{src.tracer_cfg.sigma:g}")
    if Path(args.data_config).resolve() != DEFAULT_DATA.resolve():
        tag += "_" + Path(args.data_config).stem
    report(lines, args.notes, tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
