"""Where a tiny teacher's tracking error comes from: how well its copy head knows the motion of a masked patch.

  python bench/teacher_motion.py --teacher teacher/weights/tiny [--mask-ratio 0.9 --masks 2 --threads 1]

KL-tracing can only be as good as the model's idea of where a masked frame-1 patch's content came from. For the
tiny teacher (teacher/tiny.py) that idea is explicit: the copy head's offset distribution m_c(d) over the
(2R+1)^2 integer offsets. For pairs (frame 0, frame t) of two synthetic sets -- the held-out set of the acceptance
(configs/synth/heldout_teacher.yaml: checker + stripes, seed 1000) and a training-distribution set (noise + blobs,
another seed, same motions) -- frames area-resized to the model size, and for each ground-truth point visible in both
frames whose frame-t patch c is masked, the motion error |d - (p_t - p_0)| (model px) of:

  zero          d = 0
  model         argmax_d m_c(d)                          (what KL-tracing reads out)
  model_mean    sum_d m_c(d) d
  gauss_pool    argmax_d sum_r N(|c - r|; 2 cells) m_r(d) over the revealed patches r (no learning, same inputs)
  cv_oracle     argmax_d C_c(d), the cost volume at c itself: uses c's own (masked) content, so no model that
                predicts c can use it; an upper bound for a local matcher at this resolution

and the masked codes' NLL (nats/code) under m_c, under the cost-volume oracle offset (one-hot) and under d = 0: the
gap between the first two is how much the likelihood objective still rewards better motion.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from notes import machine_line, report  # bench/notes.py

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("zero", "model", "model_mean", "gauss_pool", "cv_oracle")


def measure(model, items: list[dict], mask_ratio: float, masks: int) -> dict:
    """Motion errors per method (lists, model px) and NLL per variant (lists) over all pairs (0, t)."""
    import torch

    with torch.no_grad():
        return _measure(model, items, mask_ratio, masks)


def _measure(model, items: list[dict], mask_ratio: float, masks: int) -> dict:
    import cv2
    import torch

    from teacher.sequence import sample_reveal

    S, p, g = model.config.image_size, model.config.patch, model.grid
    offs = model.offsets.float()
    err = {k: [] for k in METHODS}
    nll = {"model": [], "cv_oracle": [], "zero": []}

    def load(a):
        return torch.from_numpy(cv2.resize(a, (S, S), interpolation=cv2.INTER_AREA)).permute(2, 0, 1)[None].float()

    for it in items:
        video, pts, occ = it["video"], np.asarray(it["points"]) * S, np.asarray(it["occluded"], bool)
        for t in range(1, video.shape[0]):
            f0, f1 = load(video[0]), load(video[t])
            cv = model.cost_volume(f0, f1)[0]                                            # [P, D]
            m_r = torch.softmax(cv / model.log_tau.exp(), -1)
            for k in range(masks):
                seed = 1000 * t + k
                reveal = sample_reveal(model.num_patches, mask_ratio, seed)
                h = model.heads(f0, f1, reveal, seed)
                masked = h["masked"]
                for name, log_m in (("model", h["log_m"]),
                                    ("cv_oracle", _one_hot(cv[masked].argmax(-1), cv.shape[-1])),
                                    ("zero", _one_hot(torch.full((len(masked),), cv.shape[-1] // 2), cv.shape[-1]))):
                    nll[name].append(float(model.target_nll({**h, "log_m": log_m}).mean()))
                row = {int(c): j for j, c in enumerate(masked.tolist())}
                rev = reveal.nonzero()[:, 0]
                ry, rx = (rev // g).float(), (rev % g).float()
                for q in np.flatnonzero(~occ[:, 0] & ~occ[:, t]):
                    cy, cx = int(pts[q, t, 1] // p), int(pts[q, t, 0] // p)
                    c = cy * g + cx
                    if c not in row or not (0 <= cy < g and 0 <= cx < g):
                        continue
                    true = torch.tensor([pts[q, t, 1] - pts[q, 0, 1], pts[q, t, 0] - pts[q, 0, 0]]).float()
                    lm = h["log_m"][0, row[c]]
                    w = torch.softmax(-((ry - cy) ** 2 + (rx - cx) ** 2) / (2 * 2.0 ** 2), 0)
                    est = {"zero": torch.zeros(2), "model": offs[lm.argmax()], "model_mean": lm.exp() @ offs,
                           "gauss_pool": offs[(w @ m_r[rev]).argmax()], "cv_oracle": offs[cv[c].argmax()]}
                    for name, d in est.items():
                        err[name].append(float((d - true).norm()))
    return {"err": err, "nll": nll}


def _one_hot(idx, D: int):
    import torch

    out = torch.full((1, len(idx), D), -30.0)
    out[0, torch.arange(len(idx)), idx] = 0.0
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=str(ROOT / "teacher" / "weights" / "tiny"))
    ap.add_argument("--heldout", default=str(ROOT / "configs" / "synth" / "heldout_teacher.yaml"))
    ap.add_argument("--train-seed", type=int, default=77, help="seed of the training-distribution set")
    ap.add_argument("--mask-ratio", type=float, default=0.9)
    ap.add_argument("--masks", type=int, default=2, help="reveal draws per pair")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--notes", default=str(ROOT / "bench" / "NOTES.md"), help="NOTES.md to update ('' = none)")
    args = ap.parse_args(argv)

    import torch
    import yaml

    from pipeline import synthetic
    from teacher.checkpoints import load_any_teacher

    torch.set_num_threads(args.threads)
    machine = machine_line(args.threads)
    t0 = time.perf_counter()
    model = load_any_teacher(args.teacher)
    if not hasattr(model, "heads"):
        raise SystemExit(f"--teacher {args.teacher}: a tiny-kind bundle is needed (copy head), "
                         f"got {type(model).__name__}")
    held = yaml.safe_load(Path(args.heldout).read_text())
    train = copy.deepcopy(held)
    train.update({"seed": args.train_seed, "name_prefix": "train"})
    train["texture"] = dict(synthetic.DEFAULTS["texture"])
    sets = {"heldout": held, "train": train}
    res = {}
    with tempfile.TemporaryDirectory(prefix="fd_bench_motion_") as tmp:
        for name, cfg in sets.items():
            synthetic.write_set(Path(tmp) / name, cfg)
            res[name] = measure(model, synthetic.load_set(Path(tmp) / name), args.mask_ratio, args.masks)
    secs = time.perf_counter() - t0

    lines = ["## bench/teacher_motion.py — the tiny teacher's motion knowledge (copy head) per masked patch", "",
             f"- machine: {machine}; {secs:.0f} s",
             f"- teacher: {args.teacher}; mask ratio {args.mask_ratio}, {args.masks} reveal draws per pair",
             f"- sets: heldout = {Path(args.heldout).name}; train = the same with noise + blobs textures, "
             f"seed {args.train_seed}; pairs (0, t); errors in model px ({model.config.image_size} px frames)", "",
             f"| set | points | {' | '.join(METHODS)} | NLL model | NLL cv_oracle | NLL zero |",
             "|---|---|" + "---|" * (len(METHODS) + 3)]
    results = []
    for name, r in res.items():
        e = {k: np.asarray(v) for k, v in r["err"].items()}
        cells = " | ".join(f"{e[k].mean():.2f} (med {np.median(e[k]):.2f})" for k in METHODS)
        n = {k: float(np.mean(v)) for k, v in r["nll"].items()}
        lines.append(f"| {name} | {len(e['zero'])} | {cells} | {n['model']:.3f} | {n['cv_oracle']:.3f} | "
                     f"{n['zero']:.3f} |")
        results += [(f"motion_epe_model_{name}", e["model"].mean()), (f"motion_epe_zero_{name}", e["zero"].mean()),
                    (f"motion_epe_ratio_{name}", e["model"].mean() / e["zero"].mean()),
                    (f"nll_gap_{name}", n["model"] - n["cv_oracle"])]
    lines += ["", *[f"RESULT {k} {v:.4f}" for k, v in results]]
    report(lines, args.notes, "bench/teacher_motion.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
