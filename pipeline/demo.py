"""``flowdistill demo``: the whole pipeline on the embedded default, end to end, on a fresh machine.

1. synthesize a small procedural set with exact ground truth;
2. evaluate the weight-free flow baselines on it (TAP-Vid "first", two-frame) and print the table;
3. label its videos with the committed tiny teacher (teacher/weights/tiny) using ``label.ranks`` processes —
   each one ``flowdistill label`` with RANK / WORLD_SIZE set, exactly as torchrun or accelerate would — into a
   versioned label set, and print the label-set summary;
4. write pictures (ground truth and labels).
"""
from __future__ import annotations

import time
from pathlib import Path

DEFAULTS = {
    "out": "demo_out",
    "seed": 0,
    "synth": {"num_videos": 4, "num_frames": 12},
    "baselines": ["zero", "farneback", "dis"],
    "pictures": 4,
    "label": {
        "ranks": 2,
        "teacher": None,              # null: the committed tiny teacher (teacher/weights/tiny in the package)
        "set": "demo",
        "sampling": {"pairs_per_video": 2, "num_points": 24, "gap_frames": [1, 2]},
        # 1 mask, 1 zoom level for speed; the bundle's occlusion rule (calibrated at 5 masks / 4 zoom levels) does
        # not hold here: at these settings the round trip does not separate occlusion on the validation set, the KL
        # peak does (python bench/occ_threshold.py --rule both --num-masks 1 --zoom-levels 1); the bundle's
        # appearance check was not calibrated at these settings, so it is off too
        "tracer": {"num_masks": 1, "zoom_levels": 1, "fb_threshold": 0, "app_threshold": 0, "occ_threshold": 0.7418},
        "shard_samples": 4,
    },
}


def add_arguments(parser) -> None:
    parser.add_argument("--out", default=None, help="output folder (default: demo_out)")


def label_with_ranks(videos: Path, root: Path, lab: dict, progress: bool = False) -> Path:
    """Run ``flowdistill label`` as ``lab['ranks']`` processes (RANK / WORLD_SIZE), print each rank's summary line and
    the label-set summary; returns the label-set directory. A failing rank is an error naming its exit status."""
    import os
    import subprocess
    import sys

    from . import manifest as mf
    from .common import InputError

    cmd = [sys.executable, "-m", "pipeline.cli", "label", "--source", str(videos), "--root", str(root),
           "--set-name", lab["set"], "--teacher", str(lab["teacher"]), "--set", f"shard_samples={lab['shard_samples']}"]
    for sec in ("sampling", "tracer"):
        for k, v in lab[sec].items():
            cmd += ["--set", f"{sec}.{k}={list(v) if isinstance(v, (list, tuple)) else v}".replace(" ", "")]
    if not progress:
        cmd.append("--no-progress")
    world = int(lab["ranks"])
    procs = []
    for r in range(world):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), PYTHONUNBUFFERED="1")
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for r, p in enumerate(procs):
        text, _ = p.communicate()
        for line in text.splitlines():
            if line.startswith("label ") or "error" in line.lower():
                print("      " + line)
        if p.returncode != 0:
            raise InputError(f"label rank {r}", f"exited with status {p.returncode}:\n{text[-2000:]}")
    return mf.set_dir(root, lab["set"])


def run(args, cfg) -> int:

    from . import evaluate, inspect, synthetic
    from .common import atomic_write_json
    from .flowsources import make_flow_source

    out = Path(args.out or cfg["out"])
    t_start = time.perf_counter()

    print(f"[1/4] synthesizing {cfg['synth']['num_videos']} videos with exact ground truth → {out / 'synthetic'}")
    synth_cfg = dict(synthetic.DEFAULTS)
    synth_cfg.update(cfg["synth"])
    synth_cfg["seed"] = cfg["seed"]
    synthetic.write_set(out / "synthetic", synth_cfg)
    dataset = synthetic.load_set(out / "synthetic")

    print("[2/4] evaluating weight-free baselines (TAP-Vid 'first', two-frame, no chaining)")
    results = {}
    for name in cfg["baselines"]:
        t0 = time.perf_counter()
        results[name] = evaluate.evaluate_first_two_frame(dataset, make_flow_source(name, {}), progress=False)
        print(f"      {name}: {time.perf_counter() - t0:.1f} s")
    table = evaluate.format_table(results)
    print(table)
    atomic_write_json(out / "baselines.json", results)

    lab = dict(cfg["label"])
    if lab["teacher"] is None:
        import importlib.util

        pkg = Path(importlib.util.find_spec("teacher.checkpoints").origin).resolve().parent
        lab["teacher"] = str(pkg / "weights" / "tiny")
    import shutil

    shutil.rmtree(out / "labels", ignore_errors=True)     # the demo labels its freshly made videos from scratch
    print(f"[3/4] labeling the videos with the tiny teacher ({lab['teacher']}), {lab['ranks']} ranks "
          f"→ {out / 'labels' / lab['set']}")
    t0 = time.perf_counter()
    label_set = label_with_ranks(out / "synthetic", out / "labels", lab, progress=getattr(args, "progress", False))
    print(f"      labeling: {time.perf_counter() - t0:.1f} s")

    print("      label-set summary (flowdistill inspect):")
    inspect.inspect_path(label_set, out / "pictures" / "labels", num=cfg["pictures"], seed=cfg["seed"])
    print(f"[4/4] ground-truth pictures → {out / 'pictures' / 'synthetic'}")
    inspect.inspect_path(out / "synthetic", out / "pictures" / "synthetic", num=cfg["pictures"], seed=cfg["seed"],
                         verbose=False)
    print(f"demo finished in {time.perf_counter() - t_start:.1f} s; results in {out}")
    return 0
