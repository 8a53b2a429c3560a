"""Labeling overhead: end-to-end ``flowdistill label`` time / teacher-only time on the same work (target <= 1.10).

  python bench/label_overhead.py                    default run (micro teacher; ~2 min on a quiet 2-core
                                                    machine, ~4 min when it is shared with a training run)
  python bench/label_overhead.py --teacher teacher/weights/tiny --rounds 1     a real teacher bundle (its tracing
                                                    is ~10x slower: fewer rounds keep it to a few minutes)
  python bench/label_overhead.py --quick            smoke run (numbers not written to NOTES.md unless --notes)

What is measured, in one process, on the same synthetic videos (``pipeline.synthetic.write_set``, made first and
not timed) and the same settings:

 teacher-only  every pair's ``Tracker.track`` call (plus the ``forward_backward`` call when --fb is given) on
               frames decoded beforehand (``label.prepare_unit``, so exactly the pairs and query points the
               labeler draws); no decoding, no encoding, no writing.
 end-to-end    ``pipeline.label.run_label`` (one rank) into a fresh root: source listing, planning, the decode
               thread, the teacher in the main thread, the writer thread (JPEG encode, tar, sha256, index,
               ledger, fsync), manifest + LATEST. The teacher model is already loaded (cached per process), so
               model loading is in neither figure.

The machine is shared (other jobs come and go), so the two are interleaved: teacher-only, end-to-end, teacher-only,
..., teacher-only (``--rounds`` end-to-end runs, each in a fresh root, each bracketed by two teacher-only passes).
Headline: ``label_overhead_ratio`` = the median over rounds of (end-to-end wall / mean of the two bracketing
teacher-only passes) -- a load burst during one pass moves one round, not the median; ``label_overhead_ratio_sum``
= sum of end-to-end walls / sum of the bracketing means. Two figures that load drift hardly touches: CPU time
(``time.process_time``, all threads of the process) end-to-end / teacher-only, i.e. the work the pipeline adds; and
within each end-to-end run, wall / the teacher's own time in it (``summary.seconds_model``), i.e. how much of the
run is not the model (a lower bound when no core is free: the teacher's wall time then includes slices taken by
the other threads).
Also the non-model stages alone (decode = ``prepare_unit`` per video; write = the same samples through
``ShardWriter`` into a throwaway dir), i.e. what a purely serial labeler would add. The labels written end-to-end
are compared with the teacher-only outputs (same tracks expected: same frames, queries, model, threads).
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


def result(name, value):
    RESULTS.append((name, float(value)))


def decode_all(units: dict, cfg: dict):
    """Decode every unit the way the labeler does; returns (works, seconds)."""
    from pipeline.label import prepare_unit

    t = time.perf_counter()
    works = []
    for item in units.values():
        work = prepare_unit(item, cfg)
        if work.error is not None:
            raise SystemExit(f"bench: could not decode {item.uri}: {work.error}")
        works.append(work)
    return works, time.perf_counter() - t


def teacher_pass(works: list, cfg: dict, tracker, keep: bool):
    """Time only the teacher calls on pre-decoded units. Returns (wall s, cpu s, pairs, queries, outputs
    {key: (work, t0, t1, f0, f1, tracks)} when keep)."""
    from pipeline.label import forward_backward
    from pipeline.schema import make_key

    pairs = queries = 0
    outputs = {}
    fb = cfg["forward_backward"]
    wall = cpu = 0.0
    for work in works:
        for t0, t1, f0, f1, q in work.pairs:
            t, c = time.perf_counter(), time.process_time()
            p1, vis, score = tracker.track(f0, f1, q)
            if fb["enabled"]:
                vis, _ = forward_backward(tracker.track, f0, f1, q, p1, vis, fb["threshold_px"])
            wall += time.perf_counter() - t
            cpu += time.process_time() - c
            pairs += 1
            queries += len(q)
            if keep:
                tracks = np.concatenate([q.astype(np.float32), p1, vis[:, None].astype(np.float32),
                                         np.nan_to_num(score, nan=0.0, posinf=1e6, neginf=-1e6)[:, None]], 1)
                outputs[make_key(work.item.id, t0, t1)] = (work, t0, t1, f0, f1, tracks.astype(np.float32))
    return wall, cpu, pairs, queries, outputs


def write_only(outputs: dict, cfg: dict, out_dir: Path) -> float:
    """Seconds to encode + write the given samples the way the labeler's writer does (shards closed at unit
    boundaries once they hold shard_samples), without ledger lines."""
    from pipeline.schema import LabelSample, make_meta
    from pipeline.shards import ShardWriter

    teacher = {"id": "bench", "checkpoint_sha256": "0" * 64, "config_hash": "0" * 16}
    t = time.perf_counter()
    w = ShardWriter(out_dir, prefix="labels-0", maxcount=1 << 30, maxsize=float(1 << 60),
                    image_format=cfg["image_format"], quality=cfg["quality"])
    last_unit = None
    for key, (work, t0, t1, f0, f1, tracks) in outputs.items():
        if last_unit is not None and work.item.id != last_unit and w.open_samples >= int(cfg["shard_samples"]):
            w.end_shard()
        last_unit = work.item.id
        meta = make_meta(video_id=work.item.id, source=str(work.item.uri), t0=t0, t1=t1, fps=work.fps,
                         orig_size=work.orig_size, teacher=teacher, tracer={"method": "kl"}, label_set="bench",
                         version="v0001", rank=0, created="2025-01-01T00:00:00Z")
        w.write(LabelSample(key, f0, f1, tracks, meta))
    w.close()
    return time.perf_counter() - t


def compare_labels(vdir: Path, outputs: dict) -> tuple[int, int, float]:
    """(samples compared, samples with identical tracks, max |diff|) between the written labels and the
    teacher-only outputs."""
    from pipeline import manifest as mf
    from pipeline.shards import iter_samples

    n = same = 0
    worst = 0.0
    for e in mf.shard_entries(vdir):
        for s in iter_samples(vdir / e["shard"]):
            ref = outputs.get(s.key)
            if ref is None:
                continue
            n += 1
            d = float(np.nanmax(np.abs(s.tracks - ref[5]))) if s.tracks.shape == ref[5].shape else float("inf")
            worst = max(worst, d)
            same += int(d == 0.0)
    return n, same, worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=None,
                    help="teacher bundle dir (default: a random micro teacher, teacher.checkpoints.write_micro_teacher)")
    ap.add_argument("--videos", type=int, default=3, help="synthetic videos (work units)")
    ap.add_argument("--frames", type=int, default=16, help="frames per video")
    ap.add_argument("--size", type=int, default=256, help="video side (px); frames are stored at this size")
    ap.add_argument("--pairs", type=int, default=3, help="sampling.pairs_per_video")
    ap.add_argument("--points", type=int, default=16, help="sampling.num_points (query points per pair)")
    ap.add_argument("--rounds", type=int, default=5, help="end-to-end runs (each between two teacher-only passes)")
    ap.add_argument("--shard-samples", type=int, default=4, help="label shard_samples (close shards this often)")
    ap.add_argument("--image-format", default="jpg", choices=("jpg", "png"))
    ap.add_argument("--fb", type=float, default=None, metavar="PX",
                    help="enable the forward-backward check at this threshold (in both measurements)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (label 'threads')")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 videos x 2 pairs x 8 points, 1 round")
    ap.add_argument("--scratch", default=None,
                    help="work dir (default: a fresh /tmp/fd_bench_label_overhead_* removed at the end); "
                         "videos and the micro teacher there are reused, label roots are always fresh")
    ap.add_argument("--notes", default=None, help="NOTES.md to update (default: bench/NOTES.md unless --quick)")
    args = ap.parse_args(argv)
    argv_used = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.videos, args.pairs, args.points, args.frames, args.rounds = 2, 2, 8, 8, 1
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")

    import torch

    from pipeline import label, synthetic
    from pipeline.common import ErrorLog
    from pipeline.dist import RankInfo

    torch.set_num_threads(args.threads)
    machine = machine_line(args.threads)
    t_start = time.perf_counter()
    own_scratch = args.scratch is None
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="fd_bench_label_overhead_", dir="/tmp"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        if args.teacher is None:
            from teacher.checkpoints import write_micro_teacher

            teacher_dir, teacher_name = write_micro_teacher(scratch / "micro_teacher"), "micro random teacher (write_micro_teacher)"
        else:
            teacher_dir, teacher_name = Path(args.teacher), f"bundle {args.teacher}"
        vids = scratch / f"videos_{args.videos}x{args.frames}_{args.size}"
        t = time.perf_counter()
        synthetic.write_set(vids, {"num_videos": args.videos, "num_frames": args.frames,
                                   "size": [args.size, args.size], "name_prefix": "ovh", "seed": 7})
        synth_s = time.perf_counter() - t
        cfg = copy.deepcopy(label.DEFAULTS)
        cfg.update(sources=[str(vids)], root=str(scratch / "roots" / "r0"), set="overhead", teacher=str(teacher_dir),
                   progress=False, threads=args.threads, shard_samples=args.shard_samples,
                   image_format=args.image_format, max_side=max(256, args.size))
        cfg["sampling"].update(pairs_per_video=args.pairs, num_points=args.points)
        if args.fb is not None:
            cfg["forward_backward"] = {"enabled": True, "threshold_px": float(args.fb)}
        cfg = label.check_config(cfg)
        units = label.list_units(cfg["sources"], ErrorLog(None))
        tracker = label.Tracker(cfg)                 # loads the model (cached for run_label's own Tracker)
        works, decode_s = decode_all(units, cfg)
        for t0, t1, f0, f1, q in works[0].pairs[:1]:  # warm-up call, not counted
            tracker.track(f0, f1, q)
        print(f"teacher: {teacher_name}; {len(units)} videos x {args.pairs} pairs x {args.points} points, "
              f"{args.size}px, {args.frames} frames; {args.rounds} round(s); scratch {scratch}", flush=True)

        passes = []                                  # (wall, cpu) of each teacher-only pass
        runs = []                                    # (wall, cpu, summary) of each end-to-end run
        outputs = {}
        pairs = queries = 0
        for r in range(args.rounds + 1):
            w, c, pairs, queries, out = teacher_pass(works, cfg, tracker, keep=(r == 0))
            outputs = outputs or out
            passes.append((w, c))
            print(f"teacher-only pass {r}: {w:.2f} s wall, {c:.2f} s cpu ({pairs} pairs)", flush=True)
            if r == args.rounds:
                break
            rcfg = {**cfg, "root": str(scratch / "roots" / f"r{r}")}
            t, c0 = time.perf_counter(), time.process_time()
            summary = label.run_label(rcfg, RankInfo())
            runs.append((time.perf_counter() - t, time.process_time() - c0, summary, rcfg))
            print(f"end-to-end run {r}: {runs[-1][0]:.2f} s wall, {runs[-1][1]:.2f} s cpu  "
                  f"({label.format_summary(summary)})", flush=True)

        wdir = scratch / f"writeonly_{time.monotonic_ns()}"
        write_s = write_only(outputs, cfg, wdir)
        shutil.rmtree(wdir, ignore_errors=True)
        last = runs[-1]
        vdir = Path(last[3]["root"]) / cfg["set"] / last[2]["version"]
        n_cmp, n_same, worst = compare_labels(vdir, outputs)
        for _, _, summ, _ in runs:
            if summ["pairs"] != pairs or summ["queries"] != queries or summ.get("units_failed"):
                print(f"WARNING: end-to-end labelled {summ['pairs']} pairs / {summ['queries']} queries, "
                      f"teacher-only {pairs} / {queries}; failed units {summ.get('units_failed')}")

        brackets = [(passes[i][0] + passes[i + 1][0]) / 2 for i in range(len(runs))]
        cpu_brackets = [(passes[i][1] + passes[i + 1][1]) / 2 for i in range(len(runs))]
        e2e = [x[0] for x in runs]
        e2e_cpu = [x[1] for x in runs]
        model_in_run = [x[2]["seconds_model"] for x in runs]
        per_round = [e / b for e, b in zip(e2e, brackets)]
        ratio = sum(e2e) / sum(brackets)
        cpu_ratio = sum(e2e_cpu) / sum(cpu_brackets)
        in_run = sum(e2e) / sum(model_in_run)
        teacher_s = float(np.mean([p[0] for p in passes]))
        tw = [p[0] for p in passes]
        spread = (max(tw) - min(tw)) / teacher_s
        serial = (teacher_s + decode_s + write_s) / teacher_s
        total = time.perf_counter() - t_start
        rows = [
            ("teacher-only passes (wall)", teacher_s,
             "passes " + ", ".join(f"{x:.2f}" for x in tw) + f" s (spread {100 * spread:.0f}% of the mean)"),
            ("teacher-only passes (cpu)", float(np.mean([p[1] for p in passes])),
             "passes " + ", ".join(f"{p[1]:.2f}" for p in passes) + " s"),
            ("end-to-end run_label (wall)", float(np.mean(e2e)),
             "runs " + ", ".join(f"{x:.2f}" for x in e2e) + " s; ratio per round "
             + ", ".join(f"{x:.3f}" for x in per_round) + f"; median {np.median(per_round):.3f}, "
             f"sum/sum {ratio:.3f}"),
            ("end-to-end run_label (cpu)", float(np.mean(e2e_cpu)),
             "runs " + ", ".join(f"{x:.2f}" for x in e2e_cpu) + f" s; cpu ratio {cpu_ratio:.3f}"),
            ("  teacher time inside the runs", float(np.mean(model_in_run)),
             f"run wall / its own teacher time {in_run:.3f}"),
            ("  non-model time inside the runs", float(np.mean([e - m for e, m in zip(e2e, model_in_run)])),
             "setup, waiting for decode, handing samples to the writer, finalize"),
            ("decode alone (prepare_unit)", decode_s, f"{1000 * decode_s / len(units):.0f} ms/video"),
            ("encode + write alone (ShardWriter)", write_s, f"{1000 * write_s / max(pairs, 1):.1f} ms/sample"),
            ("serial estimate teacher+decode+write", teacher_s + decode_s + write_s, f"ratio {serial:.3f}"),
        ]
        head = f"{'stage':<40} {'seconds':>8}  note"
        tab = "\n".join([head, "-" * 110] + [f"{a:<40} {b:8.2f}  {c}" for a, b, c in rows])
        reading = (
            "Reading: the pipeline's extra work is decoding and encoding/writing: end-to-end CPU time (all threads) "
            f"differs from teacher-only by {100 * (cpu_ratio - 1):+.1f}% "
            f"(decode alone {100 * decode_s / teacher_s:.1f}%, "
            f"encode + write alone {100 * write_s / teacher_s:.1f}% of the teacher time). The process got "
            f"{100 * sum(e2e_cpu) / sum(e2e):.0f}% of a core during the end-to-end runs (CPU / wall; teacher-only "
            f"passes {100 * sum(p[1] for p in passes) / sum(tw):.0f}%). When a second core is free, decoding and "
            "writing run behind the teacher and the wall ratio approaches 1 + (the first video's decode + "
            "finalization) / teacher; when none is (this 2-core machine is shared with a training run and other "
            "jobs), the decode and writer threads take CPU from the teacher -- the run's seconds_model (wall time "
            "inside Tracker.track) then includes time lost to them, so the in-run ratio understates -- and the wall "
            "ratio tends to the serial estimate, plus the load swings between passes (teacher-only passes spread "
            f"{100 * spread:.0f}% here). With the labeler's default 256 points per pair "
            f"({256 / args.points:.0f}x the teacher work per pair used here) and the real tiny teacher (~10x slower "
            "tracing) the non-model share shrinks accordingly.")
        print(tab)
        print(reading)
        print(f"labels: {n_same} of {n_cmp} samples with tracks identical to teacher-only (max |diff| {worst:.3g})")
        print(f"machine: {machine}; total {total:.0f} s (synthetic videos {synth_s:.0f} s)")
        result("label_overhead_ratio", float(np.median(per_round)))
        result("label_overhead_ratio_sum", ratio)
        result("label_overhead_cpu_ratio", cpu_ratio)
        result("label_overhead_in_run_ratio", in_run)
        result("label_overhead_serial_estimate", serial)
        result("label_teacher_only_spread", spread)
        result("label_teacher_only_s", teacher_s)
        result("label_end_to_end_s", float(np.mean(e2e)))
        result("label_decode_ms_per_video", 1000 * decode_s / len(units))
        result("label_write_ms_per_sample", 1000 * write_s / max(pairs, 1))
        for name, value in RESULTS:
            print(f"RESULT {name} {value:.4g}")
        notes = args.notes if args.notes is not None else (None if args.quick else str(ROOT / "bench" / "NOTES.md"))
        if notes:
            cmd = " ".join(["python bench/label_overhead.py", *[a for a in argv_used]])
            text = [
                "## bench/label_overhead.py — labeling pipeline overhead over the teacher",
                "",
                f"Run: `{cmd}` ({time.strftime('%Y-%m-%d')}, {total:.0f} s). Machine: {machine}.",
                "",
                f"Work: {teacher_name}; {len(units)} synthetic videos ({args.size}x{args.size}, {args.frames} frames, "
                f"mp4) x {args.pairs} pairs x {args.points} query points = {pairs} pairs, {queries} queries; "
                f"{cfg['image_format']} frames (q{cfg['quality']}), shard_samples {cfg['shard_samples']}, "
                f"forward-backward {'on @ %g px' % args.fb if args.fb is not None else 'off'}. Teacher-only = the same "
                "pairs' `Tracker.track` calls on frames decoded beforehand (no decode, no writing); end-to-end = "
                "`pipeline.label.run_label` (one rank, fresh root, model already loaded). They alternate "
                f"(teacher-only, end-to-end, ..., teacher-only: {args.rounds} end-to-end runs, each compared with the "
                "mean of the two passes around it). Decode / write alone are the non-model stages timed on their own.",
                "",
                "```",
                tab,
                "```",
                "",
                f"Written labels vs teacher-only outputs: {n_same} of {n_cmp} samples identical (max |diff| "
                f"{worst:.3g}).",
                "",
                *textwrap.wrap(reading, 115),
                "",
                "```",
                *[f"RESULT {n} {v:.4g}" for n, v in RESULTS],
                "```",
            ]
            write_notes(Path(notes), "\n".join(text), "bench/label_overhead.py")
            print(f"notes -> {notes}")
        return 0
    finally:
        if own_scratch:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
