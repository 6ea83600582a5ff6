"""Reports: metrics reader, markdown tables, PNG plots, experiment and run reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dualrerank.errors import DataError
from dualrerank.metrics import FIGURES, LOGGED_KEYS, describe_key
from dualrerank.report import (
    BAR_METRICS,
    EXPERIMENT_COLUMNS,
    find_curve_keys,
    key_glossary,
    markdown_table,
    plot_bars,
    plot_curves,
    read_metrics,
    write_experiment_report,
    write_run_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data.startswith(PNG_MAGIC)


def _no_temp_files(folder: Path) -> bool:
    return not [p.name for p in folder.rglob("*") if p.name.endswith(".tmp")]


def _curve(epochs: int, kd: bool, scale: float) -> list[dict]:
    out = []
    for e in range(1, epochs + 1):
        r = {
            "epoch": e,
            "train_loss": 2.0 / e,
            "valid_score": scale * (1 - math.exp(-e / 3)),
            "valid_ptar": 0.3 + 0.1 * e,
            "valid_collapse_rate": 0.4 / e,
            "seconds": 0.5,
            "best": True,
        }
        if kd:
            r["train_kd"] = 1.0 / e
        out.append(r)
    return out


ROWS = [
    {"model": "random", "normalized_utility": 0.0, "ndcg@10": 0.4, "ptar": None, "params": 0},
    {"model": "teacher", "normalized_utility": 0.71, "normalized_utility_std": 0.02, "ndcg@10": 0.66,
     "ptar": 0.88, "latency_ms_p50": 4.2, "params": 1234567},
    {"model": "student", "normalized_utility": 0.69, "normalized_utility_std": 0.03, "ndcg@10": 0.65,
     "ndcg@10_std": 0.01, "ptar": 0.81, "latency_ms_p50": 0.8, "params": 1034567},
]


# --------------------------------------------------------------------------- read_metrics


def test_read_metrics_reads_objects_and_skips_blank_lines(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"epoch": 1, "train_loss": 0.5}\n\n{"epoch": 2, "train_loss": 0.25}\n')
    assert read_metrics(p) == [{"epoch": 1, "train_loss": 0.5}, {"epoch": 2, "train_loss": 0.25}]


def test_read_metrics_malformed_line_names_file_and_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"epoch": 1}\n{"epoch": 2}\n{"epoch": 3, "train_lo\n')
    with pytest.raises(DataError, match=r"metrics\.jsonl:3: malformed JSON") as info:
        read_metrics(p)
    assert "\n" not in str(info.value)


def test_read_metrics_non_object_line_and_missing_file(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"epoch": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r":2: expected a JSON object, got list"):
        read_metrics(p)
    with pytest.raises(DataError, match="not found"):
        read_metrics(tmp_path / "absent.jsonl")


# --------------------------------------------------------------------------- markdown_table


def test_markdown_table_std_null_missing_and_alignment():
    rows = [
        {"model": "a", "score": 0.5, "score_std": 0.01, "n": 1234567, "ptar": None},
        {"model": "b|c", "score": 0.25, "n": 3},
    ]
    table = markdown_table(rows, ["model", "score", "n", "ptar"])
    lines = table.splitlines()
    assert len(lines) == 4
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    # only the header and alignment rows are split here: the escaped pipe in "b\\|c" would fool it
    assert "0.5000 ± 0.0100" in lines[2] and "1,234,567" in lines[2]
    assert lines[2].rstrip(" |").endswith("–")  # null ptar
    assert lines[3].rstrip(" |").endswith("–")  # missing ptar
    assert "b\\|c" in lines[3]
    assert "0.2500" in lines[3] and "±" not in lines[3]
    assert cells[1][0].startswith(":") and cells[1][1].endswith(":") and cells[1][2].endswith(":")


def test_markdown_table_digits_tiny_values_and_bools():
    table = markdown_table([{"x": 3e-7, "y": 1.23456, "ok": True, "z": float("nan")}], ["x", "y", "ok", "z"], digits=2)
    row = table.splitlines()[2]
    assert "3.0e-07" in row and "1.23" in row and "1.235" not in row and "yes" in row and "nan" in row


def test_markdown_table_columns_are_right_aligned_in_source():
    rows = [{"v": 1.0}, {"v": 123.5}, {"v": None}]
    lines = markdown_table(rows, ["v"]).splitlines()
    widths = {len(line) for line in lines}
    assert len(widths) == 1
    assert lines[2].endswith("1.0000 |") and lines[3].endswith("123.5000 |") and lines[4].endswith("– |")


# --------------------------------------------------------------------------- plots


def test_plot_curves_writes_png_and_skips_absent_keys(tmp_path):
    series = {"teacher": _curve(5, kd=False, scale=0.8), "student": _curve(5, kd=True, scale=0.7)}
    out = plot_curves(series, ["valid_ptar", "train_kd", "not_logged"], tmp_path / "c.png", title="curves")
    assert out == tmp_path / "c.png" and _is_png(out)
    assert _no_temp_files(tmp_path)


def test_plot_curves_nothing_to_plot_returns_none(tmp_path):
    series = {"a": [{"epoch": 1, "loss": None}, {"epoch": 2, "loss": "n/a"}], "b": []}
    assert plot_curves(series, ["loss", "absent"], tmp_path / "c.png") is None
    assert not (tmp_path / "c.png").exists()
    assert plot_curves({}, ["loss"], tmp_path / "c.png") is None


def test_plot_curves_falls_back_to_position_without_x(tmp_path):
    series = {"online": [{"reward": 0.1}, {"reward": 0.3}, {"reward": 0.4}]}
    assert _is_png(plot_curves(series, ["reward"], tmp_path / "sub" / "c.png"))


def test_plot_bars_with_error_bars_and_nulls(tmp_path):
    rows = ROWS + [{"model": "n/a", "normalized_utility": None}]
    out = plot_bars(rows, "normalized_utility", tmp_path / "b.png")
    assert _is_png(out) and _no_temp_files(tmp_path)
    assert plot_bars(rows, "exact_page", tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_failed_plot_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    target = tmp_path / "b.png"
    target.write_bytes(b"old")

    def boom(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        plot_bars(ROWS, "normalized_utility", target)
    assert target.read_bytes() == b"old"
    assert _no_temp_files(tmp_path)


# --------------------------------------------------------------------------- experiment


def test_find_curve_keys_matches_by_suffix_in_group_order():
    curves = {"s": [{"epoch": 1, "train_kd": 1.0, "valid_score": 0.2, "valid_collapse_rate": 0.1,
                     "valid_ptar": 0.5, "train_loss": 1.0, "seconds": 1.0}]}
    assert find_curve_keys(curves) == ["valid_ptar", "valid_collapse_rate", "train_kd", "valid_score"]


def test_write_experiment_report(tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[2]["certified_ptar"] = float("nan")
    curves = {"teacher": _curve(4, kd=False, scale=0.8), "student": _curve(4, kd=True, scale=0.7)}
    out = tmp_path / "exp"
    cmd = "dualrerank experiment --config configs/synthetic.yaml --out exp"
    summary = write_experiment_report(out, rows, curves, title="Synthetic", commands=[cmd], notes=["three seeds"])

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    assert [r["model"] for r in on_disk["rows"]] == ["random", "teacher", "student"]
    assert on_disk["rows"][1]["normalized_utility_std"] == 0.02 and on_disk["rows"][0]["ptar"] is None
    assert on_disk["rows"][2]["certified_ptar"] is None and len(on_disk["non_finite"]) == 1
    assert set(summary["plots"]) == {"bars_normalized_utility.png", "bars_ndcg_at_10.png", "curves.png"}
    for name in summary["plots"]:
        assert _is_png(out / name)

    md = (out / "report.md").read_text()
    assert md.startswith("# Synthetic\n") and cmd in md and "three seeds" in md
    assert "0.7100 ± 0.0200" in md and "0.6500 ± 0.0100" in md and "1,234,567" in md
    for name in summary["plots"]:
        assert f"({name})" in md
    header = next(line for line in md.splitlines() if line.startswith("| model"))
    assert "exact_page" not in header  # a column null/missing everywhere is dropped
    assert "normalized_utility_std" not in header
    # The columns are explained with the meanings of the one list of logged names.
    glossary = md[md.index("Columns:"):]
    for column in ("normalized_utility", "ndcg@10", "ptar", "latency_ms_p50", "params"):
        assert f"- `{column}`: {FIGURES[column]}\n" in glossary, column
    assert _no_temp_files(out)


def test_write_experiment_report_without_curves_or_bars(tmp_path):
    rows = [{"model": "a", "utility": 1.5}]
    summary = write_experiment_report(tmp_path, rows, {}, title="T", commands=[])
    assert summary["plots"] == []
    assert "| a " in (tmp_path / "report.md").read_text()


def test_write_experiment_report_rejects_unserialisable_value(tmp_path):
    with pytest.raises(DataError, match="rows\\[0\\].*object"):
        write_experiment_report(tmp_path, [{"model": "a", "weird": object()}], {}, title="T", commands=[])
    assert not (tmp_path / "summary.json").exists()


# --------------------------------------------------------------------------- single run


def _run_dir(tmp_path: Path, records: list[dict]) -> Path:
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "config.yaml").write_text("model: student\nseed: 3\n")
    return run


def test_write_run_report(tmp_path):
    records = _curve(6, kd=True, scale=0.7)
    records[-1]["best"] = False
    resumed = dict(records[-1], train_loss=99.0)  # epoch 6 re-run after a resume
    run = _run_dir(tmp_path, records + [resumed])
    path = write_run_report(run, "student run")
    assert path == run / "report.md"
    md = path.read_text()
    assert md.startswith("# student run\n")
    assert "best epoch: 5" in md and "epochs recorded: 6" in md and "seed: 3" in md
    assert "99.0000" in md and "(checkpoint/)" in md and "(curves.png)" in md
    assert _is_png(run / "curves.png") and _no_temp_files(run)
    glossary = md[md.index("Columns:"):]
    assert f"- `train_loss`: {LOGGED_KEYS['train_loss']}\n" in glossary
    assert f"- `valid_ptar`: {describe_key('valid_ptar')}\n" in glossary
    assert "- `train_kd`: not in the list of logged names" in glossary  # undocumented keys show up


def test_write_run_report_errors(tmp_path):
    with pytest.raises(DataError, match="run directory not found"):
        write_run_report(tmp_path / "nope", "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="metrics.jsonl: metrics file not found"):
        write_run_report(tmp_path / "empty", "x")
    run = _run_dir(tmp_path, _curve(2, kd=False, scale=1.0))
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"epoch": 3, "trai')
    with pytest.raises(DataError, match=r"metrics\.jsonl:3:"):
        write_run_report(run, "x")
    assert not (run / "report.md").exists()


def test_write_run_report_with_no_epochs(tmp_path):
    run = _run_dir(tmp_path, [])
    md = write_run_report(run, "fresh").read_text()
    assert "No epochs recorded" in md and not (run / "curves.png").exists()


def test_report_columns_are_logged_names():
    for name in EXPERIMENT_COLUMNS[1:] + BAR_METRICS:
        assert name in FIGURES, name
    assert EXPERIMENT_COLUMNS[0] == "model" and "model" in LOGGED_KEYS
    assert key_glossary(["ptar", "valid_gauc", "ptar_std", "nonsense", "ptar"]) == [
        f"- `ptar`: {FIGURES['ptar']}",
        f"- `valid_gauc`: {describe_key('valid_gauc')}",
        f"- `ptar_std`: {describe_key('ptar_std')}",
        "- `nonsense`: not in the list of logged names (docs/metrics.md)",
    ]
