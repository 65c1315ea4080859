"""Writing a benchmark's JSON report: one function every ``bench_*.py`` uses (``from report_file import write``).

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
