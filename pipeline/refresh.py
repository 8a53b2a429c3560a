"""``flowdistill refresh``: bring a label set up to date with its sources, teacher and configs.

It lists the sources and compares them with the label set (``pipeline.label.make_plan``):

- same teacher and configs as an existing version: label only the work units that version lacks (new videos);
  the version's ``manifest.json`` / ``LATEST`` are updated once the units are done;
- the teacher or the tracer / sampling configs changed: start the next version and relabel everything, or, with
  ``--keep-old``, label only the units the previous version lacks and let the new version reuse the previous
  version's shards (its manifest lists them as ``../v000N/...``); the old version is never modified.

``--dry-run`` prints the plan (target version, why, each unit to label) and changes nothing. Run it periodically:
``configs/slurm/refresh.sbatch`` resubmits itself with ``--begin``; the README shows the cron/scrontab line.
Multi-rank runs work exactly as ``flowdistill label`` (the same code).
"""
from __future__ import annotations

from typing import Any

from .label import DEFAULTS as LABEL_DEFAULTS, add_arguments as _label_args, apply_args, check_config, \
    exit_status, format_summary, make_plan, run_label

DEFAULTS: dict[str, Any] = dict(LABEL_DEFAULTS)


def add_arguments(parser) -> None:
    _label_args(parser)
    parser.add_argument("--keep-old", dest="keep_old", action="store_true",
                        help="on a new version, label only units the previous version lacks and keep its labels")


def run(args, cfg) -> int:
    cfg = check_config(apply_args(args, cfg))
    plan = make_plan(cfg, create=False)
    print(plan.describe(), flush=True)
    if getattr(args, "dry_run", False):
        return 0
    summary = run_label(cfg)
    print(format_summary(summary), flush=True)
    return exit_status(summary)
