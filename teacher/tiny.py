"""A tiny generative two-frame model that KL-tracing can read on a CPU budget.

The 7B LRAS learns in-context correspondence from scale. A ~1M-parameter LRAS trained for minutes on a CPU does
not (reference/tiny_teacher_notes.md: it settles on "copy frame 0 in place, blurred"). This model keeps what
KL-tracing needs -- an LRAS transformer over pointer + code tokens from a strictly local tokenizer, random-access
order, a per-patch distribution over codes, trained only on the likelihood of frame-1 codes -- and adds two
inductive biases that make the prediction depend on *where* frame-0 content went:

1. a **cost volume on revealed frame-1 patches only**: for a revealed patch r (its pixels are revealed content),
       C_r(d) = -mean_{window(r)} ||I1(x) - I0(x - d)||^2 ,   d in [-R, R]^2,
   softmaxed with a learned temperature, m_r(d) = softmax_d(C_r(d) / tau), and added (through a linear layer) to
   the embedding of r's pointer token. It is never computed from unrevealed content.
2. a **copy head**: the distribution of masked patch c's code is a mixture
       p_c(k) = (1 - eps_c) * sum_d m_c(d) * q(k | I0 block at c - d)  +  eps_c * softmax(lm_head(h_c))_k
   where m_c(d) = softmax_d( log sum_r a_{c,r} m_r(d) + W_off h_c ) pools the revealed patches' motion with
   attention weights a_{c,r} = softmax_r(<W_q h_c, W_k h_r>) from the transformer states (so the network learns
   which revealed patches move like c), and q(k | block) = prod_i sigmoid(+-beta z_i(block)) is the LFQ code
   distribution of the displaced frame-0 4x4 block (z = the quantizer's pre-sign projection).

Two optional biases sharpen the pooling (``appearance``, ``dist_bias``, both on by default):
       m_c(d) = sum_r a_{c,r} m_r(d) exp(-s_app ||phi0(c - d) - phi1(r)||^2),
       a_{c,r} = softmax_r(<W_q h_c, W_k h_r> / sqrt(k) - s_dist |c - r|^2),     (|c - r| in patches)
   where phi = (mean, std) of a 4x4 block's RGB in [0, 1]: a revealed patch votes for offset d at c in proportion to
   how much the frame-0 content that d would bring into c looks like the revealed patch's own frame-1 content (so a
   patch on a moving object takes the object's motion, not the background's), and nearby patches count more.

Patches are 4x4 px with one code each (LRAS's layout with ``codes_per_side = 1``), so the KL map has 4-px cells
and a cell's response is centred on the block centre (``kl_center = 2``). With a copy head, KL-tracing reads
out the model's learned offset pooling: a designed warp prior, not emergent correspondence as in the 7B LRAS.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .lpq import LPQ, PRESETS as LPQ_PRESETS, codes_to_bits, normalize
from .lras import LRAS, LRASConfig
from .sequence import TokenLayout, build_first_logits_sequence, move_last, shuffle_orders


@dataclass
class TinyTeacherConfig:
    image_size: int = 64          # square frames the model sees (callers resize)
    patch: int = 4                # px per patch = one LPQ code (codes_per_side = 1)
    radius: int = 8               # copy-head / cost-volume offsets d in [-radius, radius]^2 (model px)
    cv_window: int = 8            # px of the window around a revealed patch used for its cost volume
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    key_dim: int = 32
    lpq_preset: str = "tiny"      # teacher.lpq.PRESETS name (8-bit codes)
    eps_init: float = -3.0        # initial logit of the generic-head weight
    chunk: int = 64               # masked patches per chunk when materialising full code distributions
    top_offsets: int = 32         # tracing: keep the k most likely offsets per patch (shared by a call's rows,
                                  # renormalised); 0 = all (2 radius + 1)^2. Training always uses all.
    appearance: bool = True       # offset votes weighted by frame-0 source vs revealed frame-1 appearance
    dist_bias: bool = True        # pooling attention penalises the distance between query and revealed patch
    dist_init: float | None = 0.125  # dist_bias weight per squared cell distance, learned in log space (0.125:
                                  # a Gaussian of 2 cells); None: the first bundles' softplus(s) / grid^2 form,
                                  # where a 2-cell kernel needs s ~ 32, i.e. ~30k Adam steps at lr 1e-3

    def __post_init__(self):
        if self.patch != 4:
            raise ValueError("TinyTeacherConfig.patch must be 4 (one LPQ code per patch)")
        if self.image_size % self.patch or self.image_size <= 0:
            raise ValueError(f"image_size {self.image_size} must be a positive multiple of {self.patch}")
        if self.dist_init is not None and not self.dist_init > 0:
            raise ValueError(f"dist_init must be > 0 or null, got {self.dist_init!r}")
        if self.lpq_preset not in LPQ_PRESETS:
            raise ValueError(f"unknown lpq_preset {self.lpq_preset!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class TinyTeacher(nn.Module):
    """LRAS trunk + revealed-patch cost volume + copy head. Implements ``teacher.kltrace.TracerModel``."""

    def __init__(self, config: TinyTeacherConfig):
        super().__init__()
        self.config = c = config
        self.lpq = LPQ(LPQ_PRESETS[c.lpq_preset])
        self.n_codes = self.lpq.config.codebook_size
        self.bits = self.lpq.config.codebook_bits
        self.grid = c.image_size // c.patch
        self.layout = TokenLayout.for_sizes(self.n_codes, self.grid, codes_per_side=1)
        self.lras = LRAS(LRASConfig(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
                                    vocab_size=self.layout.vocab_size, block_size=self.layout.block_size))
        D = (2 * c.radius + 1) ** 2
        self.cv_embed = nn.Linear(D, c.n_embd)
        self.w_q = nn.Linear(c.n_embd, c.key_dim)
        self.w_k = nn.Linear(c.n_embd, c.key_dim)
        self.off_head = nn.Linear(c.n_embd, D)
        nn.init.zeros_(self.off_head.weight)
        nn.init.zeros_(self.off_head.bias)
        self.eps_head = nn.Linear(c.n_embd, 1)
        nn.init.constant_(self.eps_head.bias, c.eps_init)
        self.log_tau = nn.Parameter(torch.tensor(math.log(0.01)))
        self.log_beta = nn.Parameter(torch.tensor(math.log(4.0)))
        if c.appearance:
            self.app_scale = nn.Parameter(torch.tensor(3.0))   # softplus -> weight on -||phi0(c-d) - phi1(r)||^2
        if c.dist_bias and c.dist_init is None:
            self.dist_scale = nn.Parameter(torch.tensor(0.0))  # softplus -> weight on -|c - r|^2 / grid^2
        elif c.dist_bias:
            self.log_dist = nn.Parameter(torch.tensor(math.log(c.dist_init)))  # exp -> weight on -|c - r|^2
        r = torch.arange(-c.radius, c.radius + 1)
        offs = torch.stack(torch.meshgrid(r, r, indexing="ij"), -1).reshape(-1, 2)      # [D, 2] (dy, dx)
        self.register_buffer("offsets", offs, persistent=False)
        self.register_buffer("code_bits", codes_to_bits(torch.arange(self.n_codes), self.bits).float(),
                             persistent=False)                                          # [K, bits]

    # ----------------------------------------------------------------------------------- TracerModel
    @property
    def image_size(self) -> tuple[int, int]:
        return (self.config.image_size, self.config.image_size)

    @property
    def cell(self) -> int:
        return self.config.patch

    @property
    def kl_center(self) -> float:
        return self.config.patch / 2.0          # one code per patch: the response is centred on the patch

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    # ----------------------------------------------------------------------------------- pieces
    def codes(self, frames: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] 0..255 -> codes [B, P, 1] (raster patch order)."""
        return self.lpq.quantize(normalize(frames)).reshape(frames.shape[0], -1, 1)

    def block_logits(self, frame0: torch.Tensor) -> tuple[torch.Tensor, int]:
        """LFQ pre-sign projections of the 4x4 block whose top-left corner is at every pixel of frame 0,
        padded by M = radius + patch (replicate): [B, bits, H + 2M, W + 2M] and M."""
        M = self.config.radius + self.config.patch
        x = F.pad(normalize(frame0), (M, M, M, M), mode="replicate")
        B, _, H, W = x.shape
        out = x.new_zeros(B, self.bits, H, W)
        q = self.lpq.quantizer
        p = self.config.patch
        for a in range(p):
            for b in range(p):
                xs = x[:, :, b:, a:]
                hh, ww = (xs.shape[2] // p) * p, (xs.shape[3] // p) * p
                z = self.lpq.encode(xs[:, :, :hh, :ww]).permute(0, 2, 3, 1)          # [B, h, w, E]
                z = F.normalize(q.project_in(z).float(), dim=-1).permute(0, 3, 1, 2)  # [B, bits, h, w]
                out[:, :, b:b + p * z.shape[2]:p, a:a + p * z.shape[3]:p] = z
        return out, M

    def block_stats(self, frame: torch.Tensor) -> tuple[torch.Tensor, int]:
        """phi = (mean, std) of the RGB (0..1) of the 4x4 block whose top-left corner is at every pixel, padded by
        M = radius + patch (replicate) like ``block_logits``: [B, 6, H + 2M, W + 2M] and M."""
        M = self.config.radius + self.config.patch
        p = self.config.patch
        x = F.pad(frame / 255.0, (M, M + p - 1, M, M + p - 1), mode="replicate")
        mean = F.avg_pool2d(x, p, stride=1)
        var = (F.avg_pool2d(x * x, p, stride=1) - mean * mean).clamp_min(0)
        return torch.cat([mean, (var + 1e-6).sqrt()], 1), M

    def cost_volume(self, frame0: torch.Tensor, frame1: torch.Tensor) -> torch.Tensor:
        """C[b, p, d] = -mean over the window around patch p of ||I1(x) - I0(x - d)||^2 (pixels in [0,1])."""
        c = self.config
        R, p, w = c.radius, c.patch, c.cv_window
        a, b = frame0 / 255.0, frame1 / 255.0
        ap = F.pad(a, (R, R, R, R), mode="replicate")
        H, W = a.shape[2:]
        pad = (w - p) // 2
        out = []
        for dy, dx in self.offsets.tolist():
            shifted = ap[:, :, R - dy:R - dy + H, R - dx:R - dx + W]                   # I0(x - d)
            err = ((shifted - b) ** 2).mean(1, keepdim=True)                            # [B,1,H,W]
            out.append(F.avg_pool2d(err, w, stride=p, padding=pad, count_include_pad=False).flatten(1))
        return -torch.stack(out, -1)                                                     # [B, P, D]

    def _orders(self, seed: int, last0: torch.Tensor | None):
        order0, order1 = shuffle_orders(self.num_patches, int(seed))
        if last0 is not None:
            order0 = move_last(order0, torch.as_tensor(last0, dtype=torch.long).reshape(-1).cpu())
        return order0, order1

    def heads(self, frame0: torch.Tensor, frame1: torch.Tensor, reveal: torch.Tensor, seed: int,
              last0: torch.Tensor | None = None) -> dict:
        """Run the trunk; return the copy-head pieces for every masked frame-1 patch (sequence order)."""
        B = frame0.shape[0]
        if frame1.shape[0] != B:
            frame1 = frame1.expand(B, -1, -1, -1)
        reveal = torch.as_tensor(reveal, dtype=torch.bool).reshape(-1).cpu()
        order0, order1 = self._orders(seed, last0)
        codes0, codes1 = self.codes(frame0), self.codes(frame1)
        seq = build_first_logits_sequence(codes0.cpu(), codes1.cpu(), reveal, order0, order1, self.layout)
        dev = frame0.device
        idx, pos = seq.idx.to(dev), seq.pos.to(dev)
        rev = order1[reveal[order1]].to(dev)                      # revealed patch ids in sequence order
        masked = seq.masked.to(dev)
        tpp = self.layout.tokens_per_patch
        n0, nr = seq.frame0_len, int(rev.numel())

        tr = self.lras.transformer
        x = tr.drop(tr.token_embedding(idx) + tr.positional_embedding(pos))           # [B, T, C]
        m_r = F.softmax(self.cost_volume(frame0, frame1)[:, rev] / self.log_tau.exp(), -1)   # [B, nr, D]
        add = torch.zeros_like(x)
        add[:, n0:n0 + tpp * nr:tpp] = self.cv_embed(m_r)                              # at revealed pointers
        x = x + add
        for block in tr.h:
            x, _ = block(x)
        x = tr.ln_f(x)
        h_q = x[:, n0 + tpp * nr:]                                                      # [B, M, C] masked ptrs
        h_k = x[:, n0 + tpp - 1:n0 + tpp * nr:tpp]                                      # [B, nr, C] last token
        logits = self.w_q(h_q) @ self.w_k(h_k).transpose(1, 2) / math.sqrt(self.config.key_dim)  # [B, M, nr]
        g, p = self.grid, self.config.patch
        if self.config.dist_bias:
            d2 = ((masked[:, None] // g - rev[None] // g) ** 2 + (masked[:, None] % g - rev[None] % g) ** 2)
            if self.config.dist_init is None:
                scale = F.softplus(self.dist_scale) / float(g * g)
            else:
                scale = self.log_dist.exp()
            logits = logits - scale * d2.to(logits.dtype)
        att = F.softmax(logits, -1)
        z, M = self.block_logits(frame0)
        cy, cx = (masked // g) * p, (masked % g) * p
        uy = cy[:, None] - self.offsets[None, :, 0] + M                                 # [M, D] source top-left
        ux = cx[:, None] - self.offsets[None, :, 1] + M
        if self.config.appearance:
            phi0, _ = self.block_stats(frame0)                                          # [B, F, H+2M, W+2M]
            src = phi0[:, :, uy, ux].permute(0, 2, 3, 1)                               # [B, M, D, F]
            phi1 = self.block_stats(frame1)[0][:, :, M:M + self.config.image_size:p, M:M + self.config.image_size:p]
            phi1 = phi1.flatten(2).transpose(1, 2)[:, rev]                             # [B, nr, F]
            dist = ((src * src).sum(-1, keepdim=True) - 2 * src @ phi1.transpose(1, 2)[:, None]
                    + (phi1 * phi1).sum(-1)[:, None, None]).clamp_min(0)               # [B, M, D, nr]
            w = torch.exp(-F.softplus(self.app_scale) * 10.0 * dist)
            m_c = torch.einsum("bmdr,brd,bmr->bmd", w, m_r, att)                       # [B, M, D]
        else:
            m_c = att @ m_r                                                             # [B, M, D]
        log_m = F.log_softmax(torch.log(m_c + 1e-8) + self.off_head(h_q), -1)
        zc = z[:, :, uy, ux].permute(0, 2, 3, 1)                                        # [B, M, D, bits]
        beta = self.log_beta.exp()
        eps = torch.sigmoid(self.eps_head(h_q)).squeeze(-1).clamp(1e-4, 1 - 1e-4)       # [B, M]
        gen = F.log_softmax(self.lras.lm_head(h_q)[..., : self.n_codes].float(), -1)    # [B, M, K]
        return dict(log_m=log_m, lp1=F.logsigmoid(beta * zc), lp0=F.logsigmoid(-beta * zc), eps=eps, gen=gen,
                    masked=masked, target=codes1[:, :, 0].to(dev)[:, masked])

    def code_logprobs(self, h: dict) -> torch.Tensor:
        """Full code distributions [B, M, K] (fp32 log-probs), computed in chunks of masked patches."""
        out = []
        bits = self.code_bits
        log_m, lp1, lp0 = h["log_m"], h["lp1"], h["lp0"]
        k = self.config.top_offsets
        if 0 < k < log_m.shape[-1]:
            # the same k offsets for every row of this call (clean and perturbed rows stay comparable)
            sel = log_m.amax(0).topk(k, dim=-1).indices                                # [M, k]
            B = log_m.shape[0]
            log_m = log_m.gather(-1, sel.expand(B, -1, -1))
            log_m = log_m - torch.logsumexp(log_m, -1, keepdim=True)
            idx = sel[None, :, :, None].expand(B, -1, -1, lp1.shape[-1])
            lp1, lp0 = lp1.gather(2, idx), lp0.gather(2, idx)
        for s in range(0, log_m.shape[1], self.config.chunk):
            sl = slice(s, s + self.config.chunk)
            cand = lp1[:, sl] @ bits.T + lp0[:, sl] @ (1 - bits).T                     # [B, m, D', K]
            copy = torch.logsumexp(log_m[:, sl, :, None] + cand, 2)                    # [B, m, K]
            e = h["eps"][:, sl, None]
            out.append(torch.logaddexp(torch.log1p(-e) + copy, torch.log(e) + h["gen"][:, sl]))
        return torch.cat(out, 1)

    def target_nll(self, h: dict) -> torch.Tensor:
        """-log p_c(true code) for every masked patch [B, M] (no K-sized tensor needed)."""
        tb = codes_to_bits(h["target"], self.bits).float()[:, :, None]                 # [B, M, 1, bits]
        cand = (h["lp1"] * tb + h["lp0"] * (1 - tb)).sum(-1)                            # [B, M, D]
        copy = torch.logsumexp(h["log_m"] + cand, -1)
        e = h["eps"]
        gen = h["gen"].gather(-1, h["target"][..., None]).squeeze(-1)
        return -torch.logaddexp(torch.log1p(-e) + copy, torch.log(e) + gen)

    # ----------------------------------------------------------------------------------- training / tracing
    def training_loss(self, frame0: torch.Tensor, frame1: torch.Tensor, reveal: torch.Tensor, seed: int):
        """Mean NLL (nats/code) of the masked frame-1 codes; frames float 0..255 [B,3,H,W]."""
        h = self.heads(frame0, frame1, reveal, seed)
        nll = self.target_nll(h)
        loss = nll.mean()
        stats = {"nll": float(loss.detach()), "eps": float(h["eps"].mean().detach()),
                 "tau": float(self.log_tau.exp().detach()), "beta": float(self.log_beta.exp().detach())}
        return loss, stats

    @torch.no_grad()
    def first_code_logprobs(self, frame0: torch.Tensor, frame1: torch.Tensor, reveal: torch.Tensor, seed: int,
                            last0: torch.Tensor | None = None) -> torch.Tensor:
        """[B, P, K] log-probs of every frame-1 patch's code (rows of revealed patches are 0)."""
        h = self.heads(frame0, frame1, reveal, seed, last0)
        logp = self.code_logprobs(h)
        out = logp.new_zeros(logp.shape[0], self.num_patches, self.n_codes)
        out[:, h["masked"]] = logp
        return out

    @torch.no_grad()
    def predict_frame1(self, frame0: torch.Tensor, frame1: torch.Tensor, reveal: torch.Tensor,
                       seed: int) -> torch.Tensor:
        """Greedy prediction of frame 1 decoded by the LPQ (revealed patches keep their true codes): [B,3,H,W]."""
        from .lpq import denormalize

        B = frame0.shape[0]
        frame1 = frame1.expand(B, -1, -1, -1) if frame1.shape[0] != B else frame1
        h = self.heads(frame0, frame1, reveal, seed)
        codes = self.codes(frame1)[:, :, 0].clone()                                     # [B, P]
        codes[:, h["masked"]] = self.code_logprobs(h).argmax(-1)
        g = self.grid
        img = denormalize(self.lpq.decode(codes.reshape(B, g, g)))
        return img.clamp(0, 255)
