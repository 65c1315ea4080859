"""What every ``bench_*.py`` shares: writing its JSON report (``report_file.write``) and picking the median of its
rounds (``report_file.median_run``).

A script run as ``python benchmarks/bench_x.py`` has ``benchmarks/`` first on ``sys.path``, so this module is found
beside it without a package.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write(path: str | os.PathLike[str], report: dict[str, Any]) -> Path:
    """Write ``report`` as indented JSON to ``path`` (parent folders made), atomically: a reader, or a run cut off
    half-way, never sees half a file. Prints and returns where it went."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}")
    return out


def median_run(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run whose ``key`` is the median (the lower middle one of an even count), its other figures with it, plus
    ``rounds_<key>``: every run's ``key`` in run order."""
    ordered = sorted(runs, key=lambda run: run[key])
    return {**ordered[(len(ordered) - 1) // 2], f"rounds_{key}": [run[key] for run in runs]}
