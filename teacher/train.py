"""Tiny-teacher training: Lightning modules for the two stages and an in-memory frame-pair dataset.

Stage 1, ``LPQModule(lpq)``: the local patch quantizer as an autoencoder on single frames,
    loss = mse(recon, normalize(x)) + aux        (``lpq(normalize(x))`` returns (recon, mse, aux); aux = LFQ's
                                                   entropy + commitment terms)
Stage 2, ``TeacherModule(model)``: the generative two-frame model (``teacher.tiny.TinyTeacher``) with its LPQ frozen
(no gradients, kept in eval mode). Each step draws, from a generator seeded by (seed, global step):
    r ~ U(reveal_range),  n = clip(round(r * P), 1, P - 1) revealed frame-1 patches (a seeded permutation),
    an order seed for the random-access order,
and minimises ``model.training_loss(frame0, frame1, reveal, order_seed)`` (the NLL of the masked frame-1 codes).
Both stages: AdamW, linear warm-up then cosine decay to ``min_lr_ratio * lr`` (or constant), stepped per batch.

``ClipPairDataset`` (alias ``PairDataset``) is an endless IterableDataset over clips held in memory as uint8
tensors [T, H, W, 3] (one per video, any T, equal H, W). Per sample, from a numpy generator seeded by
(seed, worker id, start step): a gap g uniform over the gaps in ``gap_range`` (inclusive) that fit some shot,
then a pair (t, t + g) uniform over all pairs at that gap inside one shot (shots never span a cut), then a random
time reversal (swap the frames) and a random horizontal flip (both frames). It yields float32 [3, H, W] frames in
0..255. With ``out_size`` set, both frames are cropped to one random square of side s * min(H, W), s uniform in
``crop_scale``, and area-resized to ``out_size`` (multi-scale training: the same motion seen at several zooms, as
KL-tracing's zoom levels see it). ``set_start_step(step)`` re-seeds the stream for a resumed run (the modules call it at train start).

Pure tensors: no file access here (Lightning's checkpointing is configured by the caller).
"""
from __future__ import annotations

import math
from typing import Sequence

import lightning as L
import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import IterableDataset, get_worker_info

from .lpq import LPQ, normalize

__all__ = ["ClipPairDataset", "PairDataset", "LPQModule", "TeacherModule", "lr_factor", "step_seed"]


def step_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed from integers (numpy SeedSequence, stable across machines)."""
    words = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, *[int(p) & 0xFFFFFFFF for p in parts]])
    a, b = words.generate_state(2, dtype=np.uint32)
    return ((int(a) << 32) | int(b)) & ((1 << 63) - 1)


# ---------------------------------------------------------------------------------------------- data

class ClipPairDataset(IterableDataset):
    """Endless (or ``num_samples``-long per worker) stream of (frame0, frame1) float32 [3, H, W] 0..255 pairs.

    clips: uint8 tensors [T, H, W, 3] (numpy arrays accepted), all with the same H, W.
    shots: per clip, None (one shot) or a list of [start, end) frame ranges with no cut inside.
    gap_range: (lo, hi) inclusive frame gaps; 0 gives identical frames.
    """

    def __init__(self, clips: Sequence, gap_range: Sequence[int] = (1, 4), seed: int = 0, flip: bool = True,
                 reverse: bool = True, shots: Sequence | None = None, num_samples: int | None = None,
                 out_size: int | None = None, crop_scale: Sequence[float] = (1.0, 1.0)):
        super().__init__()
        if len(clips) == 0:
            raise ValueError("ClipPairDataset needs at least one clip")
        self.clips = [torch.as_tensor(c) for c in clips]
        size = None
        for i, c in enumerate(self.clips):
            if c.dtype != torch.uint8 or c.dim() != 4 or c.shape[-1] != 3 or c.shape[0] < 1:
                raise ValueError(f"clip {i} must be uint8 [T, H, W, 3], got {c.dtype} {tuple(c.shape)}")
            if size is None:
                size = tuple(c.shape[1:3])
            elif tuple(c.shape[1:3]) != size:
                raise ValueError(f"clip {i} is {tuple(c.shape[1:3])}, clip 0 is {size}: resize clips to one size")
        self.size = size
        lo, hi = (int(v) for v in gap_range)
        if lo < 0 or hi < lo:
            raise ValueError(f"gap_range must be 0 <= lo <= hi, got {list(gap_range)}")
        if shots is not None and len(shots) != len(self.clips):
            raise ValueError(f"shots has {len(shots)} entries for {len(self.clips)} clips")
        spans: list[tuple[int, int, int]] = []           # (clip, start, end)
        for i, c in enumerate(self.clips):
            T = int(c.shape[0])
            sh = None if shots is None else shots[i]
            for a, b in ([(0, T)] if not sh else sh):
                a, b = max(0, int(a)), min(T, int(b))
                if b > a:
                    spans.append((i, a, b))
        self.spans = spans
        lengths = np.array([b - a for _, a, b in spans], dtype=np.int64)
        # per gap: number of pairs (t, t + g) inside each span
        self.gaps = [g for g in range(lo, hi + 1) if np.maximum(lengths - g, 0).sum() > 0]
        if not self.gaps:
            raise ValueError(f"no clip shot is long enough for a gap of {lo} frames (longest {int(lengths.max())})")
        self._cum = {g: np.cumsum(np.maximum(lengths - g, 0)) for g in self.gaps}
        self.gap_range = (lo, hi)
        self.seed = int(seed)
        self.flip = bool(flip)
        self.reverse = bool(reverse)
        self.num_samples = None if num_samples is None else int(num_samples)
        self.start_step = 0
        self.out_size = None if out_size is None else int(out_size)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        if self.out_size is not None:
            lo_s, hi_s = self.crop_scale
            if not (0 < lo_s <= hi_s <= 1):
                raise ValueError(f"crop_scale must be 0 < lo <= hi <= 1, got {list(crop_scale)}")
            if round(lo_s * min(size)) < self.out_size:
                raise ValueError(f"crop_scale {lo_s} of {min(size)} px is smaller than out_size {self.out_size}")

    def set_start_step(self, step: int) -> None:
        """Re-seed the stream for a run resumed at ``step`` (so it does not replay the first pairs)."""
        self.start_step = int(step)

    def num_pairs(self, gap: int) -> int:
        return int(self._cum[gap][-1]) if gap in self._cum else 0

    def sample_index(self, rng: np.random.Generator) -> tuple[int, int, int, bool, bool]:
        """(clip, t0, t1, flipped, reversed) of one sample; t1 - t0 = the gap (before reversal)."""
        g = self.gaps[int(rng.integers(len(self.gaps)))]
        cum = self._cum[g]
        k = int(rng.integers(int(cum[-1])))
        s = int(np.searchsorted(cum, k, side="right"))
        before = int(cum[s - 1]) if s > 0 else 0
        clip, a, _ = self.spans[s]
        t0 = a + (k - before)
        t1 = t0 + g
        rev = bool(self.reverse and rng.random() < 0.5)
        flip = bool(self.flip and rng.random() < 0.5)
        if rev:
            t0, t1 = t1, t0
        return clip, t0, t1, flip, rev

    def _frame(self, clip: int, t: int, flip: bool) -> torch.Tensor:
        f = self.clips[clip][t].permute(2, 0, 1).to(torch.float32)             # [3, H, W]
        return f.flip(-1).contiguous() if flip else f

    def __iter__(self):
        info = get_worker_info()
        wid = 0 if info is None else int(info.id)
        rng = np.random.default_rng(step_seed(self.seed, wid, self.start_step))
        n = 0
        while self.num_samples is None or n < self.num_samples:
            clip, t0, t1, flip, _ = self.sample_index(rng)
            f0, f1 = self._frame(clip, t0, flip), self._frame(clip, t1, flip)
            if self.out_size is not None:
                f0, f1 = self._crop(rng, f0, f1)
            yield f0, f1
            n += 1

    def _crop(self, rng: np.random.Generator, *frames: torch.Tensor) -> tuple[torch.Tensor, ...]:
        H, W = frames[0].shape[1:]
        side = int(round(rng.uniform(*self.crop_scale) * min(H, W)))
        y, x = int(rng.integers(H - side + 1)), int(rng.integers(W - side + 1))
        out = []
        for f in frames:
            c = f[None, :, y:y + side, x:x + side]
            if side != self.out_size:
                c = torch.nn.functional.interpolate(c, size=(self.out_size, self.out_size), mode="area")
            out.append(c[0])
        return tuple(out)


PairDataset = ClipPairDataset


# ---------------------------------------------------------------------------------------------- schedules

def lr_factor(step: int, total: int, warmup: int, schedule: str = "cosine", min_ratio: float = 0.1) -> float:
    """LR multiplier at optimizer step ``step`` (0-based): linear warm-up over ``warmup`` steps, then cosine from 1
    to ``min_ratio`` at ``total`` steps (``schedule='cosine'``) or 1 (``'constant'``)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, int(total) - int(warmup))
    p = min(1.0, max(0.0, (step - warmup) / span))
    return float(min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p)))


class _Base(L.LightningModule):
    def __init__(self, lr: float, weight_decay: float, warmup_steps: int, total_steps: int, schedule: str,
                 min_lr_ratio: float):
        super().__init__()
        if schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.schedule = schedule
        self.min_lr_ratio = float(min_lr_ratio)

    def _trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        params = self._trainable()
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.lr, betas=(0.9, 0.95))
        total, warm, sched, mr = self.total_steps, self.warmup_steps, self.schedule, self.min_lr_ratio
        s = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total, warm, sched, mr))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": s, "interval": "step", "frequency": 1}}

    def on_train_start(self) -> None:
        # a resumed run starts the data stream at its own step (instead of replaying the first pairs)
        self.start_step = int(self.global_step)
        dl = getattr(self.trainer, "train_dataloader", None)
        ds = getattr(dl, "dataset", None)
        if hasattr(ds, "set_start_step"):
            ds.set_start_step(int(self.global_step))

    def _log_lr(self) -> None:
        trainer = self._trainer
        if trainer is not None and trainer.optimizers:
            self.log("lr", float(trainer.optimizers[0].param_groups[0]["lr"]), on_step=True, prog_bar=False)


# ---------------------------------------------------------------------------------------------- stage 1

class LPQModule(_Base):
    """Stage 1: train the LPQ autoencoder on frames (both frames of each pair)."""

    def __init__(self, lpq: LPQ, lr: float = 1e-3, weight_decay: float = 0.0, warmup_steps: int = 0,
                 total_steps: int = 1000, schedule: str = "cosine", min_lr_ratio: float = 0.1):
        super().__init__(lr, weight_decay, warmup_steps, total_steps, schedule, min_lr_ratio)
        self.lpq = lpq

    def training_step(self, batch, batch_idx):
        f0, f1 = batch
        x = normalize(torch.cat([f0, f1], 0).float())
        _, mse, aux = self.lpq(x)
        loss = mse + aux
        self.log("loss", loss.detach(), on_step=True, prog_bar=True)
        self.log("mse", mse.detach(), on_step=True, prog_bar=False)
        self.log("aux", torch.as_tensor(aux).detach().float(), on_step=True, prog_bar=False)
        self._log_lr()
        return loss


# ---------------------------------------------------------------------------------------------- stage 2

class TeacherModule(_Base):
    """Stage 2: train the generative model on frame-1 code likelihood with a random reveal per step; the model's
    LPQ (``model.lpq``) is frozen and stays in eval mode."""

    def __init__(self, model: nn.Module, lr: float = 1e-3, reveal_range: Sequence[float] = (0.1, 0.3),
                 seed: int = 0, weight_decay: float = 0.01, warmup_steps: int = 0, total_steps: int = 1000,
                 schedule: str = "cosine", min_lr_ratio: float = 0.1):
        super().__init__(lr, weight_decay, warmup_steps, total_steps, schedule, min_lr_ratio)
        lo, hi = (float(v) for v in reveal_range)
        if not 0.0 <= lo <= hi < 1.0:
            raise ValueError(f"reveal_range must satisfy 0 <= lo <= hi < 1, got {list(reveal_range)}")
        self.model = model
        self.reveal_range = (lo, hi)
        self.seed = int(seed)
        lpq = getattr(model, "lpq", None)
        if lpq is not None:
            lpq.requires_grad_(False)
            lpq.eval()

    @property
    def num_patches(self) -> int:
        m = self.model
        for name in ("num_patches", "P"):
            v = getattr(m, name, None)
            if isinstance(v, int):
                return v
        raise AttributeError("the model exposes neither num_patches nor P")

    def train(self, mode: bool = True):
        super().train(mode)
        lpq = getattr(self.model, "lpq", None)
        if lpq is not None:
            lpq.eval()                       # frozen tokenizer: no dropout / LFQ training behaviour
        return self

    def draw(self, step: int) -> tuple[torch.Tensor, int, float]:
        """(reveal bool [P], order seed, reveal ratio) for a global step (deterministic in (seed, step))."""
        P = self.num_patches
        g = torch.Generator().manual_seed(step_seed(self.seed, 0x7E, int(step)))
        lo, hi = self.reveal_range
        r = lo + (hi - lo) * float(torch.rand((), generator=g))
        n = min(P - 1, max(1, int(round(r * P))))
        reveal = torch.zeros(P, dtype=torch.bool)
        reveal[torch.randperm(P, generator=g)[:n]] = True
        order_seed = int(torch.randint(0, 2 ** 31 - 1, (), generator=g))
        return reveal, order_seed, r

    def training_step(self, batch, batch_idx):
        f0, f1 = batch
        reveal, order_seed, r = self.draw(self.global_step)
        loss, stats = self.model.training_loss(f0.float(), f1.float(), reveal, order_seed)
        self.log("loss", loss.detach(), on_step=True, prog_bar=True)
        self.log("reveal", float(r), on_step=True, prog_bar=False)
        for k, v in (stats or {}).items():
            if isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1):
                self.log(k, float(v), on_step=True, prog_bar=False)
        self._log_lr()
        return loss
