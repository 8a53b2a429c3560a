"""LPQ: the Local Patch Quantizer, LRAS's image tokenizer (an autoencoder with a strictly local encoder).

  encoder  Conv2d(in -> E, kernel p, stride p), SiLU, ResBlock(E, hidden, 1x1)     one code per p x p block,
           computed from that block's pixels only (no cross-block receptive field)
  quantizer  vector-quantize-pytorch LFQ (spherical, f32): project_in E -> b (with bias), L2-normalise,
           bit_i = [h_i > 0], index = sum_i bit_i 2^(b-1-i) (the FIRST dimension is the most significant bit,
           ``quantizer.mask`` = [2^(b-1), ..., 1]); code vector = L2-normalised +-1 bits, project_out b -> E
  decoder  stages of n_res ResBlock(C, 2C, 3x3), with Upsample(nearest x2, 3x3 conv C -> C') between stages,
           then Conv2d(C_last -> out, 3x3). Output lives in ImageNet-normalised space.

ResBlock(x) = x + SiLU(conv2(dropout(SiLU(conv1(LayerNorm_c(x)))))) with a channel LayerNorm that has a bias.
Parameter names match the released checkpoint: ``encoder.0``, ``encoder.2.{ln1,conv1,conv2}``,
``quantizer.{project_in,project_out,mask}``, ``decoder.{i}`` (``decoder.{j}.conv`` for the upsamplers).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from vector_quantize_pytorch import LFQ

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class LPQConfig:
    patch_size: int = 4                      # px per code side
    in_channels: int = 3
    out_channels: int = 3
    embed_dim: int = 512                     # encoder width E = LFQ input dim
    enc_hidden: int = 1024                   # hidden width of the encoder's 1x1 residual block(s)
    n_enc_res: int = 1
    codebook_bits: int = 16                  # codebook size 2**bits
    dec_channels: tuple[int, ...] = (512, 256, 128)   # one entry per decoder stage; stage 0 must equal embed_dim
    dec_hidden_mult: int = 2
    n_res: int = 3                           # ResBlocks per decoder stage
    dropout: float = 0.1                     # inside the ResBlocks (only active in training)
    entropy_loss_weight: float = 0.001
    commitment_loss_weight: float = 0.0025
    diversity_gamma: float = 1.0

    def __post_init__(self):
        self.dec_channels = tuple(int(c) for c in self.dec_channels)
        for name in ("patch_size", "in_channels", "out_channels", "embed_dim", "enc_hidden", "n_enc_res",
                     "codebook_bits", "dec_hidden_mult", "n_res"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"LPQConfig.{name} must be a positive int, got {v!r}")
        if not self.dec_channels or self.dec_channels[0] != self.embed_dim:
            raise ValueError(f"LPQConfig.dec_channels {self.dec_channels} must start with embed_dim {self.embed_dim}")
        if 2 ** (len(self.dec_channels) - 1) != self.patch_size:
            raise ValueError(f"LPQConfig: {len(self.dec_channels) - 1} x2 upsamplings cannot undo patch_size "
                             f"{self.patch_size} (need len(dec_channels) = log2(patch_size) + 1)")

    @property
    def codebook_size(self) -> int:
        return 2 ** self.codebook_bits


PRESETS: dict[str, LPQConfig] = {
    # the released RGB tokenizer: 256x256 -> 64x64 codes of 16 bits
    "released_rgb": LPQConfig(),
    # the released flow tokenizer (2 channels, 15 bits)
    "released_flow": LPQConfig(in_channels=2, out_channels=2, codebook_bits=15, dropout=0.0),
    # our small teacher's tokenizer: 8-bit codes (256), 4x4 px
    "tiny": LPQConfig(embed_dim=64, enc_hidden=128, codebook_bits=8, dec_channels=(64, 32, 16), n_res=2,
                      dropout=0.0),
}


def normalize(img: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] float 0..255 -> ImageNet-normalised ((x/255 - mean) / std)."""
    mean = img.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = img.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (img / 255.0 - mean) / std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``normalize``: ImageNet-normalised [B,3,H,W] -> float 0..255 (not clipped)."""
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x * std + mean) * 255.0


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel dimension of [B, C, H, W] (each pixel normalised on its own)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ResBlock(nn.Module):
    def __init__(self, dim: int, hidden: int, kernel: int, dropout: float):
        super().__init__()
        self.ln1 = ChannelLayerNorm(dim, eps=1e-5)
        self.conv1 = nn.Conv2d(dim, hidden, kernel, padding=kernel // 2)
        self.conv2 = nn.Conv2d(hidden, dim, kernel, padding=kernel // 2)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):                                             # [B, C, H, W] -> same
        z = F.silu(self.conv1(self.ln1(x)))                           # [B, hidden, H, W]
        z = F.silu(self.conv2(self.dropout(z)))
        return x + z


class Upsample(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x):                                             # [B, Cin, H, W] -> [B, Cout, 2H, 2W]
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class LPQ(nn.Module):
    def __init__(self, config: LPQConfig):
        super().__init__()
        self.config = c = config
        self.encoder = nn.Sequential(
            nn.Conv2d(c.in_channels, c.embed_dim, c.patch_size, stride=c.patch_size),
            nn.SiLU(),
            *[ResBlock(c.embed_dim, c.enc_hidden, 1, c.dropout) for _ in range(c.n_enc_res)],
        )
        self.quantizer = LFQ(
            dim=c.embed_dim, codebook_size=c.codebook_size, num_codebooks=1,
            entropy_loss_weight=c.entropy_loss_weight, commitment_loss_weight=c.commitment_loss_weight,
            diversity_gamma=c.diversity_gamma, spherical=True, force_quantization_f32=True,
            has_projections=True,
        )
        dec: list[nn.Module] = []
        for s, ch in enumerate(c.dec_channels):
            if s > 0:
                dec.append(Upsample(c.dec_channels[s - 1], ch))
            dec += [ResBlock(ch, c.dec_hidden_mult * ch, 3, c.dropout) for _ in range(c.n_res)]
        dec.append(nn.Conv2d(c.dec_channels[-1], c.out_channels, 3, padding=1))
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in, H, W] normalised -> pre-quantisation features [B, E, H/p, W/p]."""
        B, _, H, W = x.shape
        p = self.config.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
        return self.encoder(x)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in, H, W] normalised -> codes LongTensor [B, H/p, W/p] (first LFQ dimension = MSB)."""
        z = self.encode(x).permute(0, 2, 3, 1)                        # [B, h, w, E]
        q = self.quantizer
        h = q.project_in(z).float()                                   # [B, h, w, bits]
        h = F.normalize(h, dim=-1)                                    # spherical (does not change the signs)
        return ((h > 0).long() * q.mask.long()).sum(-1)               # [B, h, w]

    def code_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] -> decoder input [B, E, h, w]."""
        if codes.dim() != 3:
            raise ValueError(f"codes must be [B, h, w], got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.config.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.config.codebook_size})")
        return self.quantizer.indices_to_codes(codes.long())          # [B, E, h, w]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] -> reconstruction [B, out, h*p, w*p] in normalised space."""
        return self.decoder(self.code_vectors(codes))

    def forward(self, x: torch.Tensor):
        """x [B, in, H, W] normalised -> (reconstruction [B, out, H, W], mse loss, LFQ aux loss)."""
        z = self.encode(x)                                            # [B, E, h, w]
        quantized, _, aux = self.quantizer(z)                         # [B, E, h, w]
        y = self.decoder(quantized)
        return y, F.mse_loss(y, x), aux


def bits_to_codes(bits: torch.Tensor) -> torch.Tensor:
    """[..., b] of 0/1 (first = MSB) -> code index [...]."""
    b = bits.shape[-1]
    weights = 2 ** torch.arange(b - 1, -1, -1, device=bits.device)
    return (bits.long() * weights).sum(-1)


def codes_to_bits(codes: torch.Tensor, n_bits: int) -> torch.Tensor:
    """code index [...] -> [..., n_bits] of 0/1 (first = MSB)."""
    weights = 2 ** torch.arange(n_bits - 1, -1, -1, device=codes.device)
    return ((codes.long().unsqueeze(-1) & weights) != 0).long()

