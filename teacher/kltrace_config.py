"""KL-tracing settings (torch-free, so orchestration code can read the defaults without importing torch).

``teacher.kltrace`` re-exports ``KLTraceConfig``; configs/teacher/kltrace_default.yaml holds these defaults.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


def _optional_threshold(name: str, value, kind: str, check: str) -> float | None:
    """A check's threshold: None stays None, anything else must be a float >= 0 (0: the check is off)."""
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {kind} or null, got {value!r}") from None
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0 (0 or null: no {check}), got {value!r}")
    return value


@dataclass
class KLTraceConfig:
    """Tracer settings; configs/teacher/kltrace_default.yaml holds these defaults. sigma .. occ_threshold are the
    lab's setting; occ_level, refine*, exclude_revealed, share_crops and crop_margin go beyond the paper (module
    docstring); the lab's literal procedure is occ_level="final", refine="argmax", kl_center=0,
    exclude_revealed=False, share_crops=False."""
    sigma: float = 2.0                  # bump std, model px (all zoom levels)
    amplitude: float = 255.0            # bump height added to every channel, then clipped to [0, 255]
    bump_radius_sigmas: float = 4.0     # bump is exactly 0 beyond this many sigmas
    mask_ratio: float = 0.9             # fraction of frame-1 cells masked (predicted)
    num_masks: int = 5                  # masks averaged ("MM"); seeds seed, seed+1, ...
    seed: int = 1110
    zoom_levels: int = 4                # zoom levels after the full-frame level ("MS" = zoom_levels + 1 scales)
    zoom_keep: float = 0.75             # crop side kept per zoom level
    occ_threshold: float = 0.4          # visible = KL peak >= this (nats)
    occ_level: str = "mean"             # which level's peak: mean (over levels) | final | first | min | max
    refine: str = "centroid3x3"         # centroid3x3 | argmax
    refine_power: float = 0.25          # centroid weights = (KL - floor) ** refine_power (1: plain KL weights)
    refine_floor: str = "median"        # median: subtract the map's median KL (side-effect floor) | none
    exclude_revealed: bool = True       # False: revealed cells count as KL 0 in the mask average (the lab)
    share_crops: bool = True            # queries share zoom crops (group_crops); False: one crop pair per query
    crop_margin: float = 16.0           # model px a member stays inside its shared crops
    method: str = "kl"                  # kl | rgb
    rgb_blur: float = 1.0               # Gaussian sigma (model px) on the RGB difference; 0 = none
    rgb_occ_threshold: float = 10.0     # RGB variant: visible = peak summed |difference| (0..765) >= this
    batch: int = 16                     # queries per model call in kl_maps_naive / rgb_trace
    kl_center: float | None = None      # px from a cell's corner to its response centre; None: model / cell/4
    fb_threshold: float | None = None   # model px; > 0: visible also needs the backward trace of the target to
                                        # return within this of the query (forward-backward check, 2x cost);
                                        # null or 0: no check (0 also overrides a bundle's setting)
    app_threshold: float | None = None  # > 0: visible also needs the query's frame-0 patch to reappear near the
                                        # estimate in frame 1 (appearance check, ``appearance_error``); null/0: off
    app_radius: int = 3                 # appearance patch half-size, px of the frames given (patch 2r+1 square)
    app_search: int = 4                 # appearance search half-size around the estimate, px of the frames given
    app_floor: float = 8.0              # grey levels added to the query patch's std (flat patches)

    def __post_init__(self):
        if self.occ_level not in ("final", "first", "min", "mean", "max"):
            raise ValueError(f"occ_level must be final|first|min|mean|max, got {self.occ_level!r}")
        if self.refine not in ("centroid3x3", "argmax"):
            raise ValueError(f"refine must be centroid3x3|argmax, got {self.refine!r}")
        if self.refine_floor not in ("median", "none") or not self.refine_power > 0:
            raise ValueError(f"refine_floor must be median|none and refine_power > 0, got {self.refine_floor!r}, "
                             f"{self.refine_power!r}")
        if self.method not in ("kl", "rgb"):
            raise ValueError(f"method must be kl|rgb, got {self.method!r}")
        if not (self.sigma > 0 and self.bump_radius_sigmas > 0):
            raise ValueError("sigma and bump_radius_sigmas must be > 0")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio!r}")
        if int(self.num_masks) < 1 or int(self.zoom_levels) < 0 or int(self.batch) < 1:
            raise ValueError("num_masks >= 1, zoom_levels >= 0 and batch >= 1 are required")
        if not 0.0 < self.zoom_keep <= 1.0:
            raise ValueError(f"zoom_keep must be in (0, 1], got {self.zoom_keep!r}")
        if self.crop_margin < 0 or self.rgb_blur < 0:
            raise ValueError("crop_margin and rgb_blur must be >= 0")
        self.fb_threshold = _optional_threshold("fb_threshold", self.fb_threshold, "a number of model px",
                                                "forward-backward check")
        self.app_threshold = _optional_threshold("app_threshold", self.app_threshold, "a number", "appearance check")
        if int(self.app_radius) < 0 or int(self.app_search) < 0 or not self.app_floor > 0:
            raise ValueError(f"app_radius and app_search must be >= 0 and app_floor > 0, got {self.app_radius!r}, "
                             f"{self.app_search!r}, {self.app_floor!r}")

    @classmethod
    def from_dict(cls, d: dict | None) -> "KLTraceConfig":
        """Build from a mapping; an unknown key is an error (ValueError naming it)."""
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - names)
        if bad:
            raise ValueError(f"unknown tracer config key(s) {bad} (known: {', '.join(sorted(names))})")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def bump_radius(self) -> float:
        return float(self.bump_radius_sigmas) * float(self.sigma)
