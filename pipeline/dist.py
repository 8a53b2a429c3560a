"""Ranks for jobs that need no collectives (labeling, refresh): who am I, how many are we, what is mine.

``resolve_rank(env)`` reads, in this order of precedence:

1. torchrun / accelerate / torch.distributed: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``GROUP_RANK``
   (accelerate launch sets the same variables);
2. Slurm job arrays: ``SLURM_ARRAY_TASK_ID`` with ``SLURM_ARRAY_TASK_COUNT`` (each array task is one rank;
   task ids are mapped to 0..count-1 with ``SLURM_ARRAY_TASK_MIN``, so ``--array=1-4`` works too). When the
   array task itself runs several Slurm tasks (``srun -n K`` inside it), ranks are
   ``array_index * K + SLURM_PROCID`` over ``count * K``;
3. Slurm tasks: ``SLURM_PROCID`` / ``SLURM_NTASKS`` (``srun``), with ``SLURM_LOCALID`` and ``SLURM_NODEID``;
4. otherwise a single process (rank 0 of 1).

Work units are assigned by a stable hash of their id (``owner``), never by position in a list, so a run stopped
with one world size resumes correctly with any other: every rank skips units already in the ledger and takes the
remaining units that hash to it.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from typing import Mapping

from .common import InputError


@dataclass(frozen=True)
class RankInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    node: int = 0
    launcher: str = "single"      # torchrun | slurm-array | slurm | single

    def to_dict(self) -> dict:
        return asdict(self)


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int | None:
    v = env.get(name)
    if v is None or str(v).strip() == "":
        return default
    try:
        return int(str(v).strip())
    except ValueError:
        raise InputError(f"${name}", f"expected an integer, got {v!r}") from None


def resolve_rank(env: Mapping[str, str] | None = None) -> RankInfo:
    """The calling process's ``RankInfo`` from the launcher's environment variables (see module docstring)."""
    env = os.environ if env is None else env
    if env.get("RANK") is not None and env.get("WORLD_SIZE") is not None:
        info = RankInfo(_int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK", 0),
                        _int(env, "GROUP_RANK", _int(env, "NODE_RANK", 0)), "torchrun")
    elif env.get("SLURM_ARRAY_TASK_ID") is not None:
        task = _int(env, "SLURM_ARRAY_TASK_ID")
        count = _int(env, "SLURM_ARRAY_TASK_COUNT")
        if count is None:
            raise InputError("$SLURM_ARRAY_TASK_COUNT", "missing while SLURM_ARRAY_TASK_ID is set")
        lo = _int(env, "SLURM_ARRAY_TASK_MIN", 0)
        step = _int(env, "SLURM_ARRAY_TASK_STEP", 1) or 1
        hi = _int(env, "SLURM_ARRAY_TASK_MAX", None)
        if hi is not None and (hi - lo) // step + 1 != count:
            raise InputError(f"$SLURM_ARRAY_TASK_MIN={lo}, $SLURM_ARRAY_TASK_MAX={hi}, $SLURM_ARRAY_TASK_COUNT={count}",
                             "the job array is not a range (e.g. --array=0,2,5): submit a range such as --array=0-7 "
                             "(any range resumes any run)")
        index = (task - lo) // step
        k = _int(env, "SLURM_NTASKS", 1)
        proc = _int(env, "SLURM_PROCID", 0)
        info = RankInfo(index * k + proc, count * k, _int(env, "SLURM_LOCALID", 0), _int(env, "SLURM_NODEID", 0),
                        "slurm-array")
    elif env.get("SLURM_PROCID") is not None and env.get("SLURM_NTASKS") is not None:
        info = RankInfo(_int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), _int(env, "SLURM_LOCALID", 0),
                        _int(env, "SLURM_NODEID", 0), "slurm")
    else:
        info = RankInfo()
    if info.world < 1 or not 0 <= info.rank < info.world:
        names = {"torchrun": ("RANK", "WORLD_SIZE"),
                 "slurm-array": ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP",
                                 "SLURM_ARRAY_TASK_COUNT", "SLURM_PROCID", "SLURM_NTASKS"),
                 "slurm": ("SLURM_PROCID", "SLURM_NTASKS")}[info.launcher]
        given = ", ".join(f"${n}={env[n]}" for n in names if env.get(n) is not None)
        raise InputError(given, f"rank {info.rank} is not in [0, world={info.world}) ({info.launcher})")
    return info


def unit_hash(unit_id: str) -> int:
    """A stable 64-bit hash of a work-unit id (sha256; the same on every machine and Python)."""
    return int.from_bytes(hashlib.sha256(str(unit_id).encode("utf-8")).digest()[:8], "big")


def owner(unit_id: str, world: int) -> int:
    """The rank (of ``world``) that labels ``unit_id``."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    return unit_hash(unit_id) % int(world)


def is_mine(unit_id: str, info: RankInfo) -> bool:
    return owner(unit_id, info.world) == info.rank
