"""``flowdistill train-teacher``: train the tiny teacher (``teacher.tiny.TinyTeacher``) on videos, self-supervised.

Data. ``sources`` are video source specs of ``pipeline.sources`` (files, dirs, globs, lists, tars, URLs,
``clips:``) plus ``synth:``, which stands for a procedural training set written into ``<work_dir>/synth`` with the
``synth`` config (``pipeline.synthetic``; idempotent). Every video is decoded once, each frame squished to
``data_size`` x ``data_size`` (cv2 INTER_AREA; default ``image_size``) and kept in memory as uint8; shots (``clips:bikes``' cuts) are
kept so no pair spans a cut. Bad videos are recorded in ``<work_dir>/errors.jsonl`` (rewritten each run) and
skipped. Pairs come from ``teacher.train.ClipPairDataset`` (gap uniform in ``gap_frames``, random time reversal and
horizontal flip, seeded).

Stages (Lightning, ``accelerator`` auto, one device):
  1. ``lpq``      the tokenizer autoencoder, ``lpq_steps`` steps        -> ``<work_dir>/lpq.safetensors``
  2. ``teacher``  the generative model with the LPQ frozen, ``teacher_steps`` steps -> ``<work_dir>/bundle``
Each stage checkpoints into ``<work_dir>/<stage>/last.ckpt`` (every ``checkpoint_every`` steps and at the end).
``<work_dir>/stages.json`` records the config hash and each finished stage (steps, wall time). Rerunning the same
command skips finished stages and resumes an unfinished one from its ``last.ckpt``; raising a stage's step count
continues it from its checkpoint. A work_dir trained with another config (anything but the step counts, out,
eval and runtime knobs) is refused. Finally the bundle (``teacher.checkpoints.save_tiny_bundle``: one
safetensors + ``teacher.json`` with a ``provenance`` record: command, config, data, steps, seed, versions, wall
time, eval metrics) is written to ``out``; with ``eval.enabled`` a held-out synthetic evaluation runs first.
"""
from __future__ import annotations

import copy
import json
import os
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .common import ErrorLog, InputError, atomic_write_json, config_hash
from .synthetic import DEFAULTS as SYNTH_DEFAULTS, hashed_config

SYNTH_SPEC = "synth:"
STATE_FORMAT = "flowdistill-train-teacher-v1"

_SYNTH = copy.deepcopy(SYNTH_DEFAULTS)
_SYNTH.update({"seed": 0, "num_videos": 48, "num_frames": 32, "size": [128, 128], "name_prefix": "train"})

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "out": "teacher/weights/tiny",            # bundle directory (teacher.json + tiny.safetensors)
    "work_dir": "runs/train-teacher/tiny",    # checkpoints, stage record, generated data, logs
    "sources": [SYNTH_SPEC, "clips:"],        # video source specs; "synth:" = the generated set below
    "synth": _SYNTH,                          # pipeline.synthetic config of the "synth:" training set
    "max_videos": None,                       # use at most this many videos (in source order)
    "max_frames": None,                       # keep at most this many frames of each video
    "image_size": 64,                         # the model's frame size (training pairs are image_size px)
    "data_size": 128,                         # frames are squished to data_size px in memory (null: image_size)
    "crop_scale": [0.5, 1.0],                 # training crop side / data_size, uniform; area-resized to image_size
    "model": {                                # the other teacher.tiny.TinyTeacherConfig fields (same defaults)
        "patch": 4, "radius": 8, "cv_window": 8, "n_layer": 4, "n_head": 4, "n_embd": 128, "key_dim": 32,
        "lpq_preset": "tiny", "eps_init": -3.0, "chunk": 64, "top_offsets": 32, "appearance": True,
        "dist_bias": True, "dist_init": 0.125,
    },
    "gap_frames": [1, 3],                     # inclusive frame-gap range of training pairs
    "flip": True,                             # random horizontal flip of both frames
    "reverse": True,                          # random time reversal (swap the frames)
    "lpq_steps": 1500,
    "teacher_steps": 3000,
    "batch_size": 16,
    "lpq_lr": 1.0e-3,
    "lr": 1.0e-3,
    "weight_decay": 0.01,
    "warmup_steps": 100,
    "schedule": "cosine",                     # cosine | constant (after the linear warm-up)
    "min_lr_ratio": 0.1,
    "grad_clip": 1.0,                         # gradient norm clip (null: none)
    "reveal_range": [0.1, 0.3],               # fraction of frame-1 patches revealed, uniform per step
    "tracer": None,                           # KLTraceConfig settings stored in the bundle (teacher.json "tracer")
    "threads": None,                          # torch CPU threads (null: leave torch's setting)
    "num_workers": 0,                         # DataLoader workers (data is in memory)
    "accelerator": "auto",
    "precision": "32-true",
    "checkpoint_every": 200,                  # steps between last.ckpt updates
    "log_every": 10,
    "progress": True,
    "eval": {                                 # held-out synthetic evaluation of the finished bundle
        "enabled": False,
        "num_videos": 4,
        "num_frames": 8,
        "size": [128, 128],
        "seed": 1000,                         # another seed than the training set
        "families": ["checker", "stripes"],   # textures never used for training
        "sources": ["kltrace", "zero"],       # flow sources scored (kltrace/rgbdiff use the new bundle)
        "tracer": None,                       # KLTraceConfig overrides for kltrace, e.g. {num_masks: 2}
    },
}

# keys that may change between runs of one work_dir (everything else must match to resume)
_RUNTIME_KEYS = ("out", "work_dir", "lpq_steps", "teacher_steps", "eval", "tracer", "threads", "num_workers",
                 "accelerator",
                 "precision", "checkpoint_every", "log_every", "progress")


# ---------------------------------------------------------------------------------------------- CLI

def add_arguments(parser) -> None:
    parser.add_argument("--out", default=None, help="bundle directory to write (default: config 'out')")
    parser.add_argument("--work-dir", default=None, help="checkpoints / stage record (default: config 'work_dir')")


def command_line(args) -> list[str]:
    """The command as typed (reconstructed from the parsed arguments, so it is exact under cli.main(argv) too)."""
    cmd = ["flowdistill", "train-teacher"]
    if getattr(args, "config", None):
        cmd += ["--config", str(args.config)]
    for ov in getattr(args, "overrides", []) or []:
        cmd += ["--set", ov]
    if getattr(args, "out", None):
        cmd += ["--out", str(args.out)]
    if getattr(args, "work_dir", None):
        cmd += ["--work-dir", str(args.work_dir)]
    return cmd


def run(args, cfg) -> int:
    cfg = copy.deepcopy(cfg)
    if getattr(args, "out", None):
        cfg["out"] = args.out
    if getattr(args, "work_dir", None):
        cfg["work_dir"] = args.work_dir
    evaluate_fn = None
    if (cfg.get("eval") or {}).get("enabled"):
        evaluate_fn = lambda bundle_dir: evaluate_bundle(bundle_dir, cfg["eval"], Path(cfg["work_dir"]))  # noqa: E731
    result = train_teacher(cfg, command=command_line(args), evaluate_fn=evaluate_fn)
    print(f"teacher bundle {result['out']}: teacher id {result['teacher_id']}, steps lpq {result['steps']['lpq']} "
          f"teacher {result['steps']['teacher']}")
    return 0


# ---------------------------------------------------------------------------------------------- config

def _check_cfg(cfg: dict) -> None:
    def need(cond: bool, key: str, why: str) -> None:
        if not cond:
            raise InputError(key, why)

    def pos_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    need(isinstance(cfg["sources"], (list, str)) and len(cfg["sources"]) > 0, "sources",
         "give one or more video source specs")
    need(isinstance(cfg["seed"], int) and not isinstance(cfg["seed"], bool), "seed", "must be an int")
    need(pos_int(cfg["image_size"]) and cfg["image_size"] % 4 == 0, "image_size", "must be a positive multiple of 4")
    g = cfg["gap_frames"]
    need(isinstance(g, (list, tuple)) and len(g) == 2 and all(isinstance(v, int) for v in g) and 0 <= g[0] <= g[1],
         "gap_frames", f"must be [lo, hi] with 0 <= lo <= hi, got {g!r}")
    r = cfg["reveal_range"]
    need(isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(v, (int, float)) for v in r)
         and 0 <= r[0] <= r[1] < 1, "reveal_range", f"must be [lo, hi] with 0 <= lo <= hi < 1, got {r!r}")
    for k in ("lpq_steps", "teacher_steps"):
        need(isinstance(cfg[k], int) and not isinstance(cfg[k], bool) and cfg[k] >= 0, k, "must be an int >= 0")
    for k in ("batch_size", "checkpoint_every", "log_every"):
        need(pos_int(cfg[k]), k, "must be a positive int")
    for k in ("lpq_lr", "lr"):
        need(isinstance(cfg[k], (int, float)) and cfg[k] > 0, k, "must be > 0")
    need(cfg["schedule"] in ("cosine", "constant"), "schedule", "must be cosine or constant")
    need(isinstance(cfg["model"], dict), "model", "must be a mapping of TinyTeacherConfig fields")
    ds = cfg["data_size"]
    need(ds is None or (pos_int(ds) and ds >= cfg["image_size"]), "data_size", "must be null or an integer >= image_size")
    cs = cfg["crop_scale"]
    need(isinstance(cs, (list, tuple)) and len(cs) == 2 and all(isinstance(v, (int, float)) for v in cs)
         and 0 < cs[0] <= cs[1] <= 1, "crop_scale", "must be [lo, hi] with 0 < lo <= hi <= 1")
    need(round(cs[0] * (ds or cfg["image_size"])) >= cfg["image_size"], "crop_scale",
         "the smallest crop (crop_scale[0] * data_size) must be at least image_size px")
    need("image_size" not in cfg["model"], "model.image_size", "set the top-level image_size instead")
    for k in ("max_videos", "max_frames"):
        need(cfg[k] is None or pos_int(cfg[k]), k, "must be null or a positive int")
    need(cfg["tracer"] is None or isinstance(cfg["tracer"], dict), "tracer", "must be null or a mapping")
    if cfg["tracer"]:
        from teacher.kltrace_config import KLTraceConfig

        try:
            KLTraceConfig.from_dict({**KLTraceConfig().to_dict(), **cfg["tracer"]})
        except (TypeError, ValueError) as e:
            raise InputError("tracer", str(e)) from None


def _model_config(cfg: dict):
    from teacher.tiny import TinyTeacherConfig

    try:
        return TinyTeacherConfig(**{**cfg["model"], "image_size": int(cfg["image_size"])})
    except (TypeError, ValueError) as e:
        raise InputError("model", f"not a valid TinyTeacherConfig: {e}") from None


def _resume_subset(cfg: dict) -> dict:
    sub = {k: v for k, v in cfg.items() if k not in _RUNTIME_KEYS}
    if isinstance(sub.get("synth"), dict):
        sub["synth"] = hashed_config(sub["synth"])      # work dirs made before a synth key existed still resume
    return sub


# ---------------------------------------------------------------------------------------------- data

def _resolve_sources(cfg: dict, work_dir: Path, progress: bool = False) -> tuple[list[Any], dict | None]:
    """Source specs with ``synth:`` replaced by ``("synth", dir)`` after writing the set (idempotent)."""
    specs = [cfg["sources"]] if isinstance(cfg["sources"], str) else list(cfg["sources"])
    out: list[Any] = []
    synth_info = None
    for s in specs:
        s = str(s)
        if s == SYNTH_SPEC:
            from .synthetic import write_set

            d = work_dir / "synth"
            print(f"train-teacher: synthetic training set -> {d}", flush=True)
            index = write_set(d, cfg["synth"], progress=progress)
            synth_info = {"dir": str(d), "config_hash": index["config_hash"], "seed": index["seed"],
                          "num_videos": len(index["names"]), "read": "exact frames (npz)",
                          "npz_sha256": {n: f["npz_sha256"] for n, f in index["files"].items()}}
            out.append(("synth", d))
        else:
            out.append(s)
    return out, synth_info


def _squish(frame: np.ndarray, size: int) -> np.ndarray:
    if frame.shape[:2] == (size, size):
        return frame
    import cv2

    return cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)


def _iter_synth(d: Path, errors: ErrorLog):
    """(record, frames uint8 [T,H,W,3]) of a synthetic set's exact frames (the npz files; the mp4s are lossy)."""
    from .synthetic import load_set

    try:
        index = json.loads((d / "index.json").read_text(encoding="utf-8"))
        videos = load_set(d)
    except (InputError, OSError, ValueError) as e:
        errors.record(getattr(e, "input", str(d)), e)
        return
    for v in videos:
        sha = index["files"][v["name"]]["npz_sha256"]
        yield {"uri": f"synth:{v['name']}", "id": sha[:16], "sha256": sha}, v["video"], None


def _iter_decoded(specs: list[str], errors: ErrorLog, max_frames: int | None, size: int):
    from .clips import CLIPS
    from .decode import open_video
    from .sources import iter_videos

    for item in iter_videos(specs, errors=errors):
        try:
            with open_video(item) as reader:
                T = reader.num_frames if max_frames is None else min(reader.num_frames, max_frames)
                frames = np.empty((T, size, size, 3), np.uint8)          # squished as decoded
                for i, rgb in reader.iter_frames(0, T):
                    frames[i] = _squish(rgb, size)
                rec: dict[str, Any] = {"uri": item.uri, "id": item.id, "size": [int(reader.orig_width),
                                                                                int(reader.orig_height)],
                                       "fps": round(float(reader.fps), 4)}
        except InputError as e:
            errors.record(e.input, e.reason)
            continue
        except Exception as e:                       # a decoder error mid-stream: record, go on
            errors.record(item.uri, e)
            continue
        if item.uri.startswith("clips:") and item.name in CLIPS:
            rec["sha256"] = CLIPS[item.name].sha256          # verified by fetch_clips
        yield rec, frames, item.shots


def load_videos(specs: list[Any], size: int, errors: ErrorLog, max_videos: int | None = None,
                max_frames: int | None = None, progress: bool = False) -> tuple[list[np.ndarray], list, list[dict]]:
    """Every video of ``specs`` (source specs, or ``("synth", dir)``) as uint8 [T, size, size, 3] (squished,
    INTER_AREA). Returns (clips, shots, records); bad videos go to ``errors`` and are skipped."""
    def stream():
        for s in specs:
            if isinstance(s, tuple):
                yield from _iter_synth(Path(s[1]), errors)
            else:
                yield from _iter_decoded([s], errors, max_frames, size)

    clips, shots, records = [], [], []
    it = stream()
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="videos", unit="video")
    for rec, frames, item_shots in it:
        T = len(frames) if max_frames is None else min(len(frames), max_frames)
        if isinstance(frames, np.ndarray) and frames.shape[1:3] == (size, size):
            arr = np.ascontiguousarray(frames[:T])
        else:
            arr = np.empty((T, size, size, 3), np.uint8)
            for i in range(T):
                arr[i] = _squish(np.asarray(frames[i]), size)
        sh = None
        if item_shots:
            sh = [(int(a), min(int(b), T)) for a, b in item_shots if int(a) < T]
        rec["frames"] = int(T)
        if sh:
            rec["shots"] = [list(x) for x in sh]
        clips.append(arr)
        shots.append(sh)
        records.append(rec)
        if max_videos is not None and len(clips) >= max_videos:
            break
    return clips, shots, records


# ---------------------------------------------------------------------------------------------- stages

class _State:
    """``<work_dir>/stages.json``: config hash + finished stages."""

    def __init__(self, work_dir: Path, cfg: dict):
        self.path = work_dir / "stages.json"
        subset = json.loads(json.dumps(_resume_subset(cfg), default=str))
        self.hash = config_hash(subset)
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise InputError(self.path, f"unreadable stage record: {e}") from None
            if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
                raise InputError(self.path, "not a train-teacher stage record")
            if data.get("config_hash") != self.hash:
                old = data.get("config") or {}
                diff = sorted(k for k in set(old) | set(subset) if old.get(k) != subset.get(k))
                raise InputError(work_dir, f"holds a run with another config (differs in: {', '.join(diff) or '?'}); "
                                           f"use another work_dir or remove this one")
            self.data = data
        else:
            self.data = {"format": STATE_FORMAT, "config_hash": self.hash, "config": subset, "stages": {}}

    def stage(self, name: str) -> dict:
        return self.data["stages"].get(name) or {}

    def update(self, name: str, **values) -> None:
        rec = self.data["stages"].setdefault(name, {})
        rec.update(values)
        atomic_write_json(self.path, self.data)


def _trainer(cfg: dict, work_dir: Path, stage: str, steps: int):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    ckpt = ModelCheckpoint(dirpath=str(work_dir / stage), save_last=True, save_top_k=0,    # only <stage>/last.ckpt
                           every_n_train_steps=int(cfg["checkpoint_every"]), save_on_train_epoch_end=False,
                           enable_version_counter=False)
    logger = CSVLogger(str(work_dir / "logs"), name=stage)          # logs/<stage>/version_<n>/metrics.csv
    return L.Trainer(accelerator=cfg["accelerator"], devices=1, max_steps=int(steps), max_epochs=-1,
                     enable_checkpointing=True, callbacks=[ckpt], default_root_dir=str(work_dir), logger=logger,
                     enable_progress_bar=bool(cfg["progress"]), enable_model_summary=False,
                     log_every_n_steps=int(cfg["log_every"]), precision=cfg["precision"],
                     gradient_clip_val=cfg["grad_clip"], num_sanity_val_steps=0)


def _fit(cfg: dict, work_dir: Path, stage: str, module, dataset, steps: int, state: _State) -> dict:
    """Run (or resume) one stage up to ``steps``; returns its record."""
    import torch
    from torch.utils.data import DataLoader

    last = work_dir / stage / "last.ckpt"
    print(f"train-teacher: stage {stage}: {'resuming from ' + str(last) if last.is_file() else 'starting'}, "
          f"target {steps} steps", flush=True)
    dl = DataLoader(dataset, batch_size=int(cfg["batch_size"]), num_workers=int(cfg["num_workers"]),
                    persistent_workers=False)
    trainer = _trainer(cfg, work_dir, stage, steps)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")        # the frozen LPQ
        warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
        trainer.fit(module, train_dataloaders=dl, ckpt_path=str(last) if last.is_file() else None,
                    weights_only=True)
    wall = time.perf_counter() - t0
    start = int(getattr(module, "start_step", 0))
    if trainer.interrupted:
        raise KeyboardInterrupt
    tmp = last.with_name(".last.ckpt.partial")
    trainer.save_checkpoint(str(tmp), weights_only=False)
    os.replace(tmp, last)
    loss = trainer.callback_metrics.get("loss")
    prev = state.stage(stage)
    rec = {"done": True, "steps": int(trainer.global_step), "wall_s": round(float(prev.get("wall_s", 0.0)) + wall, 2),
           "runs": list(prev.get("runs", [])) + [{"from": start, "to": int(trainer.global_step),
                                                  "wall_s": round(wall, 2)}],
           "final_loss": None if loss is None else float(torch.as_tensor(loss).float())}
    print(f"train-teacher: stage {stage}: {start} -> {rec['steps']} steps in {wall:.1f} s, loss {rec['final_loss']}",
          flush=True)
    return rec


def train_teacher(cfg: dict, command: list[str] | None = None,
                  evaluate_fn: Callable[[str], dict] | None = None) -> dict:
    """The whole command (see the module docstring). ``evaluate_fn(bundle_dir) -> metrics`` runs on the finished
    bundle (in ``<work_dir>/bundle``) before it is published to ``out``. Returns a summary dict."""
    import lightning as L
    import torch

    from teacher.checkpoints import load_lpq, load_tiny_bundle, read_bundle_meta as load_bundle_meta, save_model
    from teacher.checkpoints import save_tiny_bundle
    from teacher.lpq import LPQ, PRESETS as LPQ_PRESETS
    from teacher.tiny import TinyTeacher
    from teacher.train import ClipPairDataset, LPQModule, TeacherModule, step_seed

    t_start = time.perf_counter()
    _check_cfg(cfg)
    if cfg.get("threads") is not None:
        torch.set_num_threads(int(cfg["threads"]))
    mcfg = _model_config(cfg)
    work_dir = Path(cfg["work_dir"]).expanduser()
    out = Path(cfg["out"]).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a directory")
    work_dir.mkdir(parents=True, exist_ok=True)
    state = _State(work_dir, cfg)
    seed = int(cfg["seed"])

    # ---- data
    specs, synth_info = _resolve_sources(cfg, work_dir, progress=bool(cfg["progress"]))
    err_path = work_dir / "errors.jsonl"
    err_path.unlink(missing_ok=True)
    errors = ErrorLog(err_path)
    data_size = int(cfg["data_size"] or cfg["image_size"])
    clips, shots, records = load_videos(specs, data_size, errors, cfg["max_videos"], cfg["max_frames"],
                                        progress=bool(cfg["progress"]))
    if errors.count:
        print(f"train-teacher: {errors.count} input(s) skipped, see {err_path}", file=sys.stderr, flush=True)
    if not clips:
        where = f" (errors in {err_path})" if errors.count else ""
        raise InputError("sources", f"no usable video in {cfg['sources']}{where}")
    data_ids = config_hash([r["id"] for r in records])
    n_frames = int(sum(c.shape[0] for c in clips))
    print(f"train-teacher: {len(clips)} videos, {n_frames} frames at {data_size} px "
          f"(pairs at {cfg['image_size']} px, crop_scale {list(cfg['crop_scale'])})", flush=True)
    for name in ("lpq", "teacher"):
        old = state.stage(name).get("data_hash")
        if old is not None and old != data_ids:
            print(f"train-teacher: warning: the videos differ from those stage {name} was trained on", file=sys.stderr)

    def dataset(stage: str) -> ClipPairDataset:
        try:
            return ClipPairDataset([torch.from_numpy(c) for c in clips], tuple(cfg["gap_frames"]),
                                   seed=step_seed(seed, 1 if stage == "lpq" else 2), flip=bool(cfg["flip"]),
                                   reverse=bool(cfg["reverse"]), shots=shots,
                                   out_size=None if data_size == int(cfg["image_size"]) and
                                   tuple(cfg["crop_scale"]) == (1.0, 1.0) else int(cfg["image_size"]),
                                   crop_scale=tuple(cfg["crop_scale"]))
        except ValueError as e:
            raise InputError("gap_frames", str(e)) from None

    common = dict(weight_decay=float(cfg["weight_decay"]), warmup_steps=int(cfg["warmup_steps"]),
                  schedule=cfg["schedule"], min_lr_ratio=float(cfg["min_lr_ratio"]))

    # ---- stage 1: LPQ
    lpq_path = work_dir / "lpq.safetensors"
    rec = state.stage("lpq")
    lpq_done = bool(rec.get("done")) and rec.get("steps", -1) >= cfg["lpq_steps"] and lpq_path.is_file()
    if not lpq_done:
        if state.stage("teacher"):
            raise InputError("lpq_steps", f"stage teacher already started on the LPQ of {rec.get('steps')} steps; "
                                          f"use another work_dir to train a longer LPQ")
        L.seed_everything(step_seed(seed, 11) % (2 ** 31), workers=True, verbose=False)
        lpq = LPQ(LPQ_PRESETS[mcfg.lpq_preset])
        module = LPQModule(lpq, lr=float(cfg["lpq_lr"]), total_steps=int(cfg["lpq_steps"]), **common)
        rec = _fit(cfg, work_dir, "lpq", module, dataset("lpq"), int(cfg["lpq_steps"]), state)
        save_model(module.lpq.cpu(), lpq_path, extra={"stage": "lpq", "steps": rec["steps"]})
        state.update("lpq", **rec, data_hash=data_ids)
    else:
        print(f"train-teacher: stage lpq: done ({rec['steps']} steps), skipped", flush=True)

    # ---- stage 2: teacher
    bundle_dir = work_dir / "bundle"
    rec = state.stage("teacher")
    t_done = (bool(rec.get("done")) and rec.get("steps", -1) >= cfg["teacher_steps"]
              and (bundle_dir / "teacher.json").is_file())
    if not t_done:
        L.seed_everything(step_seed(seed, 12) % (2 ** 31), workers=True, verbose=False)
        model = TinyTeacher(mcfg)
        model.lpq.load_state_dict(load_lpq(lpq_path).state_dict(), strict=True)
        module = TeacherModule(model, lr=float(cfg["lr"]), reveal_range=tuple(cfg["reveal_range"]),
                               seed=step_seed(seed, 13), total_steps=int(cfg["teacher_steps"]), **common)
        rec = _fit(cfg, work_dir, "teacher", module, dataset("teacher"), int(cfg["teacher_steps"]), state)
        model = module.model.cpu().eval()
        tid = save_tiny_bundle(bundle_dir, model, provenance={"stage": "teacher", "steps": rec["steps"]},
                               tracer=dict(cfg["tracer"] or {}))
        state.update("teacher", **rec, data_hash=data_ids, teacher_id=tid)
    else:
        print(f"train-teacher: stage teacher: done ({rec['steps']} steps), skipped", flush=True)
        model, meta = load_tiny_bundle(bundle_dir)
        if rec.get("teacher_id") and meta["teacher_id"] != rec["teacher_id"]:
            raise InputError(bundle_dir, "differs from the teacher recorded in stages.json (changed by hand?)")

    # ---- evaluation, provenance, bundle
    tracer = dict(cfg["tracer"] or {})
    metrics = None
    if evaluate_fn is not None:
        if (load_bundle_meta(bundle_dir).get("tracer") or {}) != tracer:
            save_tiny_bundle(bundle_dir, model, provenance={"stage": "teacher", "steps": rec["steps"]}, tracer=tracer)
        print("train-teacher: evaluating on held-out synthetic videos", flush=True)
        metrics = evaluate_fn(str(bundle_dir))
    import lightning

    stages = {k: state.stage(k) for k in ("lpq", "teacher")}
    provenance = {
        "command": shlex.join(command) if command else None,
        "argv": list(command) if command else list(sys.argv),
        "config": cfg,
        "seed": seed,
        "steps": {k: int(stages[k].get("steps", 0)) for k in stages},
        "data": {"sources": list(cfg["sources"]) if not isinstance(cfg["sources"], str) else [cfg["sources"]],
                 "resolved_sources": [s if isinstance(s, str) else str(s[1]) for s in specs],
                 "num_videos": len(clips), "num_frames": n_frames,
                 "image_size": int(cfg["image_size"]), "videos": records, "errors": errors.records,
                 "synthetic": synth_info, "ids_hash": data_ids},
        "stages": stages,
        "versions": {"torch": torch.__version__, "lightning": lightning.__version__, "python": sys.version.split()[0]},
        "wall_s": {"lpq": stages["lpq"].get("wall_s"), "teacher": stages["teacher"].get("wall_s"),
                   "this_run": round(time.perf_counter() - t_start, 2)},
        "metrics": metrics,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tid = save_tiny_bundle(out, model, provenance=provenance, tracer=tracer)
    print(f"train-teacher: wrote {out} ({sum(p.numel() for p in model.parameters())} parameters)", flush=True)
    return {"out": str(out), "teacher_id": tid, "steps": provenance["steps"], "metrics": metrics,
            "errors": errors.count, "work_dir": str(work_dir)}


# ---------------------------------------------------------------------------------------------- evaluation

def evaluate_bundle(bundle_dir: str, eval_cfg: dict, work_dir: Path) -> dict:
    """TAP-Vid "first" two-frame metrics of the bundle (and baselines) on a held-out synthetic set written into
    ``<work_dir>/eval_synth`` (``eval.seed``, texture ``eval.families``). Returns {source: mean metrics}."""
    from .evaluate import evaluate_two_frame
    from .flowsources import make_flow_source
    from .synthetic import load_set, write_set

    scfg = {"seed": int(eval_cfg["seed"]), "num_videos": int(eval_cfg["num_videos"]),
            "num_frames": int(eval_cfg["num_frames"]), "size": list(eval_cfg["size"]), "name_prefix": "heldout",
            "texture": {"families": list(eval_cfg["families"])}}
    d = work_dir / "eval_synth"
    write_set(d, scfg)
    data = load_set(d)
    out: dict[str, Any] = {"protocol": "TAP-Vid first, two-frame", "data": {"config": scfg, "dir": str(d)}}
    for name in eval_cfg["sources"]:
        opts: dict[str, Any] = {}
        if name in ("kltrace", "rgbdiff"):
            opts = {"teacher": str(bundle_dir), "tracer": dict(eval_cfg.get("tracer") or {})}
        src = make_flow_source(name, opts)
        res = evaluate_two_frame(data, src, query_mode="first", progress=False)
        out[name] = {**res["mean"], "seconds": res["seconds"]}
        print(f"train-teacher: eval {name}: AJ {out[name].get('average_jaccard')} AD {out[name].get('ad')}",
              flush=True)
    return out
