"""LRASTracer: LPQ tokenizer + LRAS GPT + token layout, seen through the ``TracerModel`` protocol of
``teacher.kltrace``.

  frame_codes(frames)            LPQ codes of float 0..255 frames [B,3,H,W] -> [B, P, 4] (patch-major, row-major
                                 inside each 2x2 block; ``teacher.sequence.patchify_codes``)
  first_code_logprobs(f0, f1, reveal, seed, last0)
      sequence = [frame 0: P patches x 5 tokens, order0][revealed frame-1 patches, order1][masked pointers]
      order0, order1 = shuffle_orders(P, seed); order0 = move_last(order0, last0) when last0 is given
      logp[b, p, :] = log_softmax(z[b, p, 0:K]) in fp32, z = lm_head output at the pointer of masked patch p
      (lm_head runs only at the masked pointers; K = n_codes, the code range of the vocabulary)
  predict_frame1(f0, f1, reveal, seed)
      greedy seq2par, 4 passes: pass 1 reads c00 at the masked pointers; pass s = 2..4 appends the argmax codes of
      slot s-1 of every masked patch (position id pos1 + 5p + s-1) and reads slot s at those new tokens. The KV
      cache carries each pass into the next, which is exactly one causal pass over the longer sequence.
      Revealed patches keep their own codes; the code grid is decoded by the LPQ decoder (0..255, clipped).

Pure tensors, no I/O. The LPQ always runs in fp32; ``autocast_bf16=True`` runs the LRAS under bf16 autocast
(GPU use), the log-softmax stays fp32. Frame codes are cached (last few frames, verified by exact equality),
so repeated calls on the same clean frames quantise them once.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from teacher.lpq import LPQ, denormalize, normalize
from teacher.lras import LRAS, KVCache
from teacher.sequence import (TokenLayout, build_first_logits_sequence, move_last, patchify_codes,
                              shuffle_orders)


def unpatchify_codes(patches: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Inverse of ``patchify_codes``: [B, P, cps*cps] -> [B, grid*cps, grid*cps]."""
    B = patches.shape[0]
    g, c = layout.grid, layout.codes_per_side
    x = patches.reshape(B, g, g, c, c)                      # [B, gy, gx, cy, cx]
    return x.permute(0, 1, 3, 2, 4).reshape(B, g * c, g * c)


class LRASTracer:
    """``TracerModel`` over an LRAS + LPQ pair (see the module docstring for the formulas)."""

    def __init__(self, lras: LRAS, lpq: LPQ, layout: TokenLayout | dict, image_size: tuple[int, int],
                 autocast_bf16: bool = False, code_cache: int = 4):
        if isinstance(layout, dict):
            layout = TokenLayout(**layout)
        self.lras = lras.eval()
        self.lpq = lpq.eval()
        self.layout = layout
        H, W = int(image_size[0]), int(image_size[1])
        self.image_size = (H, W)
        p = int(lpq.config.patch_size)
        self.cell = p * layout.codes_per_side
        side = layout.grid * self.cell
        if (H, W) != (side, side):
            raise ValueError(f"image_size {H}x{W} does not match the layout: {layout.grid}x{layout.grid} patches "
                             f"of {self.cell} px = {side}x{side}")
        if layout.n_codes != lpq.config.codebook_size:
            raise ValueError(f"layout n_codes {layout.n_codes} != LPQ codebook size {lpq.config.codebook_size}")
        P = layout.grid ** 2
        cfg = lras.config
        if max(layout.ptr0_offset, layout.ptr1_offset) + P > cfg.vocab_size or layout.n_codes > cfg.vocab_size:
            raise ValueError(f"layout pointers/codes exceed the LRAS vocabulary {cfg.vocab_size}")
        if max(layout.pos0_offset, layout.pos1_offset) + P * layout.tokens_per_patch > cfg.block_size:
            raise ValueError(f"layout positions exceed the LRAS position table {cfg.block_size}")
        self.num_patches = P
        self.n_codes = layout.n_codes
        self.autocast_bf16 = bool(autocast_bf16)
        self._cache_size = int(code_cache)
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] = []   # (frame [3,H,W] clone, codes [P,4]), LRU

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_bundle(cls, bundle, autocast_bf16: bool = False) -> "LRASTracer":
        """Build from a ``teacher.checkpoints.TeacherBundle`` (lras, lpq, layout dict, image_size)."""
        return cls(bundle.lras, bundle.lpq, TokenLayout(**bundle.layout), tuple(bundle.image_size),
                   autocast_bf16=autocast_bf16)

    @property
    def device(self) -> torch.device:
        return next(self.lras.parameters()).device

    # ------------------------------------------------------------------------------------------ pieces
    def _check_frames(self, frames: torch.Tensor, name: str) -> torch.Tensor:
        if frames.dim() == 3:
            frames = frames.unsqueeze(0)
        if frames.dim() != 4 or frames.shape[1] != 3 or tuple(frames.shape[2:]) != self.image_size:
            raise ValueError(f"{name} must be [B, 3, {self.image_size[0]}, {self.image_size[1]}], "
                             f"got {tuple(frames.shape)}")
        return frames.to(self.device, torch.float32)

    @torch.no_grad()
    def quantize(self, frames: torch.Tensor) -> torch.Tensor:
        """float 0..255 [B,3,H,W] -> patch codes [B, P, cps*cps] (no cache; LPQ in fp32)."""
        frames = self._check_frames(frames, "frames")
        codes = self.lpq.quantize(normalize(frames))                  # [B, Hc, Wc]
        return patchify_codes(codes, self.layout)

    @torch.no_grad()
    def frame_codes(self, frames: torch.Tensor, cache: bool = True) -> torch.Tensor:
        """Like ``quantize`` but frames seen recently (exactly equal) are not quantised again."""
        frames = self._check_frames(frames, "frames")
        if not cache or self._cache_size <= 0:
            return self.quantize(frames)
        out: list[torch.Tensor | None] = []
        miss: list[int] = []                  # batch rows to quantise (first of each distinct uncached frame)
        same: dict[int, int] = {}             # row -> earlier row of this call with an equal frame
        for b in range(frames.shape[0]):
            hit = None
            for i, (f, c) in enumerate(self._cache):
                if torch.equal(f, frames[b]):
                    hit = c
                    self._cache.append(self._cache.pop(i))            # most recently used last
                    break
            out.append(hit)
            if hit is None:
                twin = next((m for m in miss if torch.equal(frames[m], frames[b])), None)
                if twin is None:
                    miss.append(b)
                else:
                    same[b] = twin
        if miss:
            new = self.quantize(frames[miss])
            for j, b in enumerate(miss):
                out[b] = new[j]
                self._cache.append((frames[b].clone(), new[j]))
            del self._cache[:-self._cache_size]
        for b, twin in same.items():
            out[b] = out[twin]
        return torch.stack(out)                                        # [B, P, 4]

    def clear_cache(self) -> None:
        self._cache.clear()

    def _autocast(self):
        if self.autocast_bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def forward(self, idx: torch.Tensor, pos: torch.Tensor, past_kv: KVCache | None = None,
                return_kv: bool = False, logits_index: torch.Tensor | None = None):
        """The LRAS forward (under bf16 autocast when enabled); every transformer call of the tracer and of the
        engine goes through here."""
        with self._autocast():
            return self.lras(idx, pos, past_kv=past_kv, return_kv=return_kv, logits_index=logits_index)

    def code_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., V] logits -> fp32 log-softmax over the code range [0, n_codes)."""
        return F.log_softmax(logits[..., : self.n_codes].float(), dim=-1)

    def orders(self, seed: int, last0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(order0, order1) for a seed; frame-0 patches in ``last0`` moved to the end (relative order kept)."""
        order0, order1 = shuffle_orders(self.num_patches, int(seed))
        if last0 is not None:
            order0 = move_last(order0, torch.as_tensor(last0, dtype=torch.long).reshape(-1).cpu())
        return order0, order1

    def build(self, codes0: torch.Tensor, codes1: torch.Tensor, reveal: torch.Tensor, seed: int,
              last0: torch.Tensor | None = None):
        """The first-logits sequence (``teacher.sequence.Seq``) on the tracer's device."""
        B = codes0.shape[0]
        if codes1.shape[0] != B:
            codes1 = codes1.expand(B, -1, -1)
        order0, order1 = self.orders(seed, last0)
        seq = build_first_logits_sequence(codes0.cpu(), codes1.cpu(), reveal.cpu().bool(), order0, order1,
                                          self.layout)
        dev = self.device
        seq.idx, seq.pos = seq.idx.to(dev), seq.pos.to(dev)
        seq.logits_index = seq.logits_index.to(dev)
        return seq

    # ------------------------------------------------------------------------------------------ protocol
    @torch.no_grad()
    def first_code_logprobs(self, frame0: torch.Tensor, frame1: torch.Tensor, reveal: torch.Tensor, seed: int,
                            last0: torch.Tensor | None = None) -> torch.Tensor:
        """[B, P, K] fp32 log-probs of each frame-1 patch's first code (rows of revealed patches are 0)."""
        frame0 = self._check_frames(frame0, "frame0")
        frame1 = self._check_frames(frame1, "frame1")
        reveal = self._check_reveal(reveal)
        B = frame0.shape[0]
        codes0 = self.frame_codes(frame0)
        codes1 = self.frame_codes(frame1)
        seq = self.build(codes0, codes1, reveal, seed, last0)
        logits = self.forward(seq.idx, seq.pos, logits_index=seq.logits_index)     # [B, M, V]
        logp = self.code_logprobs(logits)                                            # [B, M, K]
        out = logp.new_empty(B, self.num_patches, self.n_codes)
        out[:, seq.masked.to(out.device)] = logp
        out[:, reveal.to(out.device)] = 0.0
        return out

    def _check_reveal(self, reveal: torch.Tensor) -> torch.Tensor:
        reveal = torch.as_tensor(reveal)
        if reveal.dtype != torch.bool or reveal.shape != (self.num_patches,):
            raise ValueError(f"reveal must be a bool tensor [{self.num_patches}], got {reveal.dtype} "
                             f"{tuple(reveal.shape)}")
        if bool(reveal.all()):
            raise ValueError("reveal covers every patch: nothing is predicted")
        return reveal

    @torch.no_grad()
    def predict_codes(self, frame0: torch.Tensor, frame1: torch.Tensor, reveal: torch.Tensor,
                      seed: int) -> torch.Tensor:
        """Greedy 4-pass seq2par codes of frame 1: [B, P, cps*cps] (revealed patches keep their codes)."""
        frame0 = self._check_frames(frame0, "frame0")
        frame1 = self._check_frames(frame1, "frame1")
        reveal = self._check_reveal(reveal)
        codes0 = self.frame_codes(frame0)
        codes1 = self.frame_codes(frame1)
        B = codes0.shape[0]
        if codes1.shape[0] != B:
            codes1 = codes1.expand(B, -1, -1)
        seq = self.build(codes0, codes1, reveal, seed)
        masked = seq.masked.to(self.device)                                           # [M] patch ids
        logits, kv = self.forward(seq.idx, seq.pos, return_kv=True, logits_index=seq.logits_index)
        slots = codes1.shape[-1]
        pred = codes1.clone().to(self.device)
        base = self.layout.pos1_offset + self.layout.tokens_per_patch * masked        # [M]
        for s in range(slots):
            code = self.code_logprobs(logits).argmax(-1)                             # [B, M] greedy, code range
            pred[:, masked, s] = code
            if s + 1 == slots:
                break
            pos = (base + 1 + s).unsqueeze(0)                                         # slot s+1 token of patch p
            logits, kv = self.forward(code, pos, past_kv=kv, return_kv=True)          # reads slot s+1
        return pred

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Patch codes [B, P, 4] -> frames float 0..255 [B, 3, H, W] (LPQ decoder, clipped)."""
        grid = unpatchify_codes(codes.to(self.device), self.layout)
        return denormalize(self.lpq.decode(grid).float()).clamp(0.0, 255.0)

    @torch.no_grad()
    def predict_frame1(self, frame0: torch.Tensor, frame1: torch.Tensor, reveal: torch.Tensor,
                       seed: int) -> torch.Tensor:
        """Greedy seq2par prediction of frame 1 decoded to pixels: float 0..255 [B, 3, H, W]."""
        return self.decode_codes(self.predict_codes(frame0, frame1, reveal, seed))
