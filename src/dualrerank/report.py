"""Reports: markdown tables and PNG plots for training runs and experiments.

Two entry points write a whole report:

- `write_run_report(run_dir, title)` reads one training run directory (`metrics.jsonl`,
  one JSON object per epoch, plus `config.yaml`) and writes `report.md` and `curves.png`.
- `write_experiment_report(out_dir, rows, curves, ...)` writes `summary.json` (one row per
  model: figures, optionally with a `<name>_std` sibling for the spread over seeds; `null`
  where a figure does not apply), `report.md` and the bar and curve plots.

Both reports end their tables with a glossary of the columns (`key_glossary`), whose
meanings come from `metrics.LOGGED_KEYS`, the one list of logged names that
docs/metrics.md also shows; so a report never explains a column differently from the docs.

The building blocks (`read_metrics`, `markdown_table`, `key_glossary`, `plot_curves`,
`plot_bars`) are pure functions of their arguments. Every file is written atomically (temp file in the same
folder, then rename), so a crash never leaves a half-written report or plot behind.

Plots draw on a bare `matplotlib.figure.Figure` with the Agg canvas rather than through
`pyplot`, so no global figure registry or backend switch is involved; matplotlib itself is
imported on first use to keep `import dualrerank.report` (and the CLI) quick.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

from dualrerank.errors import DataError
from dualrerank.files import atomic_write

_RecordT = TypeVar("_RecordT", bound=Mapping[str, Any])  # a metrics record (dict or read-only view)

STD_SUFFIX = "_std"
MISSING = "–"

#: Column order of the experiment table (names of `metrics.FIGURES`); other scalar keys
#: found in the rows follow.
EXPERIMENT_COLUMNS = (
    "model",
    "normalized_utility",
    "utility",
    "ndcg@4",
    "ndcg@10",
    "ptar",
    "ptar@4",
    "exact_page",
    "collapse_rate",
    "certified_ptar",
    "latency_ms_p50",
    "params",
)

#: Metrics drawn as one bar chart each in an experiment report, when some row has them.
BAR_METRICS = ("normalized_utility", "ndcg@10")

#: Curve keys of an experiment report are those ending with one of these suffixes
#: (so `valid_ptar`, `train_kd`, `valid_collapse_rate`, `valid_score` are all found).
CURVE_SUFFIXES = ("ptar", "collapse_rate", "kd", "kd_loss", "score", "reward")

#: Keys of a metrics record that are bookkeeping rather than curves worth plotting.
_NOT_CURVES = frozenset({"epoch", "step", "seconds", "best"})

#: A run report's per-epoch table shows at most this many (the latest) epochs.
MAX_RUN_TABLE_ROWS = 30


# --------------------------------------------------------------------------- reading


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read a `metrics.jsonl` file: one JSON object per line, blank lines ignored.

    Raises DataError naming the file (and the line) when the file is missing, a line is not
    valid JSON (e.g. truncated by a crash), or a line holds something other than an object.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{p}: metrics file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{p}: cannot read metrics file ({exc})") from None
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{p}:{lineno}: malformed JSON line ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{p}:{lineno}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


# --------------------------------------------------------------------------- values


def _scalar(value: Any) -> Any:
    """Unwrap one-element NumPy/PyTorch values to Python scalars; anything else unchanged."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _number(value: Any) -> float | None:
    """The value as a float if it is a real number (not a bool), else None."""
    value = _scalar(value)
    return float(value) if _is_number(value) else None


def _format_number(value: float, digits: int) -> str:
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    v = float(value)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    # Fixed point would print a tiny loss as 0.0000 and a huge count unreadably.
    if v != 0 and (abs(v) < 0.5 * 10.0**-digits or abs(v) >= 1e9):
        return f"{v:.{max(digits - 1, 1)}e}"
    return f"{v:.{digits}f}"


def _format_cell(value: Any, std: Any, digits: int) -> str:
    value, std = _scalar(value), _scalar(std)
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if _is_number(value):
        text = _format_number(value, digits)
        if _is_number(std):
            text += f" ± {_format_number(std, digits)}"
        return text
    return str(value).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


# --------------------------------------------------------------------------- tables


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    *,
    std_suffix: str = STD_SUFFIX,
    digits: int = 4,
) -> str:
    """Render `rows` as a GitHub-flavoured markdown table with the given columns.

    A number is printed with `digits` decimals (scientific notation when that would hide
    it); integers get thousands separators; when the row also has `<column><std_suffix>`
    the cell reads "mean ± std". A missing key or null value prints as "–". Columns whose
    values are all numbers (or missing) are right-aligned, both in the markdown alignment
    row and in the padded source text; other columns are left-aligned.
    Returns the table without a trailing newline.
    """
    if not columns:
        raise ValueError("markdown_table needs at least one column")
    cells = [[_format_cell(row.get(c), row.get(c + std_suffix), digits) for c in columns] for row in rows]
    numeric = []
    for c in columns:
        present = [_scalar(row.get(c)) for row in rows if row.get(c) is not None]
        numeric.append(bool(present) and all(_is_number(v) for v in present))
    header = [str(c).replace("|", "\\|") for c in columns]
    widths = [max([len(header[j]), 3] + [len(r[j]) for r in cells]) for j in range(len(columns))]

    def line(parts: Iterable[str]) -> str:
        return "| " + " | ".join(parts) + " |"

    def pad(text: str, j: int) -> str:
        return text.rjust(widths[j]) if numeric[j] else text.ljust(widths[j])

    out = [line(pad(h, j) for j, h in enumerate(header))]
    out.append(line(("-" * (w - 1) + ":") if numeric[j] else (":" + "-" * (w - 1)) for j, w in enumerate(widths)))
    out.extend(line(pad(t, j) for j, t in enumerate(r)) for r in cells)
    return "\n".join(out)


def key_glossary(keys: Iterable[str]) -> list[str]:
    """Markdown lines `- `key`: meaning` for `keys` (first occurrence order), with the
    meanings of `metrics.describe_key`; a key missing from that list says so, so that an
    undocumented column shows up in the report instead of passing silently."""
    from dualrerank.metrics import describe_key  # torch-backed: imported on first use

    lines = []
    for key in dict.fromkeys(keys):
        meaning = describe_key(key)
        lines.append(f"- `{key}`: {meaning if meaning is not None else 'not in the list of logged names (docs/metrics.md)'}")
    return lines


# --------------------------------------------------------------------------- files


def _write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _new_figure(width: float, height: float):
    """A pyplot-free figure drawn by the Agg canvas (no global figure state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, out_png: Path) -> Path:
    return atomic_write(Path(out_png), lambda tmp: fig.savefig(tmp, format="png"))


def _slug(name: str) -> str:
    """A file-name-safe version of a metric name: 'ndcg@10' -> 'ndcg_at_10'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name.replace("@", "_at_")).strip("_") or "metric"


# --------------------------------------------------------------------------- plots


def _curve_points(records: Sequence[Mapping[str, Any]], key: str, x: str) -> tuple[list[float], list[float]]:
    """(xs, ys) of `key` against `x`; the record's 1-based position stands in for `x` when no
    record of the series has it (e.g. a loop logging per step without an epoch field)."""
    has_x = any(_number(r.get(x)) is not None for r in records)
    xs, ys = [], []
    for i, r in enumerate(records, start=1):
        y = _number(r.get(key))
        xv = _number(r.get(x)) if has_x else float(i)
        if y is not None and xv is not None:
            xs.append(xv)
            ys.append(y)
    return xs, ys


def plot_curves(
    series: Mapping[str, Sequence[Mapping[str, Any]]],
    keys: Sequence[str],
    out_png: Path,
    *,
    x: str = "epoch",
    title: str | None = None,
    marks: Sequence[float] = (),
    band: str | None = None,
) -> Path | None:
    """Plot training curves: one subplot per key, one line per series (run or model name).

    `marks`: x positions of events (a drift or reward shift), drawn as dashed vertical
    lines. `band`: a key suffix (e.g. "_std") whose value shades mean +- that around a curve.

    `series` maps a name to its metrics records (as `read_metrics` returns them). A key with
    no finite number in any record of any series is skipped; when every key is skipped no
    file is written and None is returned. Each series keeps one colour across subplots and
    a single legend names them. Returns `out_png` once written (atomically).
    """
    present = []
    for key in dict.fromkeys(keys):
        if any(math.isfinite(y) for recs in series.values() for y in _curve_points(recs, key, x)[1]):
            present.append(key)
    if not present:
        return None
    from matplotlib.ticker import MaxNLocator

    names = list(series)
    ncols = min(3, len(present))
    nrows = math.ceil(len(present) / ncols)
    # A lone subplot still gets room for a long title and a legend of several series.
    fig = _new_figure(max(7.0, 4.3 * ncols), 3.1 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    handles: dict[str, Any] = {}
    for ax, key in zip(axes, present, strict=False):  # the grid may have more cells than panels
        uses_x = False
        for i, name in enumerate(names):
            records = series[name]
            xs, ys = _curve_points(records, key, x)
            if not xs:
                continue
            uses_x |= any(_number(r.get(x)) is not None for r in records)
            (line,) = ax.plot(
                xs, ys, color=f"C{i % 10}", marker="o" if len(xs) <= 40 else None, markersize=3, linewidth=1.5, label=name
            )
            handles.setdefault(name, line)
            if band is not None:
                bx, bs = _curve_points(records, key + band, x)
                if bx and len(bx) == len(xs):
                    lo = [y - s_ for y, s_ in zip(ys, bs, strict=True)]
                    hi = [y + s_ for y, s_ in zip(ys, bs, strict=True)]
                    ax.fill_between(xs, lo, hi, color=f"C{i % 10}", alpha=0.15, linewidth=0)
        for m in marks:
            ax.axvline(m, color="0.4", linestyle="--", linewidth=1)
        ax.set_title(key)
        ax.set_xlabel(x if uses_x else "record")
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[len(present) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    ordered = [n for n in names if n in handles]
    fig.legend([handles[n] for n in ordered], ordered, loc="outside lower center", ncols=min(len(ordered), 4), frameon=False)
    return _save_png(fig, Path(out_png))


def plot_bars(
    rows: Sequence[Mapping[str, Any]],
    metric: str,
    out_png: Path,
    *,
    std_suffix: str = STD_SUFFIX,
    title: str | None = None,
    label_key: str = "model",
) -> Path | None:
    """Horizontal bar chart of one metric across rows (models), in row order top to bottom.

    Error bars show `<metric><std_suffix>` where a row has it; every bar is labelled with
    its value ("mean ± std"). Rows whose metric is null or missing are left out; with none
    left, no file is written and None is returned. Returns `out_png` once written.
    """
    kept = [(i, r) for i, r in enumerate(rows) if _number(r.get(metric)) is not None]
    if not kept:
        return None
    labels = [str(r.get(label_key) if r.get(label_key) is not None else f"row {i}") for i, r in kept]
    means = [cast(float, _number(r.get(metric))) for _, r in kept]  # kept: numbers only
    stds = [_number(r.get(metric + std_suffix)) for _, r in kept]
    has_std = any(s is not None for s in stds)
    errs = [s if s is not None and math.isfinite(s) else 0.0 for s in stds]

    fig = _new_figure(7.0, 0.45 * len(kept) + 1.6)
    ax = fig.subplots()
    pos = list(range(len(kept)))
    ax.barh(pos, means, xerr=errs if has_std else None, color="C0", alpha=0.85, capsize=3, height=0.6)
    ax.set_yticks(pos, labels)
    ax.invert_yaxis()
    for p, m, s, e in zip(pos, means, stds, errs, strict=True):
        text = _format_cell(m, s, 3)
        end = m + e if m >= 0 else m - e
        ax.annotate(
            text,
            (end, p),
            xytext=(4 if m >= 0 else -4, 0),
            textcoords="offset points",
            ha="left" if m >= 0 else "right",
            va="center",
            fontsize=8,
        )
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.margins(x=0.25)
    ax.set_xlabel(metric + (" (mean ± std)" if has_std else ""))
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title(title or metric)
    return _save_png(fig, Path(out_png))


# --------------------------------------------------------------------------- experiment


def find_curve_keys(
    curves: Mapping[str, Sequence[Mapping[str, Any]]],
    suffixes: Sequence[str] = CURVE_SUFFIXES,
) -> list[str]:
    """Keys of the curve records ending with one of `suffixes`, grouped in suffix order and
    otherwise in first-seen order (e.g. ['valid_ptar', 'valid_collapse_rate', 'train_kd'])."""
    seen = list(dict.fromkeys(k for recs in curves.values() for r in recs for k in r if k not in _NOT_CURVES))
    out: list[str] = []
    for suffix in suffixes:
        out.extend(k for k in seen if k.endswith(suffix) and k not in out)
    return out


def _x_key(curves: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    for candidate in ("epoch", "step"):
        if any(_number(r.get(candidate)) is not None for recs in curves.values() for r in recs):
            return candidate
    return "epoch"


def _jsonable(value: Any, where: str, non_finite: list[str]) -> Any:
    """`value` as strict JSON: non-finite floats become null (and are listed in
    `non_finite`), tuples become lists, paths become strings."""
    value = _scalar(value)
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        v = float(value)
        if not math.isfinite(v):
            non_finite.append(where)
            return None
        return v
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}", non_finite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]", non_finite) for i, v in enumerate(value)]
    raise DataError(f"{where}: value of type {type(value).__name__} cannot be written to summary.json")


def experiment_columns(rows: Sequence[Mapping[str, Any]], std_suffix: str = STD_SUFFIX) -> list[str]:
    """Table columns for experiment rows: `EXPERIMENT_COLUMNS` first, then any other scalar
    key, leaving out std siblings and columns that are null or missing in every row."""
    keys = list(EXPERIMENT_COLUMNS) + [k for r in rows for k in r if k not in EXPERIMENT_COLUMNS]
    out = []
    for k in dict.fromkeys(keys):
        if k.endswith(std_suffix) and k[: -len(std_suffix)] in keys:
            continue
        values = [_scalar(r.get(k)) for r in rows if r.get(k) is not None]
        if values and all(isinstance(v, (str, numbers.Real)) for v in values):
            out.append(k)
    return out


def write_experiment_report(
    out_dir: Path,
    rows: Sequence[Mapping[str, Any]],
    curves: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    title: str,
    commands: Sequence[str],
    notes: Sequence[str] = (),
    std_suffix: str = STD_SUFFIX,
) -> dict[str, Any]:
    """Write an experiment's `summary.json`, `report.md` and plots into `out_dir`.

    rows:     one mapping per model (keys as in `EXPERIMENT_COLUMNS`, optional std siblings,
              null where not applicable).
    curves:   model name -> its training metrics records, for the curve plot.
    commands: the command line(s) that produced the experiment, quoted in the report.

    Plots: `bars_<metric>.png` for each of `BAR_METRICS` some row has, and `curves.png` with
    the curve keys found by `find_curve_keys`. summary.json is strict JSON: NaN/inf figures
    are stored as null and listed under "non_finite" (the table still shows them as nan).
    Returns the summary dict as written: {"title", "commands", "notes", "rows", "plots",
    "non_finite"}.
    """
    out_dir = Path(out_dir)
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataError(f"experiment row {i}: expected a mapping of figures, got {type(row).__name__}")
    non_finite: list[str] = []
    clean_rows = [
        _jsonable(row, f"rows[{i}]" + (f" ({row['model']})" if row.get("model") is not None else ""), non_finite)
        for i, row in enumerate(rows)
    ]
    out_dir.mkdir(parents=True, exist_ok=True)

    plots: list[str] = []
    for metric in BAR_METRICS:
        png = plot_bars(rows, metric, out_dir / f"bars_{_slug(metric)}.png", std_suffix=std_suffix, title=f"{title}: {metric}")
        if png is not None:
            plots.append(png.name)
    keys = find_curve_keys(curves)
    png = plot_curves(curves, keys, out_dir / "curves.png", x=_x_key(curves), title=f"{title}: training curves")
    if png is not None:
        plots.append(png.name)

    summary = {
        "title": title,
        "commands": list(commands),
        "notes": list(notes),
        "rows": clean_rows,
        "plots": plots,
        "non_finite": non_finite,
    }
    _write_text(out_dir / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")

    md = [f"# {title}", ""]
    if commands:
        md += ["Produced by:", "", "```bash", *commands, "```", ""]
    md += ["## Results", ""]
    columns = experiment_columns(rows, std_suffix)
    if rows and columns:
        md += [markdown_table(rows, columns, std_suffix=std_suffix), ""]
        if any(r.get(c + std_suffix) is not None for r in rows for c in columns):
            md += ["Cells read mean ± std over seeds; – means not applicable.", ""]
        else:
            md += ["– means not applicable.", ""]
        md += ["Columns:", "", *key_glossary(c for c in columns if c != "model"), ""]
    else:
        md += ["No results.", ""]
    if non_finite:
        md += [f"Non-finite figures (stored as null in summary.json): {', '.join(non_finite)}.", ""]
    if notes:
        md += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    if plots:
        md += ["## Plots", ""]
        for name in plots:
            md += [f"[![{name}]({name})]({name})", ""]
    _write_text(out_dir / "report.md", "\n".join(md).rstrip("\n") + "\n")
    return summary


# --------------------------------------------------------------------------- single run


def _latest_per_x(records: Sequence[_RecordT], x: str) -> list[_RecordT]:
    """Keep the last record for each value of `x`: an epoch re-run after a resume appends a
    second line for the same epoch, and the later one is the one the checkpoint reflects."""
    if not any(_number(r.get(x)) is not None for r in records):
        return list(records)
    last: dict[float, int] = {}
    for i, r in enumerate(records):
        xv = _number(r.get(x))
        if xv is not None:
            last[xv] = i
    return [r for i, r in enumerate(records) if (xv := _number(r.get(x))) is None or last[xv] == i]


def _best_record(records: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    flagged = [r for r in records if r.get("best") is True]
    if flagged:
        return flagged[-1]
    scored = [r for r in records if (v := _number(r.get("valid_score"))) is not None and math.isfinite(v)]
    return max(scored, key=lambda r: cast(float, _number(r["valid_score"]))) if scored else None  # scored: numbers only


def _run_phases(run_dir: Path) -> dict[str, float]:
    """`phase_seconds` of the run's eval.json (seconds per phase), or {} without one."""
    try:
        phases = json.loads((Path(run_dir) / "eval.json").read_text()).get("phase_seconds") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    return {str(k): float(v) for k, v in phases.items() if _number(v) is not None}


def write_run_report(run_dir: Path, title: str) -> Path:
    """Write `report.md` and `curves.png` for one training run directory; returns report.md.

    Reads `run_dir/metrics.jsonl` (DataError if missing or malformed) and quotes
    `config.yaml` when present. The report gives the best epoch (the last one flagged
    `best`, else the highest `valid_score`), total time, a per-epoch table (the latest
    `MAX_RUN_TABLE_ROWS` epochs) and the curves of every numeric metric.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: run directory not found")
    records = read_metrics(run_dir / "metrics.jsonl")
    x = _x_key({"run": records})
    records = _latest_per_x(records, x)

    md = [f"# {title}", "", f"Run directory: `{run_dir}`", ""]
    if not records:
        md += ["No epochs recorded yet (metrics.jsonl is empty).", ""]
    else:
        best = _best_record(records)
        seconds = [s for s in (_number(r.get("seconds")) for r in records) if s is not None]
        facts = [f"- {x}s recorded: {len(records)}"]
        if best is not None:
            score = _format_cell(best.get("valid_score"), None, 4)
            facts.append(f"- best {x}: {_format_cell(best.get(x), None, 4)} (valid_score {score})")
        phases = _run_phases(run_dir)
        if phases:
            # Every phase of the run (evaluator, its targets, the model...), not only the
            # epochs of metrics.jsonl; the test evaluation is listed apart.
            parts = ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in phases.items())
            train = sum(v for k, v in phases.items() if k != "test")
            facts.append(f"- training time: {train:.1f} s ({parts})")
        elif seconds:
            facts.append(f"- training time: {sum(seconds):.1f} s")
        if (run_dir / "checkpoint").is_dir():
            facts.append("- best checkpoint: [checkpoint/](checkpoint/)")
        md += ["## Summary", "", *facts, ""]

        keys = list(dict.fromkeys(k for r in records for k in r if k not in _NOT_CURVES and k != x))
        png = plot_curves({run_dir.name or "run": records}, keys, run_dir / "curves.png", x=x, title=title)
        if png is not None:
            md += ["## Curves", "", f"![curves]({png.name})", ""]

        columns = [
            c
            for c in dict.fromkeys(k for r in records for k in r)
            if all(v is None or isinstance(_scalar(v), (str, numbers.Real)) for v in (r.get(c) for r in records))
        ]
        shown = records[-MAX_RUN_TABLE_ROWS:]
        md += [f"## Per {x}", ""]
        if len(shown) < len(records):
            md += [f"Latest {len(shown)} of {len(records)}; all of them are in metrics.jsonl.", ""]
        md += [markdown_table(shown, columns), ""]
        md += ["Columns:", "", *key_glossary(c for c in columns if c != x), ""]

    config = run_dir / "config.yaml"
    if config.is_file():
        md += ["## Config", "", "```yaml", config.read_text(encoding="utf-8").rstrip("\n"), "```", ""]
    return _write_text(run_dir / "report.md", "\n".join(md).rstrip("\n") + "\n")


# --------------------------------------------------------------------------- online experiment

ONLINE_COLUMNS = ("method", "final_normalized_utility", "auc_normalized_utility", "steps_to_90pct", "recovery_steps")


def write_online_report(
    out_dir: Path,
    summary: Mapping[str, Any],
    curves: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]],
    marks: Mapping[str, Sequence[float]],
    *,
    title: str,
    commands: Sequence[str],
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """Write an online experiment's `summary.json`, `report.md`, one `curves_<stream>.csv`
    and one `curves_<stream>.png` (normalized utility over steps, methods overlaid, mean
    +- std over seeds shaded, shifts marked) per stream.

    summary: {"methods": {method: {stream: figures}}, "references": {stream: {...}}, ...}.
    curves:  stream -> method -> records {"step", "normalized_utility", "normalized_utility_std"}.
    marks:   stream -> the steps of its shifts.
    """
    import csv
    import io

    out_dir.mkdir(parents=True, exist_ok=True)
    non_finite: list[str] = []
    clean = _jsonable(dict(summary), "summary", non_finite)
    plots: list[str] = []
    for stream, by_method in curves.items():
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["method", "step", "normalized_utility", "normalized_utility_std"])
        for method, recs in by_method.items():
            for r in recs:
                w.writerow([method, r["step"], r.get("normalized_utility"), r.get("normalized_utility_std")])
        _write_text(out_dir / f"curves_{_slug(stream)}.csv", buf.getvalue())
        png = plot_curves(
            by_method,
            ["normalized_utility"],
            out_dir / f"curves_{_slug(stream)}.png",
            x="step",
            title=f"{title}: stream {stream}",
            marks=marks.get(stream, ()),
            band="_std",
        )
        if png is not None:
            plots.append(png.name)
    clean.update({"title": title, "commands": list(commands), "notes": list(notes), "plots": plots, "non_finite": non_finite})
    _write_text(out_dir / "summary.json", json.dumps(clean, indent=2, allow_nan=False) + "\n")

    md = [f"# {title}", ""]
    if commands:
        md += ["Produced by:", "", "```bash", *commands, "```", ""]
    streams = list(dict.fromkeys(s for per in summary.get("methods", {}).values() for s in per))
    for stream in streams:
        md += [f"## Stream {stream}", ""]
        ref = summary.get("references", {}).get(stream)
        if ref:
            md += [
                "Reference levels on the stream's first evaluation set: "
                + ", ".join(f"{k} {v:.4f}" for k, v in ref.items() if isinstance(v, (int, float)))
                + ".",
                "",
            ]
        rows = []
        for method, per in summary["methods"].items():
            if stream not in per:
                continue
            fig = dict(per[stream])
            rec = fig.pop("recovery_steps", None)
            fig["recovery_steps"] = "–" if not rec else ", ".join("never" if r is None else f"{r:g}" for r in rec)
            rows.append({"method": method, **fig})
        md += [markdown_table(rows, list(ONLINE_COLUMNS)), ""]
        if f"curves_{_slug(stream)}.png" in plots:
            md += [f"[![curves_{_slug(stream)}.png](curves_{_slug(stream)}.png)](curves_{_slug(stream)}.png)", ""]
    md += ["Cells read mean ± std over seeds. Columns:", "", *key_glossary(ONLINE_COLUMNS[1:]), ""]
    if notes:
        md += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    _write_text(out_dir / "report.md", "\n".join(md).rstrip("\n") + "\n")
    return clean


# --------------------------------------------------------------------------- demo

DEMO_MODELS = (
    ("upstream", "baselines", "upstream"),
    ("lambdamart", "baselines", "lambdamart"),
    ("nar_no_kd", "baselines", "nar_no_kd"),
    ("teacher", "teacher", None),
    ("student_skd", "student", None),
)


def write_demo_report(
    out_dir: Path, results: Mapping[str, Any], seconds: Mapping[str, float], *, config: Mapping[str, Any]
) -> dict[str, Any]:
    """`summary.json`, `report.md` and plots of `dualrerank demo` (see `dualrerank.demo`):
    normalized utility by model, PTAR and collapse over distillation, the online curves with
    the shift marked, the A/B lifts and the teacher-vs-student latency."""
    out_dir = Path(out_dir)
    rows = []
    for name, stage, key in DEMO_MODELS:
        r = results.get(stage, {})
        r = r.get(key, {}) if key is not None else r
        if r:
            rows.append(
                {
                    "model": name,
                    **{k: r.get(k) for k in ("normalized_utility", "ptar", "collapse_rate", "latency_ms_p50", "latency_ms_p99")},
                }
            )
    online = results.get("online", {})
    for method in ("ldro", "grpo"):
        if method in online:
            rows.append(
                {
                    "model": f"{method}_student (online)",
                    "normalized_utility": online[method].get("eval/normalized_utility"),
                    "ptar": online[method].get("eval/ptar"),
                    "collapse_rate": online[method].get("eval/collapse_rate"),
                }
            )
    plots: list[str] = []
    png = plot_bars(rows, "normalized_utility", out_dir / "normalized_utility.png", title="normalized utility by model")
    if png is not None:
        plots.append(png.name)
    student_curve = (
        read_metrics(out_dir / "student" / "metrics.jsonl") if (out_dir / "student" / "metrics.jsonl").is_file() else []
    )
    png = plot_curves(
        {"student_skd": student_curve},
        ["valid_ptar", "valid_collapse_rate"],
        out_dir / "distillation.png",
        x="epoch",
        title="distillation: PTAR and collapse",
    )
    if png is not None:
        plots.append(png.name)
    curves = {
        m: [r for r in read_metrics(out_dir / "online" / m / "metrics.jsonl") if "eval/normalized_utility" in r]
        for m in ("ldro", "grpo")
        if (out_dir / "online" / m / "metrics.jsonl").is_file()
    }
    shift = results.get("world", {}).get("shift_step")
    png = plot_curves(
        curves,
        ["eval/normalized_utility", "eval/collapse_rate"],
        out_dir / "online.png",
        x="step",
        title="online: LDRO vs GRPO (dashed: preference shift)",
        marks=[shift] if shift else (),
    )
    if png is not None:
        plots.append(png.name)
    ab = results.get("ab", {})
    for name in ab.get("plots", []):
        plots.append(f"ab/{name}")
    t, s = results.get("teacher", {}), results.get("student", {})
    latency = {
        "teacher_ms_p50": t.get("latency_ms_p50"),
        "student_ms_p50": s.get("latency_ms_p50"),
        "teacher_ms_p99": t.get("latency_ms_p99"),
        "student_ms_p99": s.get("latency_ms_p99"),
    }
    non_finite: list[str] = []
    summary = _jsonable(
        {
            "title": "dualrerank demo",
            "config": dict(config),
            "stage_seconds": dict(seconds),
            "rows": rows,
            "online": online,
            "ab": ab,
            "latency": latency,
            "serve": results.get("serve", {}),
            "plots": plots,
        },
        "demo",
        non_finite,
    )
    summary["non_finite"] = non_finite
    _write_text(out_dir / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")

    md = [
        "# dualrerank demo",
        "",
        "Simulated world -> logs -> AR teacher -> SKD student (beside score-and-sort baselines and the NAR student "
        "without KD) -> LDRO vs GRPO online across a preference shift -> simulated A/B test -> ONNX export. "
        "Figures are measured on this run's held-out requests; [paper] marks what Dual-Rerank reports.",
        "",
        "## Offline: every model on the same test requests",
        "",
        markdown_table(rows, ["model", "normalized_utility", "ptar", "collapse_rate", "latency_ms_p50", "latency_ms_p99"]),
        "",
        "Online rows: the student after the online run, on the evaluation set of the last drift segment. Columns:",
        "",
        *key_glossary(["normalized_utility", "ptar", "collapse_rate", "latency_ms_p50", "latency_ms_p99"]),
        "",
    ]
    if latency["teacher_ms_p50"] and latency["student_ms_p50"]:
        md += [
            f"Latency at batch size 1 (PyTorch, this machine): teacher {latency['teacher_ms_p50']:.2f} ms p50, student "
            f"{latency['student_ms_p50']:.2f} ms p50 ({latency['student_ms_p50'] / latency['teacher_ms_p50']:.2f}x). "
            "[paper] reports 21.5 ms -> 12.1 ms against its AR baseline (a third-party extraction; see method.md).",
            "",
        ]
    if ab.get("table_md"):
        md += ["## Simulated A/B test", "", ab["table_md"], "", "Full report: [ab/report.md](ab/report.md).", ""]
    elif ab:
        md += ["## Simulated A/B test", "", "See [ab/report.md](ab/report.md).", ""]
    md += ["## Stages", "", markdown_table([{"stage": k, "seconds": v} for k, v in seconds.items()], ["stage", "seconds"]), ""]
    if plots:
        md += ["## Plots", "", *(f"[![{p}]({p})]({p})" + "\n" for p in plots)]
    serve = results.get("serve", {})
    if serve.get("checkpoint"):
        md += ["## Serve the student", "", "```bash", f"dualrerank serve --checkpoint {serve['checkpoint']}", "```", ""]
    _write_text(out_dir / "report.md", "\n".join(md).rstrip("\n") + "\n")
    return summary


# --------------------------------------------------------------------------- A/B test

#: Rows of the A/B table, in the order of the paper's online table (CTR, long view,
#: reformulation, then what the simulator adds, then latency); `dualrerank.train.abtest`
#: computes them.
AB_ROWS = (
    "ctr",
    "ctr_per_page",
    "long_view_rate",
    "reformulation_rate",
    "watch_time_per_request",
    "normalized_utility",
    "utility",
    "latency_ms_p50",
    "latency_ms_p99",
)
#: Rows drawn in lifts.png (latency has no interval, see docs/evaluation.md).
AB_PLOT_ROWS = ("ctr", "long_view_rate", "reformulation_rate", "watch_time_per_request", "normalized_utility", "latency_ms_p50")
_AB_DIGITS = {"watch_time_per_request": 2, "utility": 3, "latency_ms_p50": 2, "latency_ms_p99": 2}


def _pct(x: float) -> str:
    return f"{x * 100:+.2f}%"


def _lift_cell(row: Mapping[str, Any]) -> str:
    lift, ci = _number(row.get("lift")), row.get("lift_ci")
    if lift is None:
        # No relative lift (a control value <= 0): the absolute difference instead.
        diff, dci = _number(row.get("difference")), row.get("difference_ci")
        if diff is None:
            return MISSING
        return f"Δ {diff:+.4f}" + (f" [{dci[0]:+.4f}, {dci[1]:+.4f}]" if dci else "")
    if not ci:
        return f"{_pct(lift)} (no interval)"
    lo, hi = ci
    # An asterisk where the interval excludes 0: the difference is significant at its level.
    star = "*" if lo > 0 or hi < 0 else ""
    return f"{_pct(lift)}{star} [{_pct(lo)}, {_pct(hi)}]"


def _ab_order(summary: Mapping[str, Any]) -> tuple[str, list[str]]:
    control = summary["control"]
    return control, [a for a in summary["arms"] if a != control]


def ab_results_table(summary: Mapping[str, Any]) -> str:
    """The A/B table of a `dualrerank ab` summary: one row per metric (`AB_ROWS`), the
    control's value, then each arm's value and its lift against the control with its
    interval (`lift [low, high]`, an asterisk where the interval excludes 0)."""
    control, others = _ab_order(summary)
    level = f"{summary.get('confidence', 0.95):.0%} CI"
    columns = ["metric", f"{control} (control)"]
    for arm in others:
        columns += [arm, f"{arm} lift [{level}]"]
    rows = []
    for metric in AB_ROWS:
        digits = _AB_DIGITS.get(metric, 4)
        value = summary["arms"][control].get(metric)
        row: dict[str, Any] = {"metric": metric, columns[1]: MISSING if value is None else _format_number(value, digits)}
        for arm in others:
            v = summary["arms"][arm].get(metric)
            row[arm] = MISSING if v is None else _format_number(v, digits)
            row[f"{arm} lift [{level}]"] = _lift_cell(summary["lifts"][arm][metric])
        rows.append(row)
    return markdown_table(rows, columns)


def plot_lifts(summary: Mapping[str, Any], out_png: Path, metrics: Sequence[str] = AB_PLOT_ROWS) -> Path | None:
    """One panel per metric: each arm's relative lift against the control (percent) with its
    interval as an error bar (a bare point where there is none); None when no arm has a lift."""
    control, others = _ab_order(summary)
    panels = [m for m in metrics if any(_number(summary["lifts"][a][m].get("lift")) is not None for a in others)]
    if not panels:
        return None
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = _new_figure(4.3 * ncols, (0.45 * len(others) + 1.3) * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, metric in zip(axes, panels, strict=False):  # the grid may have more cells than panels
        for i, arm in enumerate(others):
            row = summary["lifts"][arm][metric]
            lift = _number(row.get("lift"))
            if lift is None:
                continue
            ci = row.get("lift_ci")
            err = None if not ci else [[(lift - ci[0]) * 100], [(ci[1] - lift) * 100]]
            ax.errorbar([lift * 100], [i], xerr=err, fmt="o", color=f"C{i % 10}", capsize=4, markersize=5)
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(others)), others)
        ax.set_ylim(-0.6, len(others) - 0.4)
        ax.invert_yaxis()
        ax.set_title(metric)
        ax.set_xlabel(f"lift vs {control} (%)")
        ax.grid(True, axis="x", alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(f"Lift against {control}, {summary.get('confidence', 0.95):.0%} intervals ({summary.get('design')} design)")
    return _save_png(fig, Path(out_png))


def _third_party_lines(third: Mapping[str, Any]) -> list[str]:
    one, two = third.get("extraction_1", {}), third.get("extraction_2", {})

    def pct(d: Mapping[str, Any], key: str) -> str:
        return f"{d[key]:+.3f}%" if _number(d.get(key)) is not None else MISSING

    latency_one = (
        f"{one['latency_ms_baseline']} ms -> {one['latency_ms']} ms ({one['latency_lift_pct']:+.1f}%)"
        if one.get("latency_ms_baseline")
        else MISSING
    )
    rows = [
        {"metric": "ctr", "extraction 1": pct(one, "ctr_lift_pct"), "extraction 2": pct(two, "ctr_lift_pct")},
        {
            "metric": "long_view_rate",
            "extraction 1": pct(one, "long_view_lift_pct"),
            "extraction 2": pct(two, "long_view_lift_pct"),
        },
        {
            "metric": "reformulation_rate",
            "extraction 1": pct(one, "reformulation_lift_pct"),
            "extraction 2": pct(two, "reformulation_lift_pct"),
        },
        {
            "metric": "latency",
            "extraction 1": latency_one,
            "extraction 2": f"{two['latency_ms']} ms" if two.get("latency_ms") else MISSING,
        },
    ]
    return [
        "## What the paper reports (third-party, not measured here)",
        "",
        f"{third.get('source', '')}. Extraction 1: {one.get('from', '?')}; extraction 2: {two.get('from', '?')}. "
        "They agree on CTR and on Dual-Rerank's 12.1 ms and disagree on the rest; neither is verified, and neither "
        "is a figure of this project. Watch time and normalized utility are not reported.",
        "",
        markdown_table(rows, ["metric", "extraction 1", "extraction 2"]),
        "",
    ]


def write_ab_report(out_dir: Path, summary: Mapping[str, Any], *, notes: Sequence[str] = ()) -> dict[str, Any]:
    """Write a `dualrerank ab` test's `summary.json`, `report.md` and `lifts.png` into
    `out_dir`; returns the summary as written (strict JSON: non-finite figures become null
    and are listed under `non_finite`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    non_finite: list[str] = []
    clean = _jsonable(dict(summary), "summary", non_finite)
    plots: list[str] = []
    png = plot_lifts(clean, out_dir / "lifts.png")
    if png is not None:
        plots.append(png.name)
    clean.update({"plots": plots, "non_finite": non_finite})
    _write_text(out_dir / "summary.json", json.dumps(clean, indent=2, allow_nan=False) + "\n")

    control, others = _ab_order(clean)
    arms = clean["arms"]
    world = clean.get("world") or "the default world"
    md = [f"# {clean['title']}", ""]
    if clean.get("commands"):
        md += ["Produced by:", "", "```bash", *clean["commands"], "```", ""]
    design_note = (
        "every arm serves every request, independent feedback draws"
        if clean["design"] == "paired"
        else "each request served by one arm drawn uniformly at random"
    )
    md += [
        f"- design: {clean['design']} ({design_note})",
        f"- traffic: {clean['requests']:,} requests of {world} (world seed {clean['world_seed']}), traffic seed "
        f"{clean['traffic_seed']}, {clean['requests_per_step']} requests per stream step, {clean['steps']} steps, "
        f"{clean['drift_events']} drift event(s) in force during the test; pages of {clean['page_length']} items",
        f"- control: {control}; intervals: {clean['confidence']:.0%}, {clean['interval_method']} method",
        "- arms: "
        + "; ".join(
            f"{a} = {arms[a]['arm_path']} ({arms[a]['model']}, {arms[a]['requests']:,} requests, served "
            f"for latency by {arms[a]['serving_path']})"
            for a in arms
        ),
        "",
        "## Results",
        "",
        ab_results_table(clean),
        "",
        "Lift = arm / control - 1, with its interval; * the interval excludes 0; Δ: the difference arm - control, "
        "where the control's value is not positive. Latency is timed at batch size 1 "
        "on each arm's serving path on this machine, without an interval. Rows:",
        "",
        *key_glossary(AB_ROWS),
        "",
    ]
    parity = [f"{a} {arms[a]['serving_parity']:.0%}" for a in arms if _number(arms[a].get("serving_parity")) is not None]
    if parity:
        md += [f"Serving path agrees with the pages served in the test (timed requests): {', '.join(parity)}.", ""]
    md += ["## Power", "", clean["power"]["line"], ""]
    md += _third_party_lines(clean.get("third_party", {}))
    if non_finite:
        md += [f"Non-finite figures (stored as null in summary.json): {', '.join(non_finite)}.", ""]
    if notes:
        md += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    if plots:
        md += ["## Plot", "", *(f"[![{p}]({p})]({p})" for p in plots), ""]
    md += [f"Wall time: {clean.get('wall_seconds', 0):.1f} s. Config: [config.yaml](config.yaml).", ""]
    _write_text(out_dir / "report.md", "\n".join(md).rstrip("\n") + "\n")
    return clean


# --------------------------------------------------------------------------- off-policy evaluation

OPE_COLUMNS = ("estimate", "ci_low", "ci_high", "se", "error", "covered", "ess", "nonzero_share")


def write_ope_report(
    out_dir: Path,
    summary: Mapping[str, Any],
    estimators: Mapping[str, tuple[str, str]],
    *,
    level: float,
    interval_method: str,
) -> dict[str, Any]:
    """Write `dualrerank ope`'s `summary.json` and `report.md` into `out_dir`.

    summary: {"estimators": {name: figures}, "truth", "logged_reward", "data", "support_notes", ...}
    (docs/metrics.md, 'Off-policy evaluation'); estimators: name -> (what it is, what it
    assumes), for the report's list. Returns the summary as written (strict JSON)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    non_finite: list[str] = []
    clean = _jsonable(dict(summary), "summary", non_finite)
    clean["non_finite"] = non_finite
    _write_text(out_dir / "summary.json", json.dumps(clean, indent=2, allow_nan=False) + "\n")

    truth = clean.get("truth")
    columns = [c for c in OPE_COLUMNS if truth is not None or c not in ("error", "covered")]
    rows = [{"estimator": name, **{c: fig.get(c) for c in columns}} for name, fig in clean["estimators"].items()]
    data = clean.get("data", {})
    md = [f"# {clean.get('title', 'dualrerank ope')}", ""]
    if clean.get("commands"):
        md += ["Produced by:", "", "```bash", *clean["commands"], "```", ""]
    weights = ", ".join(f"{v:g} x {k}" for k, v in clean.get("reward_weights", {}).items())
    md += [
        f"Policy `{clean.get('policy')}` ({clean.get('policy_model')}); evaluator: "
        f"{'`' + str(clean['evaluator']) + '`' if clean.get('evaluator') else 'none'}. Logs: {data.get('source')}, "
        f"{data.get('requests', 0):,} requests, pages of {data.get('page_length')}.",
        "",
        f"Estimand: the policy's mean page reward on these requests, reward = {weights} events summed over the "
        f"page. The logged pages' realised mean reward (the logging policy's value): "
        f"{_format_number(clean.get('logged_reward') or 0.0, 4)}."
        + (
            f" True value (exact, from the simulated world's user model): {_format_number(truth, 4)}."
            if truth is not None
            else ""
        ),
        "",
        f"Intervals: {level:.0%}, {interval_method}.",
        "",
        markdown_table(rows, ["estimator", *columns]),
        "",
        "Columns:",
        "",
        *key_glossary(f"estimators.<name>.{c}" for c in columns),
        "",
        "## Estimators",
        "",
    ]
    for name, fig in clean["estimators"].items():
        what, assumes = estimators.get(name, (name, ""))
        line = f"- `{name}`: {what}; assumes: {assumes}."
        if fig.get("status") != "ok":
            line += f" **Not run**: {fig.get('reason')}."
        md.append(line)
    md.append("")
    if clean.get("support_notes"):
        md += ["## Support", "", *(f"- {n}" for n in clean["support_notes"]), ""]
    md += ["Config: [config.yaml](config.yaml); every figure: [summary.json](summary.json).", ""]
    _write_text(out_dir / "report.md", "\n".join(md).rstrip("\n") + "\n")
    return clean
