"""``flowdistill label``: sources -> decode -> pairs + queries -> teacher -> versioned webdataset shards.

One process per rank (``pipeline.dist.resolve_rank``: torchrun / accelerate, Slurm tasks, Slurm job arrays).
Every rank lists the same sources; a work unit (one video) belongs to the rank its id hashes to
(``dist.owner``), so a stopped run resumes correctly with any number of ranks. Per rank, three stages overlap:

    decode thread  ──(bounded queue, ``prefetch`` units)──▶  teacher (main thread)  ──(queue)──▶  writer thread
    open, sample pairs + queries, read frames                KL-tracing per pair                encode, write tar

A unit's samples are all computed before any is written (a unit that fails half-way writes nothing and is
recorded in ``errors-<rank>.jsonl``); shards are closed only at unit boundaries, once they hold
``shard_samples`` samples or more, and a unit's ledger line is appended after its shard is closed and indexed
(``pipeline.manifest`` owns the layout and the recovery rules). When every unit of the sources is done or
failed, the rank that notices writes the version's ``manifest.json`` and moves ``LATEST``.

Sample content is a function of (video bytes, seed, sampling, teacher, tracer) only: per-video and per-pair
seeds come from ``sampling.derive_seed`` and ``meta.created`` is the version's creation time, so the same
inputs give the same samples whatever the rank count (``meta.rank`` names the producer and is the only field
that differs; ``manifest.sample_content_hash`` leaves it out). Bitwise equality across runs also needs the same
device and ``threads`` (float reductions depend on them).

Exit status: 0 when every unit is done, ``FAILED_EXIT_BASE + n`` (n capped at 63) when n inputs failed on this
rank, 2 for bad configuration or an unwritable output, 143 when stopped by SIGTERM (resume by running again).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import manifest as mf
from .common import ErrorLog, InputError, atomic_write_json, config_hash
from .dist import RankInfo, owner, resolve_rank
from .sampling import DEFAULTS as SAMPLING_DEFAULTS, derive_seed, sample_pairs, sample_queries
from .schema import LabelSample, make_key, make_meta
from .teacher_sources import ENGINE_DEFAULTS, TRACER_DEFAULTS

FAILED_EXIT_BASE = 64

DEFAULTS: dict[str, Any] = {
    "sources": [],                    # video source specs (pipeline.sources), e.g. ["clips:", "videos/*.mp4"]
    "set": "default",                 # label set name: <root>/<set>/v0001, ...
    "root": "shards/labels",          # label sets live here
    "teacher": "teacher/weights/tiny",  # teacher bundle directory (teacher.json + weights)
    "method": "kl",                   # kl (KL-tracing) | rgb (the RGB-difference variant)
    "device": "cpu",
    "bf16": False,                    # LRAS under bf16 autocast (GPU)
    "threads": 1,                     # torch CPU threads per rank (same value -> bitwise equal labels)
    "tracer": dict(TRACER_DEFAULTS),  # KLTraceConfig; a value differing from the default overrides the bundle's
    "engine": dict(ENGINE_DEFAULTS),  # KLEngine settings (LRAS bundles; tiny teachers run the naive method)
    "sampling": copy.deepcopy(SAMPLING_DEFAULTS),
    "seed": 0,                        # base seed of pair / query sampling
    "max_side": 256,                  # frames are decoded with the longer side at most this; stored at that size
    "image_format": "jpg",            # jpg | png (frames in the shards)
    "quality": 95,
    "shard_samples": 64,              # close a shard at the first unit boundary at or past this many samples
    "prefetch": 2,                    # decoded units waiting for the teacher (bounded queue)
    "forward_backward": {"enabled": False, "threshold_px": 2.0},  # round-trip check (see forward_backward)
    "retry_failed": False,            # label units recorded as failed again
    "keep_old": False,                # new version: label only units the previous version lacks, keep its shards
    "progress": True,
}


# ------------------------------------------------------------------------------------------------ config

def check_config(cfg: dict) -> dict:
    cfg = copy.deepcopy(cfg)
    if isinstance(cfg.get("sources"), str):
        cfg["sources"] = [cfg["sources"]]
    if not isinstance(cfg.get("sources"), list) or not cfg["sources"]:
        raise InputError("sources", "give one or more video source specs (--set sources=[...] or --source)")
    if cfg["method"] not in ("kl", "rgb"):
        raise InputError("method", f"must be kl or rgb, got {cfg['method']!r}")
    for k in ("threads", "max_side", "shard_samples", "prefetch"):
        v = cfg[k]
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise InputError(k, f"must be a positive integer, got {v!r}")
    if cfg["image_format"] not in ("jpg", "png"):
        raise InputError("image_format", "must be jpg or png")
    fb = cfg["forward_backward"]
    if not isinstance(fb, dict) or set(fb) - {"enabled", "threshold_px"}:
        raise InputError("forward_backward", "must be {enabled: bool, threshold_px: number}")
    fb = {**DEFAULTS["forward_backward"], **fb}
    if not float(fb["threshold_px"]) > 0:
        raise InputError("forward_backward.threshold_px", "must be > 0")
    cfg["forward_backward"] = fb
    unknown = set(cfg["sampling"]) - set(SAMPLING_DEFAULTS)
    if unknown:
        raise InputError("sampling", f"unknown key(s) {sorted(unknown)}")
    mf.set_dir(cfg["root"], cfg["set"])           # validates the set name
    return cfg


def teacher_record(cfg: dict) -> tuple[dict, dict]:
    """(meta.teacher {id, checkpoint_sha256, config_hash}, effective tracer settings) without loading weights."""
    from types import SimpleNamespace

    from teacher.checkpoints import CheckpointError, read_bundle_meta

    from .teacher_sources import tracer_config

    d = Path(str(cfg["teacher"])).expanduser()
    try:
        meta = read_bundle_meta(d)
    except CheckpointError as e:
        raise InputError(d, str(e)) from None
    tracer = tracer_config(SimpleNamespace(bundle_tracer=meta.get("tracer") or {}), cfg["tracer"], "tracer")
    tdict = tracer.to_dict()
    tdict["method"] = cfg["method"]
    sha = meta.get("sha256") or {}
    ck = sha if isinstance(sha, str) else config_hash(sha)
    cfg_part = {k: meta.get(k) for k in ("kind", "config", "lras_config", "lpq_config", "layout", "image_size")}
    return {"id": str(meta.get("teacher_id")), "checkpoint_sha256": str(ck), "config_hash": config_hash(cfg_part)}, tdict


def version_settings(cfg: dict, teacher: dict, tracer: dict) -> tuple[dict, dict]:
    """(identity, settings recorded in version.json). The sampling part covers everything that decides which
    frames and points a sample holds; the tracer part everything that decides its tracks."""
    tracer_part = {**tracer, "forward_backward": cfg["forward_backward"], "engine": cfg["engine"]}
    sampling_part = {"sampling": {**SAMPLING_DEFAULTS, **cfg["sampling"]}, "seed": cfg["seed"],
                     "max_side": cfg["max_side"], "image_format": cfg["image_format"], "quality": cfg["quality"]}
    ident = mf.identity(teacher["id"], tracer_part, sampling_part)
    return ident, {"teacher": teacher, "tracer": tracer_part, "sampling": sampling_part,
                   "teacher_dir": str(cfg["teacher"])}


# ------------------------------------------------------------------------------------------------ planning

@dataclass
class Plan:
    set_dir: Path
    version: str | None            # None: a new version will be created (dry run)
    new_version: bool
    reason: str
    base: str | None
    identity: dict
    settings: dict
    units: dict                    # unit id -> uri, every unit of the sources
    todo: list                     # unit ids to label (all ranks)
    done: int
    failed: int
    source_errors: list = field(default_factory=list)

    def describe(self) -> str:
        v = self.version or "(new)"
        lines = [f"label set {self.set_dir}: version {v} — {self.reason}",
                 f"  units in sources: {len(self.units)}; done {self.done}; failed {self.failed}; "
                 f"to label: {len(self.todo)}" + (f"; keeping {self.base}'s labels" if self.base else "")]
        lines += [f"  + {u}  {self.units[u]}" for u in self.todo]
        lines += [f"  ! source error: {e['input']}: {e['reason']}" for e in self.source_errors]
        return "\n".join(lines)


def list_units(sources, errors: ErrorLog | None) -> dict:
    """unit id -> VideoItem for every video the sources name (bad inputs recorded in ``errors``)."""
    from .sources import iter_videos

    return {item.id: item for item in iter_videos(sources, errors=errors)}


def make_plan(cfg: dict, create: bool, units: dict | None = None) -> Plan:
    """What a run would do: the target version (existing one with this identity, else a new one) and the units to
    label. ``create`` publishes a new version directory when one is needed."""
    teacher, tracer = teacher_record(cfg)
    ident, settings = version_settings(cfg, teacher, tracer)
    sdir = mf.set_dir(cfg["root"], cfg["set"])
    src_errors = ErrorLog(None)
    if units is None:
        units = list_units(cfg["sources"], src_errors)
    existing = mf.find_version(sdir, ident)
    cur = mf.latest(sdir)
    base = None
    if existing is not None:
        reason = f"same teacher and configs as {existing}: label the units it lacks"
        version = existing
        base = mf.read_version(sdir / existing).get("base")
        new = False
    else:
        prev = cur or (mf.list_versions(sdir)[-1] if mf.list_versions(sdir) else None)
        if prev is None:
            reason = "no version yet: label everything"
        else:
            old = mf.read_version(sdir / prev)["identity"]
            changed = [k.replace("_hash", "").replace("_id", "") for k in ident if ident[k] != old.get(k)]
            reason = f"{', '.join(changed)} changed since {prev}: new version, " + \
                     ("label only units it lacks (--keep-old)" if cfg["keep_old"] else "relabel everything")
            if cfg["keep_old"]:
                base = prev
        version, new = None, True
        if create:
            version, created = mf.resolve_version(sdir, ident, settings, base=base)
            new = created
            if not created:        # another rank created it first (same identity)
                base = mf.read_version(sdir / version).get("base")
    if version is not None:
        done, failed = mf.covered_units(sdir, version)
    elif base is not None:
        done, failed = mf.covered_units(sdir, base)
    else:
        done, failed = {}, {}
    skip = set(done) | (set() if cfg["retry_failed"] else set(failed))
    todo = [u for u in units if u not in skip]
    return Plan(sdir, version, new, reason, base, ident, settings, {u: it.uri for u, it in units.items()}, todo,
                sum(u in done for u in units), sum(u in failed and u not in done for u in units), src_errors.records)


# ------------------------------------------------------------------------------------------------ teacher

class Tracker:
    """The teacher as ``track(frame0, frame1, points) -> (targets [N,2], visible [N], score [N])``, timing its
    calls (``seconds``) — the 'model' share of the run."""

    def __init__(self, cfg: dict):
        from .flowsources import make_flow_source

        name = "kltrace" if cfg["method"] == "kl" else "rgbdiff"
        opts = {"teacher": cfg["teacher"], "device": cfg["device"], "bf16": cfg["bf16"], "threads": cfg["threads"],
                "tracer": cfg["tracer"]}
        if name == "kltrace":
            opts["engine"] = cfg["engine"]
        self.source = make_flow_source(name, opts)
        self.seconds = 0.0
        self.calls = 0

    def track(self, frame0: np.ndarray, frame1: np.ndarray, points: np.ndarray):
        t = time.perf_counter()
        targets, visible = self.source.track(frame0, frame1, points)
        score = self.source.last_result.score.numpy().astype(np.float32)
        self.seconds += time.perf_counter() - t
        self.calls += 1
        return targets.astype(np.float32), visible.astype(bool), score


def forward_backward(track, frame0: np.ndarray, frame1: np.ndarray, p0: np.ndarray, p1: np.ndarray,
                     visible: np.ndarray, threshold_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Round-trip check: trace the predicted targets p1 back from frame1 to frame0 (p0' = track(frame1, frame0,
    p1)); a point is kept visible only if ||p0' - p0|| <= threshold_px. Returns (visible, round-trip error px).
    Scores are not changed. Points whose target left the frame are traced from the clamped position."""
    h, w = frame1.shape[:2]
    q = np.stack([np.clip(p1[:, 0], 0.5, w - 0.5), np.clip(p1[:, 1], 0.5, h - 0.5)], 1).astype(np.float32)
    back, _, _ = track(frame1, frame0, q)
    err = np.linalg.norm(back - p0, axis=1)
    return visible & (err <= float(threshold_px)), err.astype(np.float32)


# ------------------------------------------------------------------------------------------------ work

@dataclass
class UnitWork:
    item: Any
    fps: float = 0.0
    orig_size: tuple = (0, 0)
    pairs: list = field(default_factory=list)     # (t0, t1, frame0, frame1, queries)
    error: BaseException | None = None


def prepare_unit(item, cfg: dict) -> UnitWork:
    """Decode one video: its pairs, their frames and query points (seeded by the video id)."""
    from .decode import open_video

    work = UnitWork(item)
    try:
        with open_video(item, max_side=cfg["max_side"]) as reader:
            work.fps = float(reader.fps)
            work.orig_size = (int(reader.orig_width), int(reader.orig_height))
            pairs = sample_pairs(reader.num_frames, reader.fps, cfg["sampling"],
                                 derive_seed(cfg["seed"], "pairs", item.id), shots=item.shots)
            ts = sorted({t for p in pairs for t in p})
            frames = dict(zip(ts, reader.read(ts))) if ts else {}
        for t0, t1 in pairs:
            f0, f1 = frames[t0], frames[t1]
            q = sample_queries(f0, cfg["sampling"], derive_seed(cfg["seed"], "queries", item.id, t0, t1))
            work.pairs.append((int(t0), int(t1), f0, f1, q))
    except Exception as e:                      # recorded by the caller; the run goes on
        work.error = e
        work.pairs = []
    return work


def label_unit(work: UnitWork, tracker, cfg: dict, plan: Plan, teacher: dict, rank: int, created: str):
    """LabelSamples of one decoded unit (all pairs, or an exception: nothing partial)."""
    samples = []
    fb = cfg["forward_backward"]
    tracer_meta = plan.settings["tracer"]
    for t0, t1, f0, f1, q in work.pairs:
        p1, vis, score = tracker.track(f0, f1, q)
        extra = {}
        if fb["enabled"]:
            before = vis
            vis, _ = forward_backward(tracker.track, f0, f1, q, p1, vis, fb["threshold_px"])
            extra["fb_rejected"] = int((before & ~vis).sum())
        tracks = np.concatenate([q.astype(np.float32), p1, vis[:, None].astype(np.float32),
                                 np.nan_to_num(score, nan=0.0, posinf=1e6, neginf=-1e6)[:, None]], 1)
        meta = make_meta(video_id=work.item.id, source=str(work.item.uri), t0=t0, t1=t1, fps=work.fps,
                         orig_size=work.orig_size, teacher=teacher, tracer=tracer_meta, label_set=plan.set_dir.name,
                         version=plan.version, rank=rank, created=created, **extra)
        samples.append(LabelSample(make_key(work.item.id, t0, t1), f0, f1, tracks.astype(np.float32), meta))
    return samples


class _Writer(threading.Thread):
    """Consumes (unit id, uri, samples) and writes them; closes shards at unit boundaries; appends ledger lines."""

    def __init__(self, vdir: Path, rank: int, cfg: dict, start_shard: int):
        super().__init__(daemon=True, name=f"label-writer-{rank}")
        from .shards import ShardWriter

        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.vdir, self.rank, self.cfg = vdir, rank, cfg
        self.pending: list[dict] = []
        self.error: BaseException | None = None
        self.units_done = 0
        self.samples = 0
        self.points = 0
        self.writer = ShardWriter(vdir, prefix=mf.prefix_for(rank), maxcount=1 << 30, maxsize=float(1 << 60),
                                  image_format=cfg["image_format"], quality=cfg["quality"],
                                  start_shard=start_shard, on_shard_closed=self._closed)

    def _closed(self, entry: dict) -> None:
        recs = [{**r, "shard": entry["shard"]} for r in self.pending]
        mf.append_jsonl(mf.ledger_path(self.vdir, self.rank), recs)
        self.units_done += len(recs)
        self.pending = []

    def run(self) -> None:
        try:
            while True:
                job = self.q.get()
                if job is None:
                    break
                unit, uri, samples = job
                rec = {"unit": unit, "uri": uri, "status": "done", "samples": len(samples),
                       "points": int(sum(s.tracks.shape[0] for s in samples)), "rank": self.rank}
                if not samples:                    # nothing to wait for: done now
                    mf.append_jsonl(mf.ledger_path(self.vdir, self.rank), [rec])
                    self.units_done += 1
                    continue
                for s in samples:
                    self.writer.write(s)
                self.samples += len(samples)
                self.points += rec["points"]
                self.pending.append(rec)
                if self.writer.open_samples >= int(self.cfg["shard_samples"]):
                    self.writer.end_shard()
            self.writer.close()
        except BaseException as e:             # disk full, unwritable directory, ...
            self.error = e
            self.writer.abort()
            while True:                         # unblock the producer
                try:
                    if self.q.get_nowait() is None:
                        break
                except queue.Empty:
                    break

    def put(self, job) -> None:
        """Queue a job; a no-op once the thread has stopped (on an error the caller reads ``error``)."""
        while self.is_alive():
            try:
                self.q.put(job, timeout=0.5)
                return
            except queue.Full:
                continue


class _Stop(Exception):
    pass


@contextlib.contextmanager
def _writing(vdir: Path):
    """An OSError while writing the version's files (disk full, read-only, ...) -> InputError naming it."""
    try:
        yield
    except OSError as e:
        raise InputError(vdir, f"cannot write the output directory: {e}") from None


def _on_sigterm(signum, frame):
    raise _Stop(f"signal {signum}")


def run_label(cfg: dict, info: RankInfo | None = None, *, create: bool = True) -> dict:
    """Label this rank's share of the missing units; returns the run summary (also written as JSON)."""
    cfg = check_config(cfg)
    info = info or resolve_rank()
    if cfg["threads"] is not None:
        import torch

        torch.set_num_threads(int(cfg["threads"]))
    t_start = time.perf_counter()
    src_errors = ErrorLog(None)
    units = list_units(cfg["sources"], src_errors)
    plan = make_plan(cfg, create=create, units=units)
    sdir, vname = plan.set_dir, plan.version
    vdir = sdir / vname
    try:
        probe = vdir / f".write-test-{info.rank}-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError(vdir, f"output directory is not writable: {e}") from None
    vinfo = mf.read_version(vdir)
    created = vinfo["created"]
    with _writing(vdir):
        cleaned = mf.clean_prefix(vdir, info.rank)
        if info.rank == 0:
            for r in mf.stale_prefixes(vdir, info.world):
                mf.clean_prefix(vdir, r)
    teacher = vinfo["teacher"]
    mine = [u for u in plan.todo if owner(u, info.world) == info.rank]
    errors = ErrorLog(mf.errors_path(vdir, info.rank))
    if info.rank == 0:
        with _writing(vdir):
            for rec in src_errors.records:
                errors.record(rec["input"], rec["reason"], unit=None, stage="sources")
    source_failed = len(src_errors.records) if info.rank == 0 else 0   # bad inputs that never became a unit
    failed_here = 0

    if str(cfg["device"]) == "cuda":              # several ranks per machine: one GPU each, by local rank
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() > 1:
            cfg["device"] = f"cuda:{info.local_rank % torch.cuda.device_count()}"
    tracker = Tracker(cfg) if mine else None
    writer = _Writer(vdir, info.rank, cfg, cleaned["next_shard"])
    writer.start()
    work_q: queue.Queue = queue.Queue(maxsize=int(cfg["prefetch"]))
    stop = threading.Event()

    def produce():
        for u in mine:
            if stop.is_set():
                break
            w = prepare_unit(units[u], cfg)
            while not stop.is_set():
                try:
                    work_q.put(w, timeout=0.5)
                    break
                except queue.Full:
                    continue
        while True:                              # the end marker; never block once the consumer stopped
            try:
                work_q.put(None, timeout=0.5)
                break
            except queue.Full:
                if stop.is_set():
                    break

    producer = threading.Thread(target=produce, daemon=True, name=f"label-decode-{info.rank}")
    old = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    if old is not None:
        signal.signal(signal.SIGTERM, _on_sigterm)
    bar = None
    if cfg["progress"] and mine:
        from tqdm import tqdm

        bar = tqdm(total=len(mine), desc=f"label rank {info.rank}/{info.world}", position=info.rank,
                   unit="video", dynamic_ncols=True, leave=True)
    pairs = queries = 0
    stopped = None
    t_label = time.perf_counter()
    try:
        producer.start()
        while True:
            w = work_q.get()
            if w is None:
                break
            try:
                if w.error is not None:
                    raise w.error
                samples = label_unit(w, tracker, cfg, plan, teacher, info.rank, created)
            except _Stop:
                raise
            except Exception as e:
                reason = e.reason if isinstance(e, InputError) else f"{type(e).__name__}: {e}"
                with _writing(vdir):
                    errors.record(w.item.uri, reason, unit=w.item.id)
                failed_here += 1
            else:
                pairs += len(samples)
                queries += int(sum(s.tracks.shape[0] for s in samples))
                writer.put((w.item.id, str(w.item.uri), samples))
            if bar is not None:
                bar.update(1)
            if writer.error is not None:
                break
        writer.put(None)
        writer.join()
    except _Stop as e:                      # SIGTERM (scancel, preemption): publish what is complete, stop
        stopped = str(e)
        stop.set()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # srun forwards TERM twice; KILL is the hard stop
        try:
            writer.put(None)
        except BaseException:
            pass
        writer.join(timeout=60)
    finally:
        stop.set()
        if old is not None:
            signal.signal(signal.SIGTERM, old)
        if bar is not None:
            bar.close()
    if writer.error is not None:
        e = writer.error
        with contextlib.suppress(OSError):   # the open shard's temporary, or a shard renamed but never indexed
            mf.clean_prefix(vdir, info.rank)
        raise InputError(vdir, f"writing shards failed, nothing half-written was published: "
                               f"{type(e).__name__}: {e}") from None
    t_end = time.perf_counter()
    model_s = tracker.seconds if tracker else 0.0
    wall = t_end - t_label
    summary = {
        "set": sdir.name, "version": vname, "rank": info.rank, "world": info.world, "launcher": info.launcher,
        "units_assigned": len(mine), "units_done": writer.units_done, "units_failed": failed_here,
        "source_errors": source_failed,
        "pairs": pairs, "queries": queries, "samples_written": writer.samples,
        "seconds_total": round(t_end - t_start, 3), "seconds_labeling": round(wall, 3),
        "seconds_model": round(model_s, 3),
        "pairs_per_s": round(pairs / wall, 4) if wall > 0 else None,
        "queries_per_s": round(queries / wall, 3) if wall > 0 else None,
        "model_fraction": round(model_s / wall, 4) if wall > 0 else None,
        "cleaned": cleaned, "stopped": stopped,
    }
    with _writing(vdir):
        atomic_write_json(vdir / f"summary-{info.rank}.json", summary)
        man = None if stopped is not None else mf.finalize(sdir, vname, plan.units.keys(), src_errors.records)
    if stopped is None:
        summary["complete"] = man is not None
        if man is not None:
            summary["manifest"] = {k: man[k] for k in ("units", "samples")}
    return summary


# ------------------------------------------------------------------------------------------------ CLI

def add_arguments(parser) -> None:
    parser.add_argument("--source", action="append", default=None, metavar="SPEC",
                        help="video source spec (repeatable); replaces the config's sources")
    parser.add_argument("--set-name", dest="set_name", default=None, help="label set name (config: set)")
    parser.add_argument("--root", default=None, help="label sets root (config: root, default shards/labels)")
    parser.add_argument("--teacher", default=None, help="teacher bundle directory")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--no-progress", action="store_true")


def apply_args(args, cfg: dict) -> dict:
    cfg = copy.deepcopy(cfg)
    if getattr(args, "source", None):
        cfg["sources"] = list(args.source)
    for a, k in (("set_name", "set"), ("root", "root"), ("teacher", "teacher")):
        if getattr(args, a, None):
            cfg[k] = getattr(args, a)
    if getattr(args, "no_progress", False):
        cfg["progress"] = False
    if getattr(args, "keep_old", False):
        cfg["keep_old"] = True
    return cfg


def format_summary(summary: dict) -> str:
    s = summary
    frac = "-" if s["model_fraction"] is None else f"{100 * s['model_fraction']:.0f}%"
    pps = "-" if s["pairs_per_s"] is None else f"{s['pairs_per_s']:.3f}"
    qps = "-" if s["queries_per_s"] is None else f"{s['queries_per_s']:.1f}"
    line = (f"label {s['set']}/{s['version']} rank {s['rank']}/{s['world']}: units {s['units_done']} done, "
            f"{s['units_failed']} failed of {s['units_assigned']}"
            + (f" (+{s['source_errors']} bad inputs)" if s.get("source_errors") else "")
            + f"; {s['pairs']} pairs, {s['queries']} queries; "
            f"{pps} pairs/s, {qps} queries/s, {frac} of the time in the model")
    if s.get("stopped"):
        line += f"; stopped by {s['stopped']} (run again to resume)"
    elif s.get("complete"):
        line += f"; version complete ({s['manifest']['samples']} samples)"
    return line


def exit_status(summary: dict) -> int:
    if summary.get("stopped"):
        return 143
    n = int(summary["units_failed"]) + int(summary.get("source_errors", 0))
    return 0 if n == 0 else FAILED_EXIT_BASE + min(n, 63)


def run(args, cfg) -> int:
    cfg = apply_args(args, cfg)
    if getattr(args, "dry_run", False):
        plan = make_plan(check_config(cfg), create=False)
        print(plan.describe())
        return 0
    summary = run_label(cfg)
    print(format_summary(summary), flush=True)
    return exit_status(summary)
