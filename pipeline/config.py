"""YAML configs with dotted command-line overrides.

``load_config(path, ["sampling.pairs_per_video=4", "seed=3"], defaults)`` deep-merges, in order: the
command's defaults, the YAML file, then the overrides (values parsed as YAML scalars). Unknown keys are
an error, so a misspelt option is never silently ignored.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable

import yaml

from .common import InputError


def _merge(base: dict, new: dict, where: str, schema: dict | None) -> dict:
    """``new`` deep-merged over ``base``. ``schema`` (the defaults at this level): where it is a mapping, keys
    outside it are rejected; where the defaults hold no mapping (None, a scalar: a free-form option such as a
    tracer override, validated by its consumer) or no defaults were given, any key merges. Strictness follows the
    defaults, not the config built so far, so two overrides of one free-form option behave like one."""
    out = copy.deepcopy(base)
    for k, v in new.items():
        if schema is not None and k not in schema:
            known = ", ".join(sorted(schema)) or "(none)"
            raise InputError(where, f"unknown config key {k!r} (known: {known})")
        sub = schema.get(k) if schema is not None else None
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v, f"{where}:{k}", sub if isinstance(sub, dict) else None)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(text: str) -> dict:
    """``"a.b.c=3"`` → ``{"a": {"b": {"c": 3}}}`` (value parsed as YAML)."""
    if "=" not in text:
        raise InputError(text, "override must look like key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise InputError(text, "override key is empty")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise InputError(text, f"value is not valid YAML: {e}") from None
    out: dict = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise InputError(p, "config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise InputError(p, f"not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(p, "config must be a mapping at the top level")
    return data


def load_config(path: str | Path | None, overrides: Iterable[str] = (), defaults: dict | None = None) -> dict:
    """Defaults ← YAML file ← overrides. With ``defaults`` given, keys outside them are rejected."""
    cfg = copy.deepcopy(defaults) if defaults else {}
    if path is not None:
        cfg = _merge(cfg, read_yaml(path), str(path), defaults)
    for ov in overrides:
        cfg = _merge(cfg, parse_override(ov), ov, defaults)
    return cfg
