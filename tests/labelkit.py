"""Shared fixtures for labeling tests: a micro random tiny teacher (fast to trace, not accurate), small synthetic
video sets, the label command line, and a content view of a label set (key -> content hash)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FLOWDISTILL = str(BIN / "flowdistill")
TORCHRUN = str(BIN / "torchrun")

# fast labeling settings: 2 pairs x 8 points per video, one mask, one zoom level
FAST = ["--set", "sampling.pairs_per_video=2", "--set", "sampling.num_points=8", "--set", "sampling.gap_frames=[1,2]",
        "--set", "shard_samples=3", "--set", "threads=1", "--no-progress"]


def make_teacher(path: Path) -> Path:
    """A random micro TinyTeacher bundle (32 px, 1 layer) whose bundle tracer is 1 mask x 1 zoom level
    (``teacher.checkpoints.write_micro_teacher``)."""
    from teacher.checkpoints import write_micro_teacher

    return write_micro_teacher(path)


def make_videos(path: Path, n: int, seed: int = 0, prefix: str = "vid", frames: int = 6, size: int = 64) -> Path:
    """``n`` synthetic mp4 videos (with npz ground truth) in ``path``."""
    if (path / "index.json").is_file():
        return path
    subprocess.run([FLOWDISTILL, "synth", "--set", f"num_videos={n}", "--set", f"num_frames={frames}",
                    "--set", f"size=[{size},{size}]", "--set", f"seed={seed}", "--set", f"name_prefix={prefix}",
                    "--out", str(path)], check=True, capture_output=True, cwd=REPO)
    return path


def label_cmd(sources: list, teacher: Path, root: Path, set_name: str = "t", extra: list | None = None) -> list:
    cmd = [FLOWDISTILL, "label", "--teacher", str(teacher), "--root", str(root), "--set-name", set_name]
    for s in sources:
        cmd += ["--source", str(s)]
    return cmd + FAST + list(extra or [])


def clean_env(**extra) -> dict:
    """The environment without launcher variables (so a test's subprocess is a single rank unless told)."""
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("SLURM_") or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK", "NODE_RANK",
                                                   "MASTER_ADDR", "MASTER_PORT"))}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def content(version_dir: Path) -> dict:
    """key -> content hash (producer rank left out) over the version's manifest (or every indexed shard)."""
    from pipeline import manifest as mf
    from pipeline.shards import iter_raw

    version_dir = Path(version_dir)
    if (version_dir / "manifest.json").is_file():
        shards = [version_dir / e["shard"] for e in mf.read_manifest(version_dir)["shards"]]
    else:
        shards = [version_dir / e["shard"] for e in mf.shard_entries(version_dir)]
    out: dict = {}
    for s in shards:
        for raw in iter_raw(s):
            key = raw["__key__"]
            assert key not in out, f"duplicate sample {key} ({s})"
            out[key] = mf.sample_content_hash(raw)
    return out
