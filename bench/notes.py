"""Shared by the bench scripts: their section of bench/NOTES.md and the machine line (run as
``python bench/<script>.py``, so this directory is on sys.path and ``from notes import ...`` resolves here)."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def write_notes(path: Path, text: str, tag: str) -> None:
    """Replace (or append) the section ``<!-- tag:begin -->`` .. ``<!-- tag:end -->`` of NOTES.md atomically,
    keeping everything else."""
    path = Path(path)
    begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    section = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmark notes\n\n"
    if begin in old and end in old:
        rest = old[old.index(end) + len(end):]
        new = old[: old.index(begin)] + section + (rest[1:] if rest.startswith("\n") else rest)
    else:
        new = old.rstrip() + "\n\n" + section
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, path)


def report(lines: list[str], notes: str | None, tag: str) -> None:
    """Print a bench script's report (ending in its RESULT lines) and, when ``notes`` names a file, store it there as
    the section ``tag`` (``write_notes``)."""
    text = "\n".join(lines)
    print(text)
    if notes:
        write_notes(Path(notes), text, tag)


def machine_line(threads: int) -> str:
    import torch

    try:
        load = open("/proc/loadavg").read().split()[:3]
    except OSError:
        load = ["?"]
    return (f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} logical CPUs (shared; load avg "
            f"{' '.join(load)} at start), torch {torch.__version__}, {threads} torch thread(s), fp32")
