"""``flowdistill demo``: the whole pipeline on the embedded default, end to end, on a fresh machine.

Stage 1 (foundation): synthesize a small procedural set with exact ground truth, evaluate the
weight-free flow baselines on it (TAP-Vid "first", two-frame), print the table, write pictures.
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
}


def add_arguments(parser) -> None:
    parser.add_argument("--out", default=None, help="output folder (default: demo_out)")


def run(args, cfg) -> int:

    from . import evaluate, inspect, synthetic
    from .common import atomic_write_json
    from .flowsources import make_flow_source

    out = Path(args.out or cfg["out"])
    t_start = time.perf_counter()

    print(f"[1/3] synthesizing {cfg['synth']['num_videos']} videos with exact ground truth → {out / 'synthetic'}")
    synth_cfg = dict(synthetic.DEFAULTS)
    synth_cfg.update(cfg["synth"])
    synth_cfg["seed"] = cfg["seed"]
    synthetic.write_set(out / "synthetic", synth_cfg)
    dataset = synthetic.load_set(out / "synthetic")

    print("[2/3] evaluating weight-free baselines (TAP-Vid 'first', two-frame, no chaining)")
    results = {}
    for name in cfg["baselines"]:
        t0 = time.perf_counter()
        results[name] = evaluate.evaluate_first_two_frame(dataset, make_flow_source(name, {}), progress=False)
        print(f"      {name}: {time.perf_counter() - t0:.1f} s")
    table = evaluate.format_table(results)
    print(table)
    atomic_write_json(out / "baselines.json", results)

    print(f"[3/3] pictures → {out / 'pictures'}")
    inspect.inspect_path(out / "synthetic", out / "pictures", num=cfg["pictures"], seed=cfg["seed"])
    print(f"demo finished in {time.perf_counter() - t_start:.1f} s; results in {out}")
    return 0
