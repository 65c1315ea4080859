"""The local Profiler report: one self-contained HTML file per training job (no network, inline SVG plots).

Reads the trainer's side outputs (CONTRACTS §6) under the job's output data dir:
``profiler/system_metrics.jsonl``, ``profiler/step_timings.jsonl``, ``profiler/summary.json`` and
``metrics/epochs.jsonl``; plots system utilisation over time, the step-time breakdown (data loading vs compute),
the per-epoch loss/accuracy curves, and lists every rule finding with concrete advice.

Default location (as on SageMaker, under the job's rule output):
``<job_dir>/rule-output/ProfilerReport/profiler-output/profiler-report.html``.
"""

from __future__ import annotations

import html
import io
import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipelines.local.debugger import rules as rule_impl  # noqa: E402

log = logging.getLogger(__name__)

REPORT_RELATIVE_PATH = Path("rule-output") / "ProfilerReport" / "profiler-output" / "profiler-report.html"
DATA_LOADING_MAX_RATIO = 0.5


def report_path(job_dir: Path) -> Path:
    """Where the report of a job directory (the remapped ``/opt/ml``) is written by default."""
    return Path(job_dir) / REPORT_RELATIVE_PATH


@dataclass
class Profile:
    """The trainer's side outputs of one job (missing files give empty data)."""

    output_dir: Path | None
    system_metrics: list[dict[str, Any]] = field(default_factory=list)
    step_timings: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _read_jsonl(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if not path.is_file():
        return rows
    bad = 0
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
    if bad:
        problems.append(f"{path.name}: skipped {bad} malformed line(s)")
        log.warning("%s: skipped %d malformed line(s)", path, bad)
    return rows


def find_output_dir(job_dir: Path) -> Path | None:
    """The job's ``SM_OUTPUT_DATA_DIR``: ``<job_dir>/output/data`` or, failing that, the first directory under the
    job dir holding ``profiler/`` or ``metrics/`` side outputs."""
    job_dir = Path(job_dir)
    default = job_dir / "output" / "data"
    if (default / "profiler").is_dir() or (default / "metrics").is_dir():
        return default
    for marker in ("profiler/system_metrics.jsonl", "profiler/step_timings.jsonl", "metrics/epochs.jsonl"):
        for hit in sorted(job_dir.rglob(marker)):
            return hit.parent.parent
    return default if default.is_dir() else None


def load_profile(job_dir: Path) -> Profile:
    """Read the side outputs of a job directory; malformed lines are skipped and noted in ``problems``."""
    out = find_output_dir(job_dir)
    profile = Profile(out)
    if out is None:
        profile.problems.append(f"no training output data found under {job_dir}")
        return profile
    profile.system_metrics = _read_jsonl(out / "profiler" / "system_metrics.jsonl", profile.problems)
    profile.step_timings = _read_jsonl(out / "profiler" / "step_timings.jsonl", profile.problems)
    profile.epochs = _read_jsonl(out / "metrics" / "epochs.jsonl", profile.problems)
    summary_path = out / "profiler" / "summary.json"
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
            profile.summary = summary if isinstance(summary, dict) else {}
        except ValueError as exc:
            profile.problems.append(f"summary.json unreadable: {exc}")
    return profile


# ----------------------------------------------------------------------------------------------------------------
# plots (matplotlib Agg -> inline SVG)


def _svg(fig: Any, title: str) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg") :]
    return f'<figure class="plot" aria-label="{html.escape(title)}">{text}</figure>'


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _timestamps(rows: list[dict[str, Any]]) -> list[float]:
    stamps = [_float(r.get("timestamp")) for r in rows]
    if any(s is None for s in stamps):
        return list(range(len(rows)))  # fall back to sample index
    start = stamps[0] or 0.0
    return [float(s) - start for s in stamps]  # type: ignore[arg-type]


def plot_system(profile: Profile) -> str | None:
    rows = profile.system_metrics
    if not rows:
        return None
    t = _timestamps(rows)
    fig, ax = plt.subplots(figsize=(8, 3.2))
    for key, label in (("cpu_percent", "CPU %"), ("memory_percent", "memory %"), ("gpu_utilization", "GPU %")):
        values = [_float(r.get(key)) for r in rows]
        if any(v is not None for v in values):
            ax.plot(t, [v if v is not None else float("nan") for v in values], label=label)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("utilisation %")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper right")
    ax.set_title("System utilisation over time")
    ax.grid(alpha=0.3)
    return _svg(fig, "System utilisation over time")


def plot_steps(profile: Profile) -> str | None:
    train = [r for r in profile.step_timings if r.get("mode", "train") == "train"]
    if not train:
        return None
    data = [_float(r.get("data_time_s")) or 0.0 for r in train]
    compute = [_float(r.get("compute_time_s")) or 0.0 for r in train]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2), gridspec_kw={"width_ratios": [3, 1]})
    x = range(len(train))
    ax1.bar(x, data, color="#d9822b", label="data loading", width=1.0)
    ax1.bar(x, compute, bottom=data, color="#2b6cd9", label="compute", width=1.0)
    ax1.set_xlabel("training step")
    ax1.set_ylabel("seconds")
    ax1.set_title("Step time breakdown")
    ax1.legend(loc="upper right")
    total_data, total_compute = sum(data), sum(compute)
    if total_data + total_compute > 0:
        ax2.pie(
            [total_data, total_compute],
            labels=["data", "compute"],
            colors=["#d9822b", "#2b6cd9"],
            autopct="%1.0f%%",
        )
    ax2.set_title("Data loader vs compute")
    return _svg(fig, "Step time breakdown")


def plot_epochs(profile: Profile) -> str | None:
    rows = [r for r in profile.epochs if _float(r.get("epoch")) is not None]
    if not rows:
        return None
    epochs = [_float(r["epoch"]) for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    for key, label in (("train_loss", "train"), ("valid_loss", "validation")):
        values = [_float(r.get(key)) for r in rows]
        if any(v is not None for v in values):
            ax1.plot(epochs, [v if v is not None else float("nan") for v in values], marker="o", label=label)
    for key, label in (("train_accuracy", "train"), ("valid_accuracy", "validation")):
        values = [_float(r.get(key)) for r in rows]
        if any(v is not None for v in values):
            ax2.plot(epochs, [v if v is not None else float("nan") for v in values], marker="o", label=label)
    ax1.set_title("Loss per epoch")
    ax1.set_xlabel("epoch")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.set_title("Accuracy per epoch")
    ax2.set_xlabel("epoch")
    ax2.set_ylim(0, 1.02)
    ax2.legend()
    ax2.grid(alpha=0.3)
    return _svg(fig, "Loss and accuracy per epoch")


# ----------------------------------------------------------------------------------------------------------------
# findings and HTML


def profiler_findings(profile: Profile, params: Mapping[str, str] | None = None) -> list[rule_impl.ProfilerFinding]:
    """The ProfilerReport's analyses. ``params`` are ProfilerReport rule parameters; ``<Rule>_<param>`` keys (AWS's
    naming scheme, e.g. ``LowGPUUtilization_threshold_p95``) are passed to that rule."""
    params = dict(params or {})
    gpu_params = {k.split("_", 1)[1]: v for k, v in params.items() if k.lower().startswith("lowgpuutilization_")}
    return [
        rule_impl.data_loading_bottleneck(profile.step_timings, profile.summary, DATA_LOADING_MAX_RATIO),
        rule_impl.low_gpu_utilization(profile.system_metrics, gpu_params),
        rule_impl.cpu_saturation(profile.system_metrics),
        rule_impl.memory_pressure(profile.system_metrics),
    ]


def _throughput(profile: Profile) -> str:
    train = profile.summary.get("train")
    candidates = [*(train.items() if isinstance(train, dict) else []), *profile.summary.items()]
    for key, value in candidates:
        if ("throughput" in key.lower() or key == "samples_per_s") and _float(value) is not None:
            return f"{float(value):.1f} ({key})"
    rows = [r for r in profile.step_timings if r.get("mode", "train") == "train"]
    seconds = sum((_float(r.get("data_time_s")) or 0.0) + (_float(r.get("compute_time_s")) or 0.0) for r in rows)
    samples = sum(int(_float(r.get("batch_size")) or 0) for r in rows)
    return f"{samples / seconds:.1f} samples/s (from step timings)" if seconds > 0 and samples else "n/a"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1000px;color:#222}
h1{font-size:1.6em} h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;width:100%;margin:.5em 0} th,td{border:1px solid #ddd;padding:.35em .6em;
text-align:left;vertical-align:top} th{background:#f4f4f4}
.NoIssuesFound{color:#17803d;font-weight:600} .IssuesFound{color:#b8420f;font-weight:600}
.Error{color:#b00020;font-weight:600} .advice{background:#fff6e5;border-left:4px solid #d9822b;padding:.4em .8em}
figure.plot{margin:1em 0} figure.plot svg{max-width:100%;height:auto} .muted{color:#777}
"""


def _render_html(
    job_dir: Path, profile: Profile, rule_results: list[dict], findings: list[rule_impl.ProfilerFinding]
) -> str:
    esc = html.escape
    dl = next((f for f in findings if f.rule == "Dataloader"), None)
    ratio = dl.data.get("ratio") if dl else None
    overview = [
        ("Training job directory", str(job_dir)),
        ("Device", str(profile.summary.get("device", "n/a"))),
        ("Data-loader workers", str(dl.data.get("workers") if dl and dl.data.get("workers") is not None else "n/a")),
        ("Data loading / step time", f"{ratio:.0%}" if isinstance(ratio, float) else "n/a"),
        ("Throughput", _throughput(profile)),
        ("Epochs recorded", str(len(profile.epochs))),
        ("System metric samples", str(len(profile.system_metrics))),
        ("Generated", datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")),
    ]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>Profiler report: {esc(job_dir.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Profiler report: {esc(job_dir.name)}</h1>",
        "<h2 id='overview'>Overview</h2><table>",
        *(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in overview),
        "</table>",
    ]
    issues = [f for f in findings if f.triggered and f.advice]
    issues_rules = [r for r in rule_results if r.get("RuleEvaluationStatus") == "IssuesFound"]
    parts.append("<h2 id='recommendations'>Recommendations</h2>")
    if issues or issues_rules:
        parts.append("<ul>")
        parts += [f"<li class='advice'><b>{esc(f.rule)}</b>: {esc(f.advice)}</li>" for f in issues]
        parts += [
            f"<li class='advice'><b>{esc(str(r.get('RuleConfigurationName')))}</b>: "
            f"{esc(str(r.get('StatusDetails')))}</li>"
            for r in issues_rules
        ]
        parts.append("</ul>")
    else:
        parts.append("<p>No issues found: nothing to change.</p>")

    parts.append("<h2 id='rules'>Rule findings</h2><table><tr><th>Rule</th><th>Status</th><th>Details</th></tr>")
    for f in findings:
        status = "IssuesFound" if f.triggered else "NoIssuesFound"
        parts.append(f"<tr><td>{esc(f.rule)} <span class='muted'>(profiler)</span></td>"
                     f"<td class='{status}'>{status}</td><td>{esc(f.detail)}</td></tr>")
    for r in rule_results:
        status = str(r.get("RuleEvaluationStatus", ""))
        parts.append(
            f"<tr><td>{esc(str(r.get('RuleConfigurationName', '')))}</td><td class='{esc(status)}'>{esc(status)}</td>"
            f"<td>{esc(str(r.get('StatusDetails', '')))}</td></tr>"
        )
    parts.append("</table>")

    sections = (
        ("system", "System utilisation", plot_system, "system_metrics.jsonl"),
        ("steps", "Step time: data loading vs compute", plot_steps, "step_timings.jsonl"),
        ("epochs", "Training curves", plot_epochs, "metrics/epochs.jsonl"),
    )
    for anchor, title, plot, source in sections:
        parts.append(f"<h2 id='{anchor}'>{esc(title)}</h2>")
        try:
            svg = plot(profile)
        except Exception as exc:  # noqa: BLE001 - a broken plot must not lose the rest of the report
            log.exception("plot %s failed", anchor)
            svg = None
            profile.problems.append(f"plot {anchor!r} failed: {exc}")
        parts.append(svg or f"<p class='muted'>No data ({esc(source)} missing or empty).</p>")

    if profile.summary:
        parts.append("<h2 id='summary'>Trainer summary (profiler/summary.json)</h2><table>")
        parts += [
            f"<tr><th>{esc(str(k))}</th><td>{esc(json.dumps(v) if isinstance(v, dict | list) else str(v))}</td></tr>"
            for k, v in profile.summary.items()
        ]
        parts.append("</table>")
    if profile.problems:
        parts.append("<h2 id='problems'>Data problems</h2><ul>")
        parts += [f"<li>{esc(p)}</li>" for p in profile.problems]
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def build_profiler_report(
    job_dir: Path,
    rule_results: Iterable[dict],
    out_path: Path | None = None,
    profiler_params: Mapping[str, str] | None = None,
) -> tuple[Path, list[rule_impl.ProfilerFinding]]:
    """Write the report and return its path with the profiler findings (used by the ProfilerReport rule)."""
    job_dir = Path(job_dir)
    profile = load_profile(job_dir)
    findings = profiler_findings(profile, profiler_params)
    target = Path(out_path) if out_path else report_path(job_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(_render_html(job_dir, profile, list(rule_results), findings), encoding="utf-8")
    tmp.replace(target)
    log.info("wrote profiler report %s", target)
    return target, findings


def write_profiler_report(job_dir: Path, rule_results: list[dict], out_path: Path | None = None) -> Path:
    """Write the self-contained HTML profiler report of a job directory; returns its path (default
    :func:`report_path`)."""
    return build_profiler_report(job_dir, rule_results, out_path)[0]
