"""KL-tracing and RGB-difference tracing (Kim, Aw, Kotar et al., arXiv 2507.09082), as pure tensor functions over
a small ``TracerModel`` interface, so any model that predicts per-cell code distributions of frame 1 given frame 0
and a sparse reveal of frame 1 can be traced.

For one query point q in frame 0 (raster px: pixel i spans [i, i+1), centre i+0.5):

1. Perturb. A' = clip(A + b, 0, 255) with the white bump b(x) = a * exp(-|x - q|^2 / (2 sigma^2)) on every
   channel for |x - q| <= r (exactly 0 beyond r; a = 255, sigma = 2 px, r = 4 sigma).      ``gaussian_bump``
2. Two passes per mask k (seed s_k = seed + k, reveal R_k with int(P (1 - mask_ratio)) revealed frame-1 cells):
   the clean pass on (A, B) and the perturbed pass on (A', B) with the same seed, hence the same sequence order
   and the same revealed set; they differ only in the codes the bump changes.
3. KL map. D_k(c) = KL(p_c || p'_c) = sum_j p_c(j) (log p_c(j) - log p'_c(j)) for every masked frame-1 cell c,
   p_c = softmax over the code range of the clean first-code logits, p'_c the perturbed one (fp32 log-softmax).
   Cells revealed in mask k are undefined (NaN) in D_k.                              ``kl_divergence``, ``kl_maps_naive``
4. Average over masks. D(c) = mean over the masks in which c was predicted (``exclude_revealed``; the lab's code
   counted revealed cells as KL 0, which down-weights them: ``exclude_revealed=False``).      ``average_masks``
5. Read-out. c* = argmax D; beyond the paper, a centroid over the 3x3 cells N around c*:
   x = cell * sum_N(w_c col_c) / sum_N(w_c) + kl_center (likewise y), w_c = max(D(c) - median D, 0) ** g
   (g = refine_power; g = 1 is the plain KL-weighted centroid, g < 1 widens the narrow per-cell response, see
   ``readout``). ``kl_center`` is where a cell's response is centred inside the cell: with "first logits only"
   the KL is measured on the patch's first code, i.e. its top-left (cell/2)x(cell/2) sub-block, whose centre is
   (cell/4, cell/4) from the cell's corner (8c+2, 8r+2 for 8-px cells). The ideal-predictor fixture confirms
   this offset (tests/test_kltrace.py: mean signed error ~0 with cell/4, ~+2 px with the patch centre cell/2).
                                                                                                      ``readout``
6. Multi-scale zoom (the lab's eval script). Level 0: both frames resized ("squish") to the model size. Zoom
   level l >= 1: square crops of the ORIGINAL frames, side S_1 = min(H, W) when the frame is not square, else
   zoom_keep * H; S_l = S_1 * zoom_keep^(l-1); crop 0 centred on the query, crop 1 on the current estimate,
   shifted to lie inside the image; both resized to the model size (sigma stays in model px); the estimate in
   crop-1 model px is mapped back to original px and replaces the previous level's.
   ``share_crops``: per level, queries share crop pairs (``group_crops``: each member's query at least
   crop_margin model px inside crop 0 and its estimate inside crop 1), so every level gets the full frame's
   sharing; ``kl_maps_fn`` is called once per (crop pair, mask) with all its members. Without it, one crop
   pair per query (the lab's procedure).
7. Occlusion. score = peak of the mask-averaged KL map, taken at ``occ_level``: "mean" over the levels (default),
   "final" (the last zoom level, as in the lab's adaptation), "first" (the full frame), "min" or "max";
   visible = score >= occ_threshold. Why "mean": with "first logits only" a cell responds only to the bump's
   overlap with its first-code sub-block, so at one level the peak varies 10-100x with the sub-cell phase of the
   destination; the levels see different phases, and their mean is steadier (ideal predictor: visible points
   >= 0.4 in 100 % with "mean" vs 96 % with "final"; every point that left the frame < 0.4 with both).

8. Forward-backward check (beyond the paper; ``fb_threshold`` > 0; null or 0, the default: off). Trace the
   estimate back, p0' = T(B -> A, clamp(p1)) with the same settings, and e = |S (p0' - p0)|,
   S = diag(w_m / W, h_m / H) (model px of the full-frame level); visible = (score >= occ_threshold) and
   (e <= fb_threshold). A point hidden in B has no true match there: its estimate lands on whatever covers it,
   whose backward trace leads to that surface's own place in A (Sundaram et al. 2010, for dense flow); unlike
   the KL peak, e does not scale with the texture's contrast. Costs a second trace.
                                                                                              ``forward_backward``
9. Appearance check (beyond the paper; ``app_threshold`` > 0; null or 0, the default: off). A visible point's
   content is in B near the estimate p; a hidden one's is not (its estimate lands on whatever covers it). With
   q, p the pixels holding the query and the estimate, the (2r+1)^2 patches a(u) = A(q + u), b_s(u) = B(p + s + u):
       e_app = min_{s in [-S, S]^2} mean_{u, ch} |a(u) - b_s(u)| / (std_{u, ch} a + f),
   r = app_radius, S = app_search (px of the frames given), f = app_floor grey levels; pixels of b_s outside B
   are left out of its mean, and a shift with fewer than half of them inside B is no match. visible &= e_app <=
   app_threshold. The search lets tracks that are a few px off still find their content; dividing by the
   patch's contrast makes one threshold serve textures of any contrast. It reads the frames only (no model
   pass) and is the classical brightness-constancy test of occlusion reasoning in flow, added because a small
   teacher's KL peak and round trip separate hidden from visible points poorly on unfamiliar textures.
                                                                                              ``appearance_error``

RGB-difference variant (``rgb_trace``, the paper's "LRAS RGB"): decode clean and perturbed predictions of frame 1
(``predict_frame1``), E(x) = sum_channels |B'_pert(x) - B'_clean(x)|, optionally Gaussian-blurred, averaged over
masks, argmax at pixel resolution (pixel centre), same zoom loop; score = peak difference.

Defaults (``KLTraceConfig``) are the lab's: mask ratio 0.9, 5 masks (seeds 1110..1114), sigma 2, amplitude 255,
threshold 0.4, 4 zoom levels keeping 75 % per level. Pure tensors; no file or environment access.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable

import cv2
import numpy as np
import torch

from .kltrace_config import KLTraceConfig  # noqa: F401  (re-exported: part of this module's API)
import torch.nn.functional as F

from teacher.sequence import sample_reveal


# ---------------------------------------------------------------------------------------------- interface

@runtime_checkable
class TracerModel(Protocol):
    """What tracing needs from a generative model.

    image_size: (H, W) the model sees; cell: px per KL-map cell, the grid is (H // cell, W // cell), P cells.
    Optional attributes: ``kl_center`` (px offset of a cell's response centre from its top-left corner;
    default cell / 4, the first-code sub-block centre) and ``set_views(view0, view1)`` (called before each crop
    pair with the ``View`` maps from model px to the caller's original px; only fixtures that know the ground
    truth, such as ``teacher.ideal.IdealPredictor``, need it)."""
    image_size: tuple[int, int]
    cell: int

    def first_code_logprobs(self, frame0: torch.Tensor, frame1: torch.Tensor, reveal: torch.Tensor, seed: int,
                            last0: torch.Tensor | None = None) -> torch.Tensor:
        """frame0, frame1: float 0..255 [B, 3, H, W] (frame1 may be [1, 3, H, W], broadcast); reveal: bool [P].
        Returns [B, P, K] fp32 log-probs of each frame-1 cell's first code given frame 0 and the revealed cells.
        The sequence order depends only on (seed, last0), so two calls with equal seed/reveal/last0 differ only
        through changed content. Rows of revealed cells are undefined."""
        ...

    def predict_frame1(self, frame0: torch.Tensor, frame1: torch.Tensor, reveal: torch.Tensor,
                       seed: int) -> torch.Tensor:
        """Greedy decoded prediction of frame 1, float 0..255 [B, 3, H, W] (RGB-difference variant)."""
        ...


@dataclass
class TraceResult:
    """targets [Q,2] float32 raster px in the input frames; visible [Q] bool; score [Q] float32 (KL peak, nats, or
    the RGB variant's peak difference); levels [L+1, Q, 2] the estimate after each level (original px); maps
    (with return_maps): one dict per level {"level", "kl" [Q, gh, gw] mask-averaged map (RGB: [Q, h, w]),
    "box0", "box1" [Q, 4] (left, top, width, height) original px of the crops each query saw}; stats:
    {"kl_maps_calls", "model_calls", "crop_pairs": per level}; fb_error [Q] float32 model px (only with the
    forward-backward check, else None); app_error [Q] float32 (only with the appearance check, else None)."""
    targets: torch.Tensor
    visible: torch.Tensor
    score: torch.Tensor
    levels: torch.Tensor
    maps: list | None = None
    stats: dict = field(default_factory=dict)
    fb_error: torch.Tensor | None = None
    app_error: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------- perturbation

def _pixel_centres(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32) + 0.5


def gaussian_bump(frames: torch.Tensor, xy: torch.Tensor, sigma: float, amplitude: float = 255.0,
                  radius: float | None = None) -> torch.Tensor:
    """frames [B or 1, 3, H, W] float 0..255, xy [B, 2] raster px -> [B, 3, H, W]:
    out = clip(frames + a * exp(-d^2 / (2 sigma^2)) * [d <= r], 0, 255), d = |pixel centre - xy| (same bump on
    every channel; r defaults to 4 sigma)."""
    r = 4.0 * float(sigma) if radius is None else float(radius)
    xy = torch.as_tensor(xy, dtype=torch.float32).reshape(-1, 2).cpu()
    B = xy.shape[0]
    if frames.dim() == 3:
        frames = frames.unsqueeze(0)
    H, W = frames.shape[-2:]
    dx = _pixel_centres(W).reshape(1, 1, W) - xy[:, 0].reshape(B, 1, 1)       # [B, 1, W]
    dy = _pixel_centres(H).reshape(1, H, 1) - xy[:, 1].reshape(B, 1, 1)       # [B, H, 1]
    d2 = dx * dx + dy * dy                                                      # [B, H, W]
    g = float(amplitude) * torch.exp(-d2 / (2.0 * float(sigma) ** 2)) * (d2 <= r * r)
    g = g.to(frames.device, torch.float32).unsqueeze(1)                         # [B, 1, H, W]
    return (frames.float() + g).clamp(0.0, 255.0)


def bump_pixels(xy: torch.Tensor, radius: float, image_size: tuple[int, int]) -> list[torch.Tensor]:
    """Per query, the (row, col) [n, 2] of the pixels inside the bump support (d <= radius), in the image.
    Uses exactly the distance computation of ``gaussian_bump``."""
    H, W = int(image_size[0]), int(image_size[1])
    r = float(radius)
    xy = torch.as_tensor(xy, dtype=torch.float32).reshape(-1, 2).cpu()
    k = int(math.ceil(2 * r)) + 3
    off = torch.arange(k)
    out = []
    for x, y in xy.tolist():
        x0, y0 = int(math.floor(x - r - 0.5)) - 1, int(math.floor(y - r - 0.5)) - 1
        cols = (x0 + off).clamp(-1, W)                                          # candidate pixel columns
        rows = (y0 + off).clamp(-1, H)
        dx = (cols.float() + 0.5).reshape(1, k) - torch.tensor(x, dtype=torch.float32)   # as in gaussian_bump
        dy = (rows.float() + 0.5).reshape(k, 1) - torch.tensor(y, dtype=torch.float32)
        inside = (dx * dx + dy * dy) <= r * r                                        # [k rows, k cols]
        inside &= ((rows >= 0) & (rows < H)).reshape(k, 1) & ((cols >= 0) & (cols < W)).reshape(1, k)
        ii, jj = torch.nonzero(inside, as_tuple=True)
        pix = torch.stack([rows[ii], cols[jj]], dim=1)
        out.append(torch.unique(pix, dim=0) if pix.numel() else pix.reshape(0, 2))
    return out


def touched_cells(xy: torch.Tensor, cfg: KLTraceConfig, image_size: tuple[int, int], cell: int) -> list[torch.Tensor]:
    """Per query, the sorted cell ids (row * (W // cell) + col) containing any pixel the bump can change."""
    gw = int(image_size[1]) // int(cell)
    out = []
    for pix in bump_pixels(xy, cfg.bump_radius, image_size):
        ids = (pix[:, 0] // cell) * gw + pix[:, 1] // cell
        out.append(torch.unique(ids))
    return out


def touched_union(xy: torch.Tensor, cfg: KLTraceConfig, image_size: tuple[int, int], cell: int) -> torch.Tensor:
    """Sorted union of ``touched_cells`` over all queries."""
    cells = touched_cells(xy, cfg, image_size, cell)
    if not cells:
        return torch.zeros(0, dtype=torch.long)
    return torch.unique(torch.cat(cells))


# ---------------------------------------------------------------------------------------------- KL maps

def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_j p_j (log p_j - log q_j) over the last dim, fp32 (terms with p_j = 0 are 0).
    logp, logq broadcast: e.g. [1, M, K] clean vs [b, M, K] perturbed -> [b, M]."""
    logp, logq = logp.float(), logq.float()
    p = logp.exp()
    term = torch.where(p > 0, p * (logp - logq), torch.zeros((), dtype=torch.float32, device=p.device))
    return term.sum(-1)


KLMapsFn = Callable[..., torch.Tensor]
"""(model, frame0 [3,H,W], frame1 [3,H,W] float 0..255, queries [Q,2] model px, reveal bool [P], seed, cfg)
-> [Q, P] KL(clean || perturbed) per cell, NaN at revealed cells."""


def kl_map_inputs(reveal: torch.Tensor, queries: torch.Tensor):
    """Normalise the arguments of a KL-maps function: reveal bool [P], queries float32 [Q, 2], the NaN-filled
    output [Q, P] (NaN stays at revealed cells) and the masked cell ids [M]."""
    reveal = torch.as_tensor(reveal, dtype=torch.bool).reshape(-1)
    xy = torch.as_tensor(queries, dtype=torch.float32).reshape(-1, 2)
    out = torch.full((xy.shape[0], reveal.numel()), float("nan"))
    return reveal, xy, out, torch.nonzero(~reveal).reshape(-1)


@torch.no_grad()
def kl_maps_naive(model: TracerModel, frame0: torch.Tensor, frame1: torch.Tensor, queries: torch.Tensor,
                  reveal: torch.Tensor, seed: int, cfg: KLTraceConfig, last0: torch.Tensor | None = None,
                  share_clean: bool = False) -> torch.Tensor:
    """The lab's procedure: per query, a clean and a perturbed pass (same seed, reveal, last0), KL per masked cell.
    Queries go ``cfg.batch`` at a time; each model call holds [clean x b, perturbed x b] rows. ``share_clean``
    computes the clean pass once (identical result, fewer rows). Returns [Q, P], NaN at revealed cells."""
    reveal, xy, out, masked = kl_map_inputs(reveal, queries)
    Q = xy.shape[0]
    if Q == 0:
        return out
    f0 = torch.as_tensor(frame0, dtype=torch.float32).reshape(1, *frame0.shape[-3:])
    f1 = torch.as_tensor(frame1, dtype=torch.float32).reshape(1, *frame1.shape[-3:])
    clean = None
    if share_clean:
        clean = model.first_code_logprobs(f0, f1, reveal, seed, last0=last0)[:, masked]        # [1, M, K]
    for s in range(0, Q, int(cfg.batch)):
        q = xy[s:s + int(cfg.batch)]
        b = q.shape[0]
        pert = gaussian_bump(f0, q, cfg.sigma, cfg.amplitude, cfg.bump_radius)                  # [b, 3, H, W]
        if share_clean:
            logq = model.first_code_logprobs(pert, f1, reveal, seed, last0=last0)[:, masked]   # [b, M, K]
            logp = clean
        else:
            both = torch.cat([f0.to(pert.device).expand(b, -1, -1, -1), pert], dim=0)          # [2b, 3, H, W]
            lp = model.first_code_logprobs(both, f1, reveal, seed, last0=last0)[:, masked]      # [2b, M, K]
            logp, logq = lp[:b], lp[b:]
        out[s:s + b, masked] = kl_divergence(logp, logq).cpu()
    return out


def average_masks(maps: torch.Tensor) -> torch.Tensor:
    """[M, Q, P] per-mask maps with NaN at revealed cells -> [Q, P] mean over the masks in which each cell was
    predicted (revealed cells excluded, never counted as 0); NaN where a cell was revealed in every mask."""
    return torch.nanmean(maps.float(), dim=0)


def readout(kl: torch.Tensor, cell: int, refine: str = "centroid3x3", center: float | None = None,
            power: float = 0.25, floor: str = "median") -> tuple[torch.Tensor, torch.Tensor]:
    """kl [Q, gh, gw] (NaN = unknown) -> (xy [Q, 2] px, peak [Q] = max KL).

    (r*, c*) = argmax kl.  "argmax": x = cell * c* + center, y = cell * r* + center.
    "centroid3x3": over the 3x3 cells N around (r*, c*) inside the grid, w_c = max(kl_c - f, 0) ** power
    (NaN -> 0; f = the map's median KL with floor="median", else 0),
        x = cell * sum_N(w_c col_c) / sum_N(w_c) + center,   y = cell * sum_N(w_c row_c) / sum_N(w_c) + center.
    power = 1 is the plain KL-weighted centroid. The response of a cell falls off fast with the bump's distance
    from its first-code sub-block (a near-Gaussian in the distance, narrower than the 8-px cell pitch), so plain
    KL weights snap to the peak cell; power < 1 widens the weights (KL^g of a Gaussian is a Gaussian sqrt(1/g)
    wider), and the median floor removes the KL that side effects add everywhere before that. On the ideal
    predictor (tests/test_kltrace.py) the full-frame read-out's median error drops from ~2.4 px (power 1) to
    ~0.4 px (power 0.25).
    center defaults to cell/4: the response centre of "first logits only" (module docstring). A map with no
    finite value gives peak 0 and the image centre."""
    if refine not in ("centroid3x3", "argmax"):
        raise ValueError(f"refine must be centroid3x3|argmax, got {refine!r}")
    if floor not in ("median", "none"):
        raise ValueError(f"floor must be median|none, got {floor!r}")
    cell = int(cell)
    center = cell / 4.0 if center is None else float(center)
    Q, gh, gw = kl.shape
    k = torch.nan_to_num(kl.float(), nan=-math.inf)
    peak, arg = k.reshape(Q, -1).max(dim=1)                                    # [Q]
    empty = ~torch.isfinite(peak)
    r, c = (arg // gw).float(), (arg % gw).float()
    if refine == "centroid3x3":
        base = torch.zeros(Q, 1, 1)
        if floor == "median":
            base = torch.nan_to_num(torch.nanmedian(kl.float().reshape(Q, -1), dim=1).values, nan=0.0)
            base = base.reshape(Q, 1, 1)
        w = (torch.nan_to_num(kl.float(), nan=0.0) - base).clamp_min(0.0) ** float(power)   # [Q, gh, gw]
        rr = torch.arange(gh, dtype=torch.float32).reshape(1, gh, 1)
        cc = torch.arange(gw, dtype=torch.float32).reshape(1, 1, gw)
        win = ((rr - r.reshape(Q, 1, 1)).abs() <= 1) & ((cc - c.reshape(Q, 1, 1)).abs() <= 1)
        w = w * win
        tot = w.sum(dim=(1, 2))
        ok = tot > 0
        r = torch.where(ok, (w * rr).sum(dim=(1, 2)) / tot.clamp_min(1e-30), r)
        c = torch.where(ok, (w * cc).sum(dim=(1, 2)) / tot.clamp_min(1e-30), c)
    xy = torch.stack([cell * c + center, cell * r + center], dim=1)
    if bool(empty.any()):
        xy[empty] = torch.tensor([gw * cell / 2.0, gh * cell / 2.0])
        peak = torch.where(empty, torch.zeros_like(peak), peak)
    return xy, peak


# ---------------------------------------------------------------------------------------------- geometry

@dataclass(frozen=True)
class View:
    """Maps model px (u, v) of a resized crop to original px: X = left + u * sx, Y = top + v * sy."""
    left: float
    top: float
    sx: float
    sy: float

    @classmethod
    def of_box(cls, box: tuple[int, int, int, int], model_hw: tuple[int, int]) -> "View":
        left, top, w, h = box
        return cls(float(left), float(top), w / float(model_hw[1]), h / float(model_hw[0]))

    def to_orig(self, uv: torch.Tensor) -> torch.Tensor:
        uv = torch.as_tensor(uv, dtype=torch.float64)
        return torch.stack([self.left + uv[..., 0] * self.sx, self.top + uv[..., 1] * self.sy], dim=-1)

    def to_model(self, xy: torch.Tensor) -> torch.Tensor:
        xy = torch.as_tensor(xy, dtype=torch.float64)
        return torch.stack([(xy[..., 0] - self.left) / self.sx, (xy[..., 1] - self.top) / self.sy], dim=-1)


@dataclass
class CropPair:
    """box0 / box1 = (left, top, width, height) integer original px of the frame-0 / frame-1 crops; members =
    indices of the queries traced in this pair."""
    box0: tuple[int, int, int, int]
    box1: tuple[int, int, int, int]
    members: torch.Tensor


def _allowed(p: np.ndarray, side: int, margin: float, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Left edges L of a crop [L, L+side) inside [0, limit) keeping p at least margin from both edges:
    [p - side + margin, p - margin], clamped into [0, limit - side] (an edge point gets the crop touching it)."""
    hi_img = float(limit - side)
    lo = np.clip(p - side + margin, 0.0, hi_img)
    hi = np.clip(p - margin, 0.0, hi_img)
    return lo, hi


def _place(target: float, lo: float, hi: float, limit: int, side: int) -> int:
    """An integer left edge, as close to ``target`` as the interval [lo, hi] and the image allow."""
    a, b = math.ceil(lo - 1e-9), math.floor(hi + 1e-9)
    if a <= b:
        return int(min(max(round(target), a), b))
    return int(min(max(round((lo + hi) / 2.0), 0), limit - side))


def per_query_crops(points0: torch.Tensor, points1: torch.Tensor, side: int,
                    image_hw: tuple[int, int]) -> list[CropPair]:
    """One crop pair per query: crop 0 centred on its query, crop 1 on its estimate, shifted inside the image."""
    H, W = int(image_hw[0]), int(image_hw[1])
    side = int(side)
    p0 = torch.as_tensor(points0, dtype=torch.float64).reshape(-1, 2).numpy()
    p1 = torch.as_tensor(points1, dtype=torch.float64).reshape(-1, 2).numpy()
    out = []
    for i in range(p0.shape[0]):
        b0 = (_place(p0[i, 0] - side / 2, 0, W - side, W, side), _place(p0[i, 1] - side / 2, 0, H - side, H, side),
              side, side)
        b1 = (_place(p1[i, 0] - side / 2, 0, W - side, W, side), _place(p1[i, 1] - side / 2, 0, H - side, H, side),
              side, side)
        out.append(CropPair(b0, b1, torch.tensor([i], dtype=torch.long)))
    return out


def group_crops(points0: torch.Tensor, points1: torch.Tensor, side: int, image_hw: tuple[int, int],
                margin: float) -> list[CropPair]:
    """Pack queries into shared square crop pairs of ``side`` px (greedy, deterministic).

    Each member's point0 lies in crop 0 and its point1 in crop 1, both at least ``margin`` px from the crop
    edges (up to half a pixel of integer rounding), except where the image edge makes that impossible (then
    the crop touches that edge, exactly as a per-query crop would). Seeds are taken in raster order of point0
    (y, then x, then index); each group grows by the remaining queries nearest to its seed (Chebyshev distance
    over both points) that keep the four feasible intervals of left/top edges non-empty. A crop is placed as
    close as allowed to centring its members' mean point, so a singleton equals ``per_query_crops``."""
    H, W = int(image_hw[0]), int(image_hw[1])
    side = int(side)
    if side > min(H, W) or side < 1:
        raise ValueError(f"crop side {side} does not fit the {H}x{W} image")
    m = float(min(max(margin, 0.0), side / 2.0))
    p0 = torch.as_tensor(points0, dtype=torch.float64).reshape(-1, 2).numpy()
    p1 = torch.as_tensor(points1, dtype=torch.float64).reshape(-1, 2).numpy()
    Q = p0.shape[0]
    lims = (W, H, W, H)
    coords = np.stack([p0[:, 0], p0[:, 1], p1[:, 0], p1[:, 1]], axis=1)           # [Q, 4]
    lo = np.empty((Q, 4))
    hi = np.empty((Q, 4))
    for j in range(4):
        lo[:, j], hi[:, j] = _allowed(coords[:, j], side, m, lims[j])
    order = np.lexsort((np.arange(Q), p0[:, 0], p0[:, 1]))
    free = np.ones(Q, dtype=bool)
    out = []
    for s in order:
        if not free[s]:
            continue
        cur_lo, cur_hi = lo[s].copy(), hi[s].copy()
        members = [int(s)]
        free[s] = False
        cand = np.nonzero(free & np.all((lo <= cur_hi) & (hi >= cur_lo), axis=1))[0]
        if cand.size:
            dist = np.abs(coords[cand] - coords[s]).max(axis=1)
            cand = cand[np.lexsort((cand, dist))]
            for c in cand.tolist():
                nlo = np.maximum(cur_lo, lo[c])
                nhi = np.minimum(cur_hi, hi[c])
                if np.all(nlo <= nhi + 1e-9):
                    cur_lo, cur_hi = nlo, nhi
                    members.append(c)
                    free[c] = False
        idx = np.array(sorted(members))
        mean = coords[idx].mean(axis=0)
        L = [_place(mean[j] - side / 2.0, cur_lo[j], cur_hi[j], lims[j], side) for j in range(4)]
        out.append(CropPair((L[0], L[1], side, side), (L[2], L[3], side, side), torch.as_tensor(idx)))
    return out


def _as_hwc_uint8(frame) -> np.ndarray:
    a = frame.detach().cpu().numpy() if isinstance(frame, torch.Tensor) else np.asarray(frame)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"frames must be [H, W, 3] uint8, got shape {a.shape}")
    if a.dtype != np.uint8:
        a = np.clip(np.rint(a.astype(np.float64)), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a)


def crop_resize(img: np.ndarray, box: tuple[int, int, int, int], model_hw: tuple[int, int]) -> torch.Tensor:
    """[H, W, 3] uint8, box (left, top, w, h) -> float 0..255 [3, h_m, w_m]: crop, then cv2 INTER_AREA when
    shrinking, INTER_LINEAR when enlarging (cv2 maps pixel centres, so model px u <-> left + u * w / w_m)."""
    left, top, w, h = (int(v) for v in box)
    hm, wm = int(model_hw[0]), int(model_hw[1])
    crop = img[top:top + h, left:left + w]
    if (w, h) != (wm, hm):
        interp = cv2.INTER_AREA if (wm <= w and hm <= h) else cv2.INTER_LINEAR
        crop = cv2.resize(crop, (wm, hm), interpolation=interp)
    return torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float()


def zoom_sides(image_hw: tuple[int, int], zoom_levels: int, zoom_keep: float) -> list[int]:
    """Crop side of each zoom level 1..L (original px): S_1 = min(H, W) for a non-square frame, else
    zoom_keep * H; S_l = S_1 * zoom_keep^(l-1), rounded, at least 1."""
    H, W = int(image_hw[0]), int(image_hw[1])
    s1 = float(min(H, W)) if H != W else zoom_keep * H
    return [max(1, int(round(s1 * zoom_keep ** (l - 1)))) for l in range(1, int(zoom_levels) + 1)]


# ---------------------------------------------------------------------------------------------- tracing

LevelSolver = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _multiscale(model: TracerModel, frame0, frame1, queries, cfg: KLTraceConfig, solve, return_maps: bool,
                stats: dict) -> TraceResult:
    """The zoom loop shared by KL and RGB tracing; ``solve(f0m, f1m, q_model)`` -> (xy model px, peak, map)."""
    f0, f1 = _as_hwc_uint8(frame0), _as_hwc_uint8(frame1)
    if f0.shape != f1.shape:
        raise ValueError(f"frame shapes differ: {f0.shape} vs {f1.shape}")
    H, W = f0.shape[:2]
    hw = (int(model.image_size[0]), int(model.image_size[1]))
    q = torch.as_tensor(queries, dtype=torch.float64).reshape(-1, 2)
    Q = q.shape[0]
    stats.setdefault("crop_pairs", [])
    est = q.clone()
    levels, peaks, maps = [], [], []
    sides = [None] + zoom_sides((H, W), cfg.zoom_levels, cfg.zoom_keep)
    for level, side in enumerate(sides):
        if Q == 0:
            break
        if side is None:
            pairs = [CropPair((0, 0, W, H), (0, 0, W, H), torch.arange(Q))]
        elif cfg.share_crops:
            margin = float(cfg.crop_margin) * side / float(min(hw))               # model px -> original px
            pairs = group_crops(q, est, side, (H, W), margin)
        else:
            pairs = per_query_crops(q, est, side, (H, W))
        stats["crop_pairs"].append(len(pairs))
        new = torch.empty(Q, 2, dtype=torch.float64)
        peak = torch.empty(Q, dtype=torch.float32)
        lvl_map, box0s, box1s = None, torch.empty(Q, 4), torch.empty(Q, 4)
        for pair in pairs:
            v0, v1 = View.of_box(pair.box0, hw), View.of_box(pair.box1, hw)
            if callable(getattr(model, "set_views", None)):
                model.set_views(v0, v1)
            f0m, f1m = crop_resize(f0, pair.box0, hw), crop_resize(f1, pair.box1, hw)
            mem = pair.members
            qm = v0.to_model(q[mem]).float()
            xy_m, pk, mp = solve(f0m, f1m, qm)
            new[mem] = v1.to_orig(xy_m.double())
            peak[mem] = pk.float()
            if return_maps:
                if lvl_map is None:
                    lvl_map = torch.full((Q, *mp.shape[1:]), float("nan"))
                lvl_map[mem] = mp.float()
                box0s[mem] = torch.tensor(pair.box0, dtype=torch.float32)
                box1s[mem] = torch.tensor(pair.box1, dtype=torch.float32)
        est = new
        levels.append(est.float())
        peaks.append(peak)
        if return_maps:
            maps.append({"level": level, "kl": lvl_map, "box0": box0s, "box1": box1s})
    if Q == 0:
        empty = torch.zeros(0, 2)
        return TraceResult(empty, torch.zeros(0, dtype=torch.bool), torch.zeros(0),
                           torch.zeros(len(sides), 0, 2), [] if return_maps else None, stats)
    pk = torch.stack(peaks)                                                      # [L+1, Q]
    score = {"final": pk[-1], "first": pk[0], "min": pk.min(0).values, "mean": pk.mean(0),
             "max": pk.max(0).values}[cfg.occ_level]
    thr = cfg.occ_threshold if cfg.method == "kl" else cfg.rgb_occ_threshold
    return TraceResult(targets=est.float(), visible=score >= thr, score=score.float(), levels=torch.stack(levels),
                       maps=maps if return_maps else None, stats=stats)


@torch.no_grad()
def kl_trace(model: TracerModel, frame0, frame1, queries, cfg: KLTraceConfig | None = None,
             kl_maps_fn: KLMapsFn = kl_maps_naive, return_maps: bool = False) -> TraceResult:
    """KL-tracing of queries [Q, 2] (raster px of frame0; frames [H, W, 3] uint8, any size) into frame1.

    Steps 2-7 of the module docstring; ``kl_maps_fn`` (``kl_maps_naive`` or an engine) is called once per
    (crop pair, mask) with all the pair's queries. ``cfg.method == "rgb"`` runs ``rgb_trace`` instead."""
    cfg = cfg or KLTraceConfig()
    if _app_on(cfg):
        res = kl_trace(model, frame0, frame1, queries, dataclasses.replace(cfg, app_threshold=None), kl_maps_fn,
                       return_maps)
        return appearance_check(res, frame0, frame1, queries, cfg)
    if _fb_on(cfg):
        return forward_backward(lambda a, b, q, c: kl_trace(model, a, b, q, c, kl_maps_fn, return_maps),
                                model, frame0, frame1, queries, cfg)
    if cfg.method == "rgb":
        return rgb_trace(model, frame0, frame1, queries, cfg, return_maps=return_maps)
    h, w = int(model.image_size[0]), int(model.image_size[1])
    cell = int(model.cell)
    gh, gw = h // cell, w // cell
    P = gh * gw
    center = cfg.kl_center if cfg.kl_center is not None else getattr(model, "kl_center", None)
    stats = {"kl_maps_calls": 0, "model_calls": 0}
    reveals = [sample_reveal(P, cfg.mask_ratio, cfg.seed + k) for k in range(int(cfg.num_masks))]

    def solve(f0m, f1m, qm):
        per_mask = []
        for k, reveal in enumerate(reveals):
            m = kl_maps_fn(model, f0m, f1m, qm, reveal, cfg.seed + k, cfg)               # [Qg, P]
            stats["kl_maps_calls"] += 1
            m = torch.as_tensor(m, dtype=torch.float32).reshape(qm.shape[0], P).cpu()
            if not cfg.exclude_revealed:
                m = torch.nan_to_num(m, nan=0.0)
            per_mask.append(m)
        avg = average_masks(torch.stack(per_mask)).reshape(-1, gh, gw)                  # [Qg, gh, gw]
        xy, peak = readout(avg, cell, cfg.refine, center, cfg.refine_power, cfg.refine_floor)
        return xy, peak, avg

    return _multiscale(model, frame0, frame1, queries, cfg, solve, return_maps, stats)


def _app_on(cfg: KLTraceConfig) -> bool:
    return cfg.app_threshold is not None and 0 < cfg.app_threshold < math.inf   # null, 0 or inf: no check


def appearance_error(frame0, frame1, queries, targets, radius: int = 3, search: int = 4,
                     floor: float = 8.0) -> torch.Tensor:
    """Step 9: e_app [Q] float32 for queries / targets [Q, 2] (raster px of frames [H, W, 3], any size).

    e_app = min over shifts s in [-S, S]^2 of mean |A(q + u) - B(p + s + u)| / (std A(q + u) + floor), u in
    [-r, r]^2, over the 3 channels; q, p = the pixels holding the query and the target (clamped into the frame);
    A is edge-padded, pixels of B outside the frame are left out and a shift with fewer than half of its pixels
    inside B counts as no match (inf)."""
    a_img = torch.from_numpy(_as_hwc_uint8(frame0)).permute(2, 0, 1).float()         # [3, H, W]
    b_img = torch.from_numpy(_as_hwc_uint8(frame1)).permute(2, 0, 1).float()
    if a_img.shape != b_img.shape:
        raise ValueError(f"frame shapes differ: {tuple(a_img.shape)} vs {tuple(b_img.shape)}")
    H, W = a_img.shape[1:]
    r, S = int(radius), int(search)
    q = torch.as_tensor(queries, dtype=torch.float64).reshape(-1, 2)
    p = torch.as_tensor(targets, dtype=torch.float64).reshape(-1, 2)
    if q.shape != p.shape:
        raise ValueError(f"queries {tuple(q.shape)} and targets {tuple(p.shape)} differ")
    if q.shape[0] == 0:
        return torch.zeros(0)

    def pix(xy):                                                                       # [Q] x, y pixel ids
        return (xy[:, 0].floor().clamp(0, W - 1).long(), xy[:, 1].floor().clamp(0, H - 1).long())

    u = torch.arange(-r, r + 1)
    qx, qy = pix(q)
    a_pad = F.pad(a_img[None], (r, r, r, r), mode="replicate")[0]
    a = a_pad[:, (qy[:, None] + u + r)[:, :, None], (qx[:, None] + u + r)[:, None, :]]   # [3, Q, k, k]
    m = r + S
    b_pad = torch.full((3, H + 2 * m, W + 2 * m), float("nan"))
    b_pad[:, m:m + H, m:m + W] = b_img
    px, py = pix(p)
    v = torch.arange(-m, m + 1)
    b = b_pad[:, (py[:, None] + v + m)[:, :, None], (px[:, None] + v + m)[:, None, :]]   # [3, Q, K, K]
    k = 2 * r + 1
    win = b.unfold(2, k, 1).unfold(3, k, 1)                                            # [3, Q, 2S+1, 2S+1, k, k]
    diff = (win - a[:, :, None, None]).abs()
    inside = (~diff.isnan()).float().mean(dim=(0, 4, 5))                               # [Q, 2S+1, 2S+1]
    mad = diff.nanmean(dim=(0, 4, 5))
    mad = torch.where(inside >= 0.5, mad, torch.full_like(mad, float("inf")))
    scale = a.permute(1, 0, 2, 3).reshape(q.shape[0], -1).std(dim=1, unbiased=False) + float(floor)
    return (mad.flatten(1).amin(dim=1) / scale).float()


def appearance_check(res: TraceResult, frame0, frame1, queries, cfg: KLTraceConfig) -> TraceResult:
    """Step 9 on a finished trace: sets ``res.app_error`` and visible &= app_error <= app_threshold."""
    err = appearance_error(frame0, frame1, queries, res.targets, cfg.app_radius, cfg.app_search, cfg.app_floor)
    res.app_error = err
    res.visible = res.visible & (err <= float(cfg.app_threshold))
    return res


def _fb_on(cfg: KLTraceConfig) -> bool:
    return cfg.fb_threshold is not None and 0 < cfg.fb_threshold < math.inf     # null, 0 or inf: no check


def forward_backward(trace: Callable, model: TracerModel, frame0, frame1, queries,
                     cfg: KLTraceConfig) -> TraceResult:
    """Step 8: ``trace(f_a, f_b, points, cfg)`` forward, then back from the estimate clamped into the frame;
    e = |S (p0' - p0)| in full-frame model px; visible &= e <= fb_threshold. Returns the forward result with
    ``fb_error`` set and the backward call counts added to ``stats`` (prefixed "backward_")."""
    plain = dataclasses.replace(cfg, fb_threshold=None)
    q = torch.as_tensor(queries, dtype=torch.float64).reshape(-1, 2)
    fwd = trace(frame0, frame1, q, plain)
    H, W = _as_hwc_uint8(frame1).shape[:2]
    p1 = fwd.targets.double()
    back_q = torch.stack([p1[:, 0].clamp(0.5, W - 0.5), p1[:, 1].clamp(0.5, H - 0.5)], dim=1)
    bwd = trace(frame1, frame0, back_q, plain)
    scale = torch.tensor([model.image_size[1] / W, model.image_size[0] / H], dtype=torch.float64)
    err = ((bwd.targets.double() - q) * scale).norm(dim=1).float()                      # [Q] model px
    fwd.visible = fwd.visible & (err <= float(cfg.fb_threshold))
    fwd.fb_error = err
    fwd.stats.update({f"backward_{k}": v for k, v in bwd.stats.items()})
    return fwd


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """[N, H, W] -> same, separable Gaussian (radius ceil(3 sigma), reflect padding); sigma <= 0: unchanged."""
    if sigma <= 0:
        return x
    r = int(math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-t * t / (2 * sigma * sigma))
    k = k / k.sum()
    y = x.unsqueeze(1)                                                                   # [N, 1, H, W]
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="reflect"), k.reshape(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), k.reshape(1, 1, -1, 1))
    return y.squeeze(1)


@torch.no_grad()
def rgb_trace(model: TracerModel, frame0, frame1, queries, cfg: KLTraceConfig | None = None,
              return_maps: bool = False) -> TraceResult:
    """RGB-difference tracing: E = mean over masks of blur(sum_ch |predict_frame1(A') - predict_frame1(A)|),
    target = argmax pixel centre, score = peak E; same zoom loop as ``kl_trace``."""
    cfg = cfg or KLTraceConfig(method="rgb")
    if cfg.method != "rgb":
        cfg = dataclasses.replace(cfg, method="rgb")
    if _app_on(cfg):
        res = rgb_trace(model, frame0, frame1, queries, dataclasses.replace(cfg, app_threshold=None), return_maps)
        return appearance_check(res, frame0, frame1, queries, cfg)
    if _fb_on(cfg):
        return forward_backward(lambda a, b, q, c: rgb_trace(model, a, b, q, c, return_maps),
                                model, frame0, frame1, queries, cfg)
    h, w = int(model.image_size[0]), int(model.image_size[1])
    P = (h // int(model.cell)) * (w // int(model.cell))
    stats = {"kl_maps_calls": 0, "model_calls": 0}
    reveals = [sample_reveal(P, cfg.mask_ratio, cfg.seed + k) for k in range(int(cfg.num_masks))]

    def solve(f0m, f1m, qm):
        Qg = qm.shape[0]
        acc = torch.zeros(Qg, h, w)
        f0b, f1b = f0m.unsqueeze(0), f1m.unsqueeze(0)
        for k, reveal in enumerate(reveals):
            seed = cfg.seed + k
            clean = model.predict_frame1(f0b, f1b, reveal, seed).float().cpu()          # [1, 3, h, w]
            stats["model_calls"] += 1
            for s in range(0, Qg, int(cfg.batch)):
                q = qm[s:s + int(cfg.batch)]
                pert = gaussian_bump(f0b, q, cfg.sigma, cfg.amplitude, cfg.bump_radius)
                pred = model.predict_frame1(pert, f1b, reveal, seed).float().cpu()        # [b, 3, h, w]
                stats["model_calls"] += 1
                acc[s:s + q.shape[0]] += gaussian_blur((pred - clean).abs().sum(1), cfg.rgb_blur)
        acc /= len(reveals)
        peak, arg = acc.reshape(Qg, -1).max(dim=1)
        xy = torch.stack([(arg % w).float() + 0.5, (arg // w).float() + 0.5], dim=1)
        return xy, peak, acc

    return _multiscale(model, frame0, frame1, queries, cfg, solve, return_maps, stats)
