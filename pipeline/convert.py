"""``flowdistill convert-lras IN.pt OUT.safetensors --trust-pickle``: convert a released LRAS or LPQ checkpoint.

The released files are Python pickles; unpickling one can run arbitrary code, so this command refuses (exit 2)
unless ``--trust-pickle`` is given. It converts once: OUT.safetensors plus OUT.json (the config, read from the
checkpoint's ``cfg`` and its tensor shapes), after checking the state dict loads strictly. Everything else in
flowdistill reads only the safetensors result.
"""
from __future__ import annotations

import sys

DEFAULTS = {
    "dtype": "keep",     # keep | bf16 | fp16 | fp32: cast the floating tensors when writing
}
_DTYPES = ("keep", "bf16", "fp16", "fp32")


def add_arguments(parser) -> None:
    parser.add_argument("input", help="released checkpoint (.pt, a torch.save pickle with 'model'/'weights' + 'cfg')")
    parser.add_argument("output", help="output .safetensors path (its config is written beside it as .json)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow unpickling INPUT (can run arbitrary code: only for files from a trusted source)")
    parser.add_argument("--dtype", choices=_DTYPES, default=None, help="cast floating tensors (default: keep)")


def run(args, cfg) -> int:
    import torch

    from teacher.checkpoints import CheckpointError, convert_released

    from .common import InputError

    name = args.dtype or cfg["dtype"]
    if name not in _DTYPES:
        raise InputError(f"dtype={name}", f"must be one of {', '.join(_DTYPES)}")
    dtype = {"keep": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
    try:
        info = convert_released(args.input, args.output, trust_pickle=args.trust_pickle, dtype=dtype)
    except CheckpointError as e:
        raise InputError(e.path, e.reason) from None
    c = info["config"]
    if info["kind"] == "lras":
        desc = (f"LRAS n_layer={c['n_layer']} n_head={c['n_head']} n_embd={c['n_embd']} "
                f"vocab={c['vocab_size']} block={c['block_size']}")
    else:
        desc = (f"LPQ {c['codebook_bits']}-bit codes, patch {c['patch_size']}, embed {c['embed_dim']}, "
                f"{c['in_channels']} channels")
    print(f"{args.input} -> {info['output']} + {info['json']}: {desc}, {info['tensors']} tensors, "
          f"{info['params']:,} parameters", file=sys.stdout)
    return 0
