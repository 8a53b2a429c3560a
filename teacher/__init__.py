"""Teacher models and tracing algorithms (pure tensors; no file or environment access except
``teacher.checkpoints``, the one module that reads and writes checkpoint files).

  teacher.lras         the LRAS GPT (``LRASConfig``, ``LRAS``, ``PRESETS``)
  teacher.lpq          the LPQ tokenizer (``LPQConfig``, ``LPQ``, ``normalize`` / ``denormalize``)
  teacher.checkpoints  safetensors + JSON models, released-pickle conversion, teacher bundles

Submodules are imported explicitly (``from teacher.lras import LRAS``); importing ``teacher`` loads nothing heavy.
"""
