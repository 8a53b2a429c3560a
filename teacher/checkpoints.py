"""Teacher checkpoints: the only module in teacher/ that touches files.

Our format is safetensors + a JSON file beside it (``model.safetensors`` + ``model.json`` holding
``{"format", "kind", "config", "extra"}``); the model is rebuilt from that JSON config (never from presets) and loaded
with ``strict=True``. The released LRAS/LPQ checkpoints are pickles (``torch.save`` of ``{"model"|"weights": state
dict, "cfg": ...}``); they are unpickled only by ``convert_released(..., trust_pickle=True)``, once, and everything
else reads safetensors. ``torch.load`` is never called on anything else.

A teacher bundle is a directory holding ``teacher.json`` (format ``flowdistill-teacher-v1``) plus the LRAS and LPQ
safetensors files it names; ``load_teacher_bundle`` returns the models, the token layout (a plain dict) and a
``teacher_id`` (short sha256 over both weight files' sha256 and the config hash).

A bundle of kind ``"tiny"`` (``save_tiny_bundle`` / ``load_tiny_bundle``) holds one ``tiny.safetensors`` with the
whole ``teacher.tiny.TinyTeacher`` state dict (its LPQ included) and the TinyTeacherConfig inside ``teacher.json``;
``load_any_teacher`` returns a tracing-ready model for either kind.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .lpq import LPQ, LPQConfig
from .lras import LRAS, LRASConfig

MODEL_FORMAT = "flowdistill-model-v1"
BUNDLE_FORMAT = "flowdistill-teacher-v1"
_PREFIXES = ("_orig_mod.", "_orig_module.")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; ``str(err)`` names the file and the reason."""

    def __init__(self, path: Any, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class UntrustedPickleError(CheckpointError):
    """Raised instead of unpickling a file the caller did not declare trusted."""


# ---------------------------------------------------------------------------------------------- state dicts

def check_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], where: str = "state dict") -> None:
    """Raise ValueError unless ``sd`` has exactly the model's keys with the model's shapes (and float where the
    model is float). The message names missing / unexpected keys and the first tensor whose shape differs."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:5])}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
        raise CheckpointError(where, "; ".join(parts))
    for k, ref in own.items():
        t = sd[k]
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(where, f"{k} is a {type(t).__name__}, not a tensor")
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(where, f"tensor {k} has shape {tuple(t.shape)}, the model expects {tuple(ref.shape)}")
        if ref.is_floating_point() != t.is_floating_point():
            raise CheckpointError(where, f"tensor {k} has dtype {t.dtype}, the model expects {ref.dtype}")


def strip_prefixes(sd: dict[str, Any]) -> dict[str, Any]:
    """Remove torch.compile's ``_orig_mod.`` / ``_orig_module.`` prefixes (also nested ones) from every key."""
    out = {}
    for k, v in sd.items():
        name = k
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if name.startswith(p):
                    name, changed = name[len(p):], True
                elif f".{p}" in name:
                    name, changed = name.replace(f".{p}", "."), True
        if name in out:
            raise ValueError(f"two keys map to {name!r} after stripping compile prefixes")
        out[name] = v
    return out


def model_kind(model: nn.Module) -> str:
    if isinstance(model, LRAS):
        return "lras"
    if isinstance(model, LPQ):
        return "lpq"
    raise TypeError(f"not a teacher model: {type(model).__name__}")


def _config_cls(kind: str):
    return {"lras": LRASConfig, "lpq": LPQConfig}[kind]


def _model_cls(kind: str):
    return {"lras": LRAS, "lpq": LPQ}[kind]


def _config_to_dict(config) -> dict:
    d = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# ---------------------------------------------------------------------------------------------- file helpers

def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _tmp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def _publish(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_json(path: Path, obj: Any) -> None:
    tmp = _tmp_beside(path)
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, t in tensors.items():       # safetensors refuses shared storage: copy a tensor only if it is shared
        t = t.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        if key in seen:
            t = t.clone()
        seen.add(key)
        out[k] = t
    tmp = _tmp_beside(path)
    try:
        save_file(out, str(tmp), metadata=metadata)
        _publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _st_metadata(kind: str) -> dict[str, str]:
    # one key only: safetensors writes metadata in hash-map order, so several keys would make the bytes (and the
    # teacher id) differ between two saves of the same weights
    return {"flowdistill": f"{MODEL_FORMAT}:{kind}"}


def _json_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _json_safe(obj: Any, depth: int = 0) -> Any:
    if depth > 8:
        return repr(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        return {str(k): _json_safe(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v, depth + 1) for v in obj]
    if isinstance(obj, torch.Tensor):
        return f"<tensor {tuple(obj.shape)} {obj.dtype}>"
    return repr(obj)


# ---------------------------------------------------------------------------------------------- our format

def save_model(model: nn.Module, path: str | os.PathLike, config_dict: dict | None = None,
               extra: dict | None = None) -> Path:
    """Write ``model`` to ``path`` (.safetensors) and its config to ``<stem>.json`` beside it, each atomically.
    ``config_dict`` defaults to the model's own config; when given it must describe the same model."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: model files must end in .safetensors")
    kind = model_kind(model)
    own = _config_to_dict(model.config)
    if config_dict is None:
        config_dict = own
    else:
        try:
            same = _config_to_dict(_config_cls(kind)(**config_dict)) == own
        except (TypeError, ValueError) as e:
            raise ValueError(f"config_dict is not a valid {kind} config: {e}") from None
        if not same:
            raise ValueError(f"config_dict {config_dict} does not describe this model ({own})")
        config_dict = own
    _atomic_save_safetensors(model.state_dict(), path, _st_metadata(kind))
    _atomic_write_json(_json_path(path), {"format": MODEL_FORMAT, "kind": kind, "config": config_dict,
                                          "extra": _json_safe(extra or {})})
    return path


def _read_format_json(path: Path, fmt: str) -> dict:
    """A JSON mapping whose ``format`` field must equal ``fmt``; anything else is a CheckpointError naming it."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(path, f"not a {fmt} file (format={got!r})")
    return meta


def read_model_json(path: str | os.PathLike, kind: str | None = None) -> dict:
    """The JSON beside a model file (``<stem>.json``), validated; ``kind`` checks which model it holds."""
    path = Path(path)
    jp = _json_path(path)
    if not jp.is_file():
        raise CheckpointError(path, f"config file {jp.name} not found beside it (safetensors files are read "
                                    f"together with their JSON config)")
    meta = _read_format_json(jp, MODEL_FORMAT)
    if meta.get("kind") not in ("lras", "lpq") or not isinstance(meta.get("config"), dict):
        raise CheckpointError(jp, "needs kind 'lras' or 'lpq' and a config mapping")
    if kind is not None and meta["kind"] != kind:
        raise CheckpointError(path, f"holds a {meta['kind']} model, expected {kind}")
    return meta


def read_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a missing, truncated or corrupt file raises CheckpointError naming it."""
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "file not found")
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(path, f"not a safetensors file (only {size} bytes)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    if n > size - 8:
        raise CheckpointError(path, f"truncated or not a safetensors file (header claims {n} bytes, file has {size})")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types for truncated / corrupt data
        raise CheckpointError(path, f"truncated or corrupt safetensors file ({type(e).__name__}: {e})") from None


def _build(kind: str, config_dict: dict, where: Path, meta_device: bool) -> nn.Module:
    try:
        config = _config_cls(kind)(**config_dict)
    except (TypeError, ValueError) as e:
        raise CheckpointError(where, f"invalid {kind} config: {e}") from None
    if meta_device:
        with torch.device("meta"):
            return _model_cls(kind)(config)
    return _model_cls(kind)(config)


def load_lras(path: str | os.PathLike, device: str | torch.device = "cpu",
              dtype: torch.dtype | None = None) -> LRAS:
    """LRAS from ``path`` (.safetensors) + its JSON config; strict; returned in eval mode."""
    path = Path(path)
    meta = read_model_json(path, "lras")
    sd = read_safetensors(path, device=device)                        # straight onto the device: no CPU copy
    model = _build("lras", meta["config"], path, meta_device=True)   # no memory for the random init
    check_state_dict(model, sd, str(path))
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval()


def load_lpq(path: str | os.PathLike, device: str | torch.device = "cpu") -> LPQ:
    """LPQ from ``path`` (.safetensors) + its JSON config; strict; fp32; returned in eval mode."""
    path = Path(path)
    meta = read_model_json(path, "lpq")
    sd = read_safetensors(path)
    model = _build("lpq", meta["config"], path, meta_device=False)   # small; keeps LFQ's derived buffers real
    check_state_dict(model, sd, str(path))
    model.load_state_dict(sd, strict=True)
    return model.to(device=device).eval()


# ---------------------------------------------------------------------------------------------- released pickles

class _Missing:
    """Stand-in for a class the pickle names but this environment cannot import (e.g. a config dataclass of the
    original code base): keeps the constructor arguments and state so fields can still be read."""

    _qualname = "?"

    def __init__(self, *args, **kwargs):
        self._args, self._kwargs = args, kwargs

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self._state = state


class _TolerantUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Missing,), {"_qualname": f"{module}.{name}"})


class _tolerant_pickle:
    """A ``pickle_module`` for torch.load whose unpickler substitutes unimportable classes."""
    Unpickler = _TolerantUnpickler
    load = staticmethod(lambda f, **kw: _TolerantUnpickler(f, **kw).load())


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    if len(head) == 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if 0 < n < path.stat().st_size:
            return "safetensors"
    return "unknown"


def _cfg_to_dict(cfg: Any) -> dict:
    if cfg is None:
        return {}
    if isinstance(cfg, dict):
        return dict(cfg)
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    if hasattr(cfg, "__dict__"):
        return {k: v for k, v in vars(cfg).items() if not k.startswith("_")}
    return {}


def _detect_kind(sd: dict, where: Path) -> str:
    if "transformer.token_embedding.weight" in sd:
        return "lras"
    if "quantizer.project_in.weight" in sd:
        return "lpq"
    raise CheckpointError(where, f"neither an LRAS nor an LPQ state dict (first keys: {', '.join(list(sd)[:5])})")


def _lras_config_from(sd: dict, cfg: dict, where: Path) -> LRASConfig:
    V, d = sd["transformer.token_embedding.weight"].shape
    if "transformer.positional_embedding.weight" not in sd:
        raise CheckpointError(where, "missing transformer.positional_embedding.weight")
    block = sd["transformer.positional_embedding.weight"].shape[0]
    layers = {int(k.split(".")[2]) for k in sd if k.startswith("transformer.h.") and k.split(".")[2].isdigit()}
    from_shapes = {"vocab_size": int(V), "n_embd": int(d), "block_size": int(block),
                   "n_layer": max(layers) + 1 if layers else 0}
    for k, v in from_shapes.items():
        if k in cfg and cfg[k] is not None and int(cfg[k]) != v:
            raise CheckpointError(where, f"cfg says {k}={cfg[k]} but the tensors say {v}")
    if cfg.get("n_head") is None:
        raise CheckpointError(where, "cfg has no n_head, and the head count cannot be derived from tensor shapes")
    try:
        return LRASConfig(n_head=int(cfg["n_head"]), dropout=float(cfg.get("dropout") or 0.0),
                          bias=any(k.endswith(".bias") for k in sd), **from_shapes)
    except ValueError as e:
        raise CheckpointError(where, str(e)) from None


def _lpq_config_from(sd: dict, cfg: dict, where: Path) -> LPQConfig:
    def shape(k):
        if k not in sd:
            raise CheckpointError(where, f"missing tensor {k}")
        return tuple(sd[k].shape)

    E, cin, p, _ = shape("encoder.0.weight")
    bits, _ = shape("quantizer.project_in.weight")
    enc_res = sorted({int(k.split(".")[1]) for k in sd if k.startswith("encoder.") and ".ln1." in k})
    enc_hidden = {shape(f"encoder.{i}.conv1.weight")[0] for i in enc_res}
    if len(enc_hidden) != 1:
        raise CheckpointError(where, f"encoder residual blocks of unequal width {sorted(enc_hidden)} are not supported")
    idx = sorted({int(k.split(".")[1]) for k in sd if k.startswith("decoder.")})
    stages: list[list[int]] = []            # per stage: [channels, n_res, hidden]
    out_ch = None
    for j, i in enumerate(idx):
        if f"decoder.{i}.ln1.weight" in sd:
            ch, hid = shape(f"decoder.{i}.ln1.weight")[0], shape(f"decoder.{i}.conv1.weight")[0]
            if not stages or stages[-1][0] != ch:
                stages.append([ch, 0, hid])
            stages[-1][1] += 1
            if stages[-1][2] != hid:
                raise CheckpointError(where, f"decoder.{i}: unequal hidden widths within a stage are not supported")
        elif f"decoder.{i}.conv.weight" in sd:
            continue
        elif j == len(idx) - 1:
            out_ch = shape(f"decoder.{i}.weight")[0]
        else:
            raise CheckpointError(where, f"decoder.{i}: unknown layer")
    if out_ch is None or not stages:
        raise CheckpointError(where, "decoder structure not recognised")
    n_res = {s[1] for s in stages}
    mult = {s[2] // s[0] for s in stages} if all(s[2] % s[0] == 0 for s in stages) else set()
    if len(n_res) != 1 or len(mult) != 1:
        raise CheckpointError(where, f"decoder stages {stages} are not uniform (same block count and hidden multiple)")
    checks = {"vocab_size": 2 ** bits, "patch_size": p, "num_in_channels": cin, "num_out_channels": out_ch}
    for k, v in checks.items():
        if k in cfg and cfg[k] is not None and int(cfg[k]) != v:
            raise CheckpointError(where, f"cfg says {k}={cfg[k]} but the tensors say {v}")
    opt = {k: float(cfg[k]) for k in ("dropout", "entropy_loss_weight", "commitment_loss_weight", "diversity_gamma")
           if isinstance(cfg.get(k), (int, float))}
    try:
        return LPQConfig(patch_size=p, in_channels=cin, out_channels=out_ch, embed_dim=E,
                         enc_hidden=enc_hidden.pop(), n_enc_res=len(enc_res), codebook_bits=bits,
                         dec_channels=tuple(s[0] for s in stages), dec_hidden_mult=mult.pop(),
                         n_res=n_res.pop(), **opt)
    except ValueError as e:
        raise CheckpointError(where, str(e)) from None


def convert_released(pt_path: str | os.PathLike, out_path: str | os.PathLike, trust_pickle: bool,
                     dtype: torch.dtype | None = None) -> dict:
    """Convert a released ``.pt`` (LRAS or LPQ) into ``out_path`` (.safetensors) + ``<stem>.json``.

    Refuses (UntrustedPickleError) unless ``trust_pickle``: unpickling can run arbitrary code. The state dict comes
    from ``model`` (fallback ``weights``), compile prefixes are stripped, the config comes from ``cfg`` and the
    tensor shapes (they must agree), and the result is checked to load strictly before anything is written.
    ``dtype`` casts floating tensors (e.g. torch.bfloat16); None keeps them. Returns a summary dict.
    """
    src, out = Path(pt_path), Path(out_path)
    if not src.is_file():
        raise CheckpointError(src, "file not found")
    if out.suffix != ".safetensors":
        raise CheckpointError(out, "the output must end in .safetensors")
    fmt = _sniff(src)
    if fmt == "safetensors":
        raise CheckpointError(src, "is already a safetensors file; load it directly, there is nothing to convert")
    if fmt == "unknown":
        raise CheckpointError(src, "not a torch.save checkpoint (neither a zip archive nor a pickle)")
    if not trust_pickle:
        raise UntrustedPickleError(src, "refusing to unpickle: a .pt checkpoint is a Python pickle and loading it can "
                                        "run arbitrary code; pass --trust-pickle (trust_pickle=True) only if you "
                                        "trust where the file came from")
    try:
        ckpt = torch.load(src, map_location="cpu", weights_only=False, mmap=(fmt == "zip"),
                          pickle_module=_tolerant_pickle)
    except Exception as e:
        raise CheckpointError(src, f"cannot be read as a torch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(src, f"holds a {type(ckpt).__name__}, expected a dict with 'model' and 'cfg'")
    sd = ckpt.get("model", ckpt.get("weights"))
    if sd is None and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        sd = ckpt                                                     # a bare state dict
    if isinstance(sd, nn.Module):
        sd = sd.state_dict()
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(src, f"no state dict under 'model' or 'weights' (keys: {', '.join(map(str, ckpt))})")
    non_tensor = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if non_tensor:
        raise CheckpointError(src, f"state dict entries that are not tensors: {', '.join(map(str, non_tensor[:5]))}")
    try:
        sd = strip_prefixes(sd)
    except ValueError as e:
        raise CheckpointError(src, str(e)) from None
    kind = _detect_kind(sd, src)
    cfg = _cfg_to_dict(ckpt.get("cfg", ckpt.get("config")))
    config = _lras_config_from(sd, cfg, src) if kind == "lras" else _lpq_config_from(sd, cfg, src)
    with torch.device("meta"):
        model = _model_cls(kind)(config)
    check_state_dict(model, sd, str(src))
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    extra = {"converted_from": src.name, "source_sha256": _sha256(src), "released_cfg": _json_safe(cfg),
             "dtype": str(dtype) if dtype is not None else "as stored"}
    _atomic_save_safetensors(sd, out, _st_metadata(kind))
    _atomic_write_json(_json_path(out), {"format": MODEL_FORMAT, "kind": kind, "config": _config_to_dict(config),
                                         "extra": extra})
    return {"kind": kind, "config": _config_to_dict(config), "output": str(out), "json": str(_json_path(out)),
            "tensors": len(sd), "params": sum(v.numel() for k, v in sd.items() if v.is_floating_point())}


# ---------------------------------------------------------------------------------------------- teacher bundles

@dataclass
class TeacherBundle:
    lras: LRAS
    lpq: LPQ
    layout: dict                 # the TokenLayout fields (teacher.sequence.TokenLayout(**layout))
    image_size: tuple[int, int]  # (H, W) the teacher sees
    meta: dict                   # the whole teacher.json
    teacher_id: str


def _layout_dict(layout: Any) -> dict:
    if dataclasses.is_dataclass(layout) and not isinstance(layout, type):
        layout = {f.name: getattr(layout, f.name) for f in dataclasses.fields(layout)}
    if not isinstance(layout, dict):
        raise TypeError(f"layout must be a dict or a dataclass, got {type(layout).__name__}")
    return json.loads(json.dumps(layout))


def _check_consistent(lras_cfg: dict, lpq_cfg: dict, layout: dict, image_size: list, where: str) -> None:
    """Cross-check the token layout against both models (only the layout fields that are present)."""
    H, W = image_size
    n_codes = 2 ** int(lpq_cfg["codebook_bits"])
    p = int(lpq_cfg["patch_size"])
    if H % p or W % p:
        raise CheckpointError(where, f"image_size {H}x{W} is not a multiple of the LPQ patch size {p}")
    if "n_codes" in layout and int(layout["n_codes"]) != n_codes:
        raise CheckpointError(where, f"layout n_codes {layout['n_codes']} != LPQ codebook size {n_codes}")
    grid, cps = layout.get("grid"), layout.get("codes_per_side")
    if grid is not None and cps is not None:
        P, side = int(grid) ** 2, int(grid) * int(cps) * p
        if (H, W) != (side, side):
            raise CheckpointError(where, f"image_size {H}x{W} does not match the layout ({grid}x{grid} patches of "
                                         f"{cps}x{cps} codes of {p} px = {side}x{side})")
        for key in ("ptr0_offset", "ptr1_offset"):
            if key in layout and int(layout[key]) + P > int(lras_cfg["vocab_size"]):
                raise CheckpointError(where, f"layout {key} + {P} pointers exceeds the LRAS vocab {lras_cfg['vocab_size']}")
        for key in ("pos0_offset", "pos1_offset"):
            if key in layout and int(layout[key]) + P * (1 + int(cps) ** 2) > int(lras_cfg["block_size"]):
                raise CheckpointError(where, f"layout {key} exceeds the LRAS position table {lras_cfg['block_size']}")


def _teacher_id(sha_lras: str, sha_lpq: str, lras_cfg: dict, lpq_cfg: dict, layout: dict, image_size: list) -> str:
    blob = json.dumps({"lras": lras_cfg, "lpq": lpq_cfg, "layout": layout, "image_size": list(image_size)},
                      sort_keys=True, separators=(",", ":")).encode()
    cfg_hash = hashlib.sha256(blob).hexdigest()[:16]
    return hashlib.sha256(f"{sha_lras}\n{sha_lpq}\n{cfg_hash}".encode()).hexdigest()[:16]


def save_teacher_bundle(dir: str | os.PathLike, lras: LRAS, lpq: LPQ, layout: Any, image_size: tuple[int, int],
                        provenance: dict | None = None, tracer: dict | None = None) -> str:
    """Write ``lras.safetensors``/``.json``, ``lpq.safetensors``/``.json`` and (last) ``teacher.json`` into ``dir``.
    Returns the teacher_id."""
    d = Path(dir)
    layout = _layout_dict(layout)
    image_size = [int(image_size[0]), int(image_size[1])]
    lras_cfg, lpq_cfg = _config_to_dict(lras.config), _config_to_dict(lpq.config)
    _check_consistent(lras_cfg, lpq_cfg, layout, image_size, str(d))
    save_model(lras, d / "lras.safetensors")
    save_model(lpq, d / "lpq.safetensors")
    sha = {"lras": _sha256(d / "lras.safetensors"), "lpq": _sha256(d / "lpq.safetensors")}
    tid = _teacher_id(sha["lras"], sha["lpq"], lras_cfg, lpq_cfg, layout, image_size)
    _atomic_write_json(d / "teacher.json", {
        "format": BUNDLE_FORMAT, "kind": "lras", "lras": "lras.safetensors", "lpq": "lpq.safetensors",
        "layout": layout, "image_size": image_size, "tracer": _json_safe(tracer or {}),
        "provenance": _json_safe(provenance or {}), "sha256": sha, "teacher_id": tid,
    })
    return tid


def load_teacher_bundle(dir: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> TeacherBundle:
    """Read a teacher bundle directory; weight files are checked against the sha256 recorded in teacher.json."""
    d = Path(dir)
    tj = d / "teacher.json"
    meta = read_bundle_meta(d)
    if meta.get("kind") != "lras":
        raise CheckpointError(tj, f"not an LRAS bundle (kind {meta.get('kind')!r}; use load_any_teacher)")
    for key in ("lras", "lpq"):
        name = meta.get(key)
        if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(tj, f"{key!r} must name a file inside the bundle, got {name!r}")
    layout, size = meta.get("layout"), meta.get("image_size")
    if not isinstance(layout, dict):
        raise CheckpointError(tj, "layout must be a mapping")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise CheckpointError(tj, f"image_size must be [H, W], got {size!r}")
    paths = {k: d / meta[k] for k in ("lras", "lpq")}
    sha = {k: _sha256(p) if p.is_file() else None for k, p in paths.items()}
    for k, p in paths.items():
        if sha[k] is None:
            raise CheckpointError(p, "file not found (named by teacher.json)")
        want = (meta.get("sha256") or {}).get(k)
        if want is not None and want != sha[k]:
            raise CheckpointError(p, f"sha256 {sha[k][:12]}... differs from the one recorded in teacher.json "
                                     f"({str(want)[:12]}...): the file was changed or damaged")
    lras = load_lras(paths["lras"], device=device, dtype=dtype)
    lpq = load_lpq(paths["lpq"], device=device)
    lras_cfg, lpq_cfg = _config_to_dict(lras.config), _config_to_dict(lpq.config)
    _check_consistent(lras_cfg, lpq_cfg, layout, size, str(tj))
    tid = _teacher_id(sha["lras"], sha["lpq"], lras_cfg, lpq_cfg, layout, size)
    return TeacherBundle(lras=lras, lpq=lpq, layout=layout, image_size=(size[0], size[1]), meta=meta, teacher_id=tid)


# ---------------------------------------------------------------------------------------------- tiny teachers

TINY_WEIGHTS = "tiny.safetensors"


def read_bundle_meta(dir: str | os.PathLike) -> dict:
    """``teacher.json`` of a bundle directory, checked for the bundle format (any kind)."""
    d = Path(dir)
    tj = d / "teacher.json"
    if not tj.is_file():
        raise CheckpointError(d, "not a teacher bundle (teacher.json not found)")
    meta = _read_format_json(tj, BUNDLE_FORMAT)
    if meta.get("kind") not in ("lras", "tiny"):
        raise CheckpointError(tj, f"unsupported teacher kind {meta.get('kind')!r} (known: 'lras', 'tiny')")
    return meta


def set_bundle_tracer(dir: str | os.PathLike, updates: dict, record: dict | None = None) -> dict:
    """Change a bundle's stored tracer settings (e.g. a calibrated ``occ_threshold``) without touching its weights:
    ``teacher.json["tracer"]`` is updated with ``updates`` (checked against ``KLTraceConfig``; an unknown key or bad
    value raises ``ValueError``), ``record`` (what measured it) is appended to ``provenance["tracer_updates"]``, and
    the file is rewritten atomically. The teacher_id is unchanged (it covers weights and model config only).
    Returns the new tracer dict."""
    from .kltrace_config import KLTraceConfig

    d = Path(dir)
    meta = read_bundle_meta(d)
    tracer = {**(meta.get("tracer") or {}), **dict(updates)}
    KLTraceConfig.from_dict(tracer)                          # validates keys and values
    meta["tracer"] = _json_safe(tracer)
    prov = dict(meta.get("provenance") or {})
    prov["tracer_updates"] = list(prov.get("tracer_updates") or []) + [_json_safe({"set": dict(updates),
                                                                                  **(record or {})})]
    meta["provenance"] = prov
    _atomic_write_json(d / "teacher.json", meta)
    return tracer


def write_micro_teacher(dir: str | os.PathLike) -> Path:
    """A random micro ``TinyTeacher`` bundle (32 px, 1 layer, seed 0; tracer 1 mask x 1 zoom level, mask ratio 0.8)
    for tests and benchmarks of the orchestration: fast to trace, tracks nothing. Kept if ``dir`` already holds one."""
    from .tiny import TinyTeacher, TinyTeacherConfig

    d = Path(dir)
    if (d / "teacher.json").is_file():
        return d
    torch.manual_seed(0)
    m = TinyTeacher(TinyTeacherConfig(image_size=32, radius=4, cv_window=8, n_layer=1, n_head=2, n_embd=32,
                                      key_dim=8, top_offsets=16))
    save_tiny_bundle(d, m.eval(), provenance={"note": "random micro teacher for tests"},
                     tracer={"num_masks": 1, "zoom_levels": 1, "mask_ratio": 0.8})
    return d


def _tiny_id(sha: str, config: dict) -> str:
    blob = json.dumps({"kind": "tiny", "config": config}, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(f"{sha}\n{hashlib.sha256(blob).hexdigest()[:16]}".encode()).hexdigest()[:16]


def save_tiny_bundle(dir: str | os.PathLike, model: nn.Module, provenance: dict | None = None,
                     tracer: dict | None = None) -> str:
    """Write a ``teacher.tiny.TinyTeacher`` as a bundle: ``tiny.safetensors`` (the full state dict, LPQ included)
    and, last, ``teacher.json`` (kind "tiny", the TinyTeacherConfig, image size, sha256, provenance, tracer
    settings). Each file is published atomically. Returns the teacher_id (weights sha256 + config hash)."""
    from .tiny import TinyTeacher

    if not isinstance(model, TinyTeacher):
        raise TypeError(f"save_tiny_bundle needs a TinyTeacher, got {type(model).__name__}")
    d = Path(dir)
    config = _config_to_dict(model.config)
    _atomic_save_safetensors(model.state_dict(), d / TINY_WEIGHTS, _st_metadata("tiny"))
    sha = _sha256(d / TINY_WEIGHTS)
    tid = _tiny_id(sha, config)
    S = int(config["image_size"])
    _atomic_write_json(d / "teacher.json", {
        "format": BUNDLE_FORMAT, "kind": "tiny", "weights": TINY_WEIGHTS, "config": config,
        "image_size": [S, S], "tracer": _json_safe(tracer or {}), "provenance": _json_safe(provenance or {}),
        "sha256": {"weights": sha}, "teacher_id": tid,
    })
    return tid


def load_tiny_bundle(dir: str | os.PathLike, device: str | torch.device = "cpu"):
    """(TinyTeacher in eval mode, teacher.json dict) from a bundle of kind "tiny"; the weights are checked against
    the sha256 recorded in teacher.json and loaded strictly. ``meta["teacher_id"]`` is recomputed from the file."""
    from .tiny import TinyTeacher, TinyTeacherConfig

    d = Path(dir)
    meta = read_bundle_meta(d)
    tj = d / "teacher.json"
    if meta["kind"] != "tiny":
        raise CheckpointError(tj, f"holds a {meta['kind']!r} teacher, expected 'tiny'")
    name = meta.get("weights")
    if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointError(tj, f"'weights' must name a file inside the bundle, got {name!r}")
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(tj, "config must be a mapping (the TinyTeacherConfig fields)")
    path = d / name
    if not path.is_file():
        raise CheckpointError(path, "file not found (named by teacher.json)")
    sha = _sha256(path)
    want = (meta.get("sha256") or {}).get("weights")
    if want is not None and want != sha:
        raise CheckpointError(path, f"sha256 {sha[:12]}... differs from the one recorded in teacher.json "
                                    f"({str(want)[:12]}...): the file was changed or damaged")
    try:
        # bundles written before dist_init existed used the softplus form (dist_init = None)
        config = TinyTeacherConfig(**{"dist_init": None, **meta["config"]})
    except (TypeError, ValueError) as e:
        raise CheckpointError(tj, f"invalid tiny teacher config: {e}") from None
    sd = read_safetensors(path)
    model = TinyTeacher(config)
    check_state_dict(model, sd, str(path))
    model.load_state_dict(sd, strict=True)
    meta = dict(meta)
    meta["teacher_id"] = _tiny_id(sha, _config_to_dict(config))
    return model.to(device).eval(), meta


def load_any_teacher(dir: str | os.PathLike, device: str | torch.device = "cpu", autocast_bf16: bool = False):
    """A ``teacher.kltrace.TracerModel`` for any bundle kind: kind "lras" -> ``teacher.tracer.LRASTracer``
    (``autocast_bf16`` applies), kind "tiny" -> the ``TinyTeacher`` itself (eval mode, fp32). The returned object
    carries ``teacher_id``, ``teacher_kind`` and ``bundle_meta`` (the teacher.json dict)."""
    meta = read_bundle_meta(dir)
    if meta["kind"] == "lras":
        from .tracer import LRASTracer

        bundle = load_teacher_bundle(dir, device=device)
        tracer = LRASTracer.from_bundle(bundle, autocast_bf16=autocast_bf16)
        tracer.teacher_id, meta = bundle.teacher_id, bundle.meta
    else:
        tracer, meta = load_tiny_bundle(dir, device=device)
        tracer.requires_grad_(False)
        tracer.teacher_id = meta["teacher_id"]
    tracer.teacher_kind = meta["kind"]
    tracer.bundle_meta = meta
    return tracer
