"""The ideal-predictor fixture: a ``TracerModel`` that knows the true motion (test fixture, NEVER a teacher).

It predicts frame 1 as frame 0 warped by the ground-truth motion, so a bump put into frame 0 appears in the
prediction exactly where that point moves to -- the property KL-tracing reads out. It uses ground truth, so it
only measures the read-out (bump, masks, KL, averaging, centroid, zoom bookkeeping); it never labels data.

  prediction  pred = transfer * warp(frame0) + (1 - transfer) * frame1,
              warp(frame0)(u) = frame0(view0.to_model(inverse(view1.to_orig(u))))   (bilinear, pixel centres;
              ``kl_trace`` passes the crop views via ``set_views``). transfer = 1: the perfect predictor;
              transfer < 1: the model carries only part of a change of frame 0 into its prediction.
  first_code_logprobs   per cell (cell x cell px) its first code's sub-block, the top-left (cell/2)^2 block x_c
              (values / 255, flattened): log p_c(j) = log_softmax_j(-|x_c - e_j|^2 / T + n_cj) over a fixed
              codebook e [K, 3 (cell/2)^2] (``fit_codebook``: seeded k-means on blocks, or seeded random).
  predict_frame1        greedy decoding of every (cell/2)^2 block: e[argmax_j (-|x - e_j|^2 / T + n_j)] * 255
              (``quantize=False``: the prediction itself).
  side effects          n ~ side_effect * N(0, 1) per (block, code), seeded by (frame-0 content, seed): a change
              anywhere in frame 0 perturbs every cell a little, the "global-attention side effects" of the paper.

What makes the RGB-difference variant lose: with the perfect noise-free predictor the decoded prediction holds
the whole bump, and RGB loses only through its pixel-resolution argmax on blocky greedy codes (default config,
256 px: median 0.54 vs 0.13 px). The paper's reasons are modelled by the two knobs: transfer < 1 (the KL still sees
small shifts of the distribution where greedy codes do not flip) and side effects (spurious code flips far away
weigh little in the KL but a lot in |RGB difference|).

The motion is given in the original pixel coordinates of the frames passed to ``kl_trace`` (raster convention):
an affine map x1 = A[:, :2] x0 + A[:, 2] (``IdealPredictor.affine`` / ``.translation``), or a pair of callables
``forward`` (x0 -> x1) and ``inverse`` (x1 -> x0) on [N, 2] float64 tensors.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from teacher.kltrace import View

PointMap = Callable[[torch.Tensor], torch.Tensor]


def image_blocks(frames: torch.Tensor, block: int, first_only: bool = False, cell: int | None = None) -> torch.Tensor:
    """float 0..255 [B, 3, H, W] -> blocks / 255 flattened [B, N, 3*block*block].
    first_only: only the top-left block of each cell (cell x cell px), cells in raster order (N = P);
    otherwise every block in raster order (N = (H/block) (W/block))."""
    B, C, H, W = frames.shape
    x = frames.float() / 255.0
    if first_only:
        cell = int(cell)
        gh, gw = H // cell, W // cell
        x = x[:, :, : gh * cell, : gw * cell].reshape(B, C, gh, cell, gw, cell)[:, :, :, :block, :, :block]
        return x.permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * block * block)
    bh, bw = H // block, W // block
    x = x[:, :, : bh * block, : bw * block].reshape(B, C, bh, block, bw, block)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, bh * bw, C * block * block)


def fit_codebook(frames: torch.Tensor | None, k: int = 256, block: int = 4, seed: int = 0, iters: int = 15) -> torch.Tensor:
    """Seeded k-means (Lloyd) codebook [k, 3*block^2] (values in [0, 1]) on the blocks of frames [B, 3, H, W];
    frames None: a seeded uniform random codebook. Empty clusters are re-seeded from random blocks."""
    g = torch.Generator().manual_seed(int(seed))
    dim = 3 * block * block
    if frames is None:
        return torch.rand(k, dim, generator=g)
    x = image_blocks(torch.as_tensor(frames, dtype=torch.float32), block).reshape(-1, dim)   # [N, dim]
    N = x.shape[0]
    if N < k:
        raise ValueError(f"{N} blocks are fewer than k={k}")
    cb = x[torch.randperm(N, generator=g)[:k]].clone()
    for _ in range(int(iters)):
        assign = torch.cdist(x, cb).argmin(1)                                   # [N]
        sums = torch.zeros_like(cb).index_add_(0, assign, x)
        cnt = torch.bincount(assign, minlength=k).float()
        empty = cnt == 0
        cb = torch.where(empty.unsqueeze(1), cb, sums / cnt.clamp_min(1).unsqueeze(1))
        if bool(empty.any()):
            cb[empty] = x[torch.randint(0, N, (int(empty.sum()),), generator=g)]
    return cb


class IdealPredictor:
    """``TracerModel`` fixture predicting frame 1 = frame 0 warped by the true motion (module docstring)."""

    def __init__(self, forward: PointMap, inverse: PointMap, codebook: torch.Tensor, image_size=(64, 64),
                 cell: int = 8, temperature: float = 0.5, quantize: bool = True, side_effect: float = 0.0,
                 transfer: float = 1.0):
        self.forward_map, self.inverse_map = forward, inverse
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.cell = int(cell)
        if self.cell % 2 or self.image_size[0] % self.cell or self.image_size[1] % self.cell:
            raise ValueError(f"cell {cell} must be even and divide the image size {self.image_size}")
        self.block = self.cell // 2
        self.codebook = torch.as_tensor(codebook, dtype=torch.float32)                # [K, 3 block^2]
        if self.codebook.dim() != 2 or self.codebook.shape[1] != 3 * self.block ** 2:
            raise ValueError(f"codebook must be [K, {3 * self.block ** 2}], got {tuple(self.codebook.shape)}")
        self.temperature = float(temperature)
        self.quantize = bool(quantize)
        self.side_effect = float(side_effect)
        self.transfer = float(transfer)
        self.views = (View(0.0, 0.0, 1.0, 1.0), View(0.0, 0.0, 1.0, 1.0))
        self.calls = 0                                                                  # rows processed

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def affine(cls, A, codebook: torch.Tensor, **kw) -> "IdealPredictor":
        """x1 = A[:, :2] @ x0 + A[:, 2] (A [2, 3], original px)."""
        A = torch.as_tensor(A, dtype=torch.float64).reshape(2, 3)
        M, t = A[:, :2], A[:, 2]
        Minv = torch.linalg.inv(M)
        return cls(lambda p: p @ M.T + t, lambda p: (p - t) @ Minv.T, codebook, **kw)

    @classmethod
    def translation(cls, dx: float, dy: float, codebook: torch.Tensor, **kw) -> "IdealPredictor":
        return cls.affine([[1.0, 0.0, dx], [0.0, 1.0, dy]], codebook, **kw)

    def track(self, xy0: torch.Tensor) -> torch.Tensor:
        """Ground truth: where points [N, 2] of frame 0 move in frame 1 (original px)."""
        return self.forward_map(torch.as_tensor(xy0, dtype=torch.float64).reshape(-1, 2))

    def set_views(self, view0: View, view1: View) -> None:
        """Model px of the current frame-0 / frame-1 crops -> original px (called by ``kl_trace``)."""
        self.views = (view0, view1)

    # ------------------------------------------------------------------------------------------ prediction
    def warp(self, frame0: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> frame 0 resampled at the inverse motion of every frame-1 pixel centre (bilinear)."""
        H, W = frame0.shape[-2:]
        v0, v1 = self.views
        ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64) + 0.5,
                                torch.arange(W, dtype=torch.float64) + 0.5, indexing="ij")
        u1 = torch.stack([xs, ys], dim=-1).reshape(-1, 2)                               # [HW, 2] model px, crop 1
        u0 = v0.to_model(self.inverse_map(v1.to_orig(u1)))                             # [HW, 2] model px, crop 0
        grid = torch.stack([2 * u0[:, 0] / W - 1, 2 * u0[:, 1] / H - 1], dim=-1).reshape(1, H, W, 2).float()
        B = frame0.shape[0]
        return F.grid_sample(frame0.float(), grid.expand(B, -1, -1, -1), mode="bilinear", padding_mode="border",
                             align_corners=False)

    def predict(self, frame0: torch.Tensor, frame1: torch.Tensor) -> torch.Tensor:
        """transfer * warp(frame0) + (1 - transfer) * frame1 (transfer < 1: the model only partly carries a change
        of frame 0 into its prediction and otherwise trusts what it knows of frame 1)."""
        pred = self.warp(frame0)
        if self.transfer != 1.0:
            f1 = torch.as_tensor(frame1, dtype=torch.float32).reshape(-1, *pred.shape[1:]).to(pred.device)
            pred = self.transfer * pred + (1.0 - self.transfer) * f1
        return pred

    def _check(self, frame0: torch.Tensor) -> torch.Tensor:
        if frame0.dim() == 3:
            frame0 = frame0.unsqueeze(0)
        if frame0.dim() != 4 or tuple(frame0.shape[-2:]) != self.image_size or frame0.shape[1] != 3:
            raise ValueError(f"frame0 must be [B, 3, {self.image_size[0]}, {self.image_size[1]}], "
                             f"got {tuple(frame0.shape)}")
        return frame0

    def code_logprobs(self, blocks: torch.Tensor) -> torch.Tensor:
        """blocks [B, N, D] in [0, 1] -> log_softmax(-|x - e|^2 / T) [B, N, K] (fp32)."""
        e = self.codebook
        d2 = (blocks.pow(2).sum(-1, keepdim=True) - 2.0 * blocks @ e.T + e.pow(2).sum(-1))   # [B, N, K]
        d2 = d2.clamp_min(0.0)
        return F.log_softmax(-d2 / self.temperature, dim=-1)

    @torch.no_grad()
    def first_code_logprobs(self, frame0: torch.Tensor, frame1: torch.Tensor, reveal: torch.Tensor, seed: int,
                            last0: torch.Tensor | None = None) -> torch.Tensor:
        """[B, P, K]: first-code distribution of every cell of the warped frame 0 (reveal, seed, last0 and frame1
        do not matter to an ideal predictor; rows of revealed cells are filled like the others)."""
        frame0 = self._check(frame0)
        self.calls += frame0.shape[0]
        pred = self.predict(frame0, frame1)
        logp = self.code_logprobs(image_blocks(pred, self.block, first_only=True, cell=self.cell))   # [B, P, K]
        if self.side_effect > 0:
            H, W = self.image_size
            bw = W // self.block
            r, c = torch.meshgrid(torch.arange(H // self.cell), torch.arange(W // self.cell), indexing="ij")
            first = (2 * r * bw + 2 * c).reshape(-1)                                    # [P] first block of each cell
            logp = F.log_softmax(logp + self._side_effects(frame0, seed)[:, first], dim=-1)
        return logp

    def _side_effects(self, frame0: torch.Tensor, seed: int) -> torch.Tensor:
        """Model of global-attention side effects: logit noise [B, N_blocks, K] ~ side_effect * N(0, 1), seeded
        by (frame-0 content, seed), so any change of frame 0 perturbs every block's distribution a little (a KL floor
        over the whole map; flipped greedy codes far from the bump in the decoded prediction)."""
        H, W = self.image_size
        n = (H // self.block) * (W // self.block)
        out = []
        for b in range(frame0.shape[0]):
            key = (int(torch.round(frame0[b].double() * 64).sum().item()) * 1000003 + int(seed)) % (2 ** 31 - 1)
            g = torch.Generator().manual_seed(key)
            out.append(torch.randn(n, self.codebook.shape[0], generator=g) * self.side_effect)
        return torch.stack(out)

    @torch.no_grad()
    def predict_frame1(self, frame0: torch.Tensor, frame1: torch.Tensor, reveal: torch.Tensor,
                       seed: int) -> torch.Tensor:
        """Greedy decoded prediction, float 0..255 [B, 3, H, W]: every block replaced by its argmax codebook entry
        (nearest entry when side_effect = 0); ``quantize=False`` returns the prediction itself."""
        frame0 = self._check(frame0)
        self.calls += frame0.shape[0]
        pred = self.predict(frame0, frame1)
        if not self.quantize:
            return pred
        B, C, H, W = pred.shape
        b = self.block
        x = image_blocks(pred, b)                                                       # [B, N, D]
        logits = self.code_logprobs(x)                                                  # [B, N, K]
        if self.side_effect > 0:
            logits = logits + self._side_effects(frame0, seed)
        code = logits.argmax(-1)                                                        # [B, N] greedy
        q = self.codebook[code]                                                         # [B, N, D]
        q = q.reshape(B, H // b, W // b, C, b, b).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)
        return q * 255.0
