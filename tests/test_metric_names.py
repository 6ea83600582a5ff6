"""One list of logged names (`metrics.LOGGED_KEYS`) for the code, the report and the docs.

Tiny real runs of every command that logs (train, distill, evaluate, experiment offline) on
a small simulated world and on a small MIND-format folder collect every key they write
into metrics.jsonl, eval.json, `evaluate --json` and summary.json. Then:
- every key written is documented (a literal name, or `valid_<figure>` / `<figure>_std`);
- every documented name is written by some run, and every figure has a real value;
- docs/metrics.md shows exactly the list, and the other docs name only listed keys.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml

from dualrerank.cli import main
from dualrerank.metrics import (
    AB_KEYS,
    AGREEMENT_FIGURES,
    DERIVED_KEYS,
    EPOCH_KEYS,
    FIGURES,
    LOGGED_KEYS,
    ONLINE_KEYS,
    OPE_KEYS,
    RUN_FIELDS,
    SUMMARY_FIELDS,
    describe_key,
)

ROOT = Path(__file__).resolve().parents[1]
TINY_ENCODER = {"d_model": 8, "n_heads": 2, "n_layers": 1, "dropout": 0.0}
TINY_MODEL = {"encoder": TINY_ENCODER, "n_layers": 1, "n_heads": 2}
# Keys whose values are free-form mappings (an ExperimentConfig, phase -> seconds, row ->
# figure): documented as a whole, their inner keys are not logged names.
OPAQUE = {"config", "phase_seconds", "best_tree.others"}


def _write_mind(folder: Path, impressions: int = 90, seed: int = 0) -> Path:
    """A MIND-format folder (behaviors.tsv, news.tsv) whose clicks follow the category, so
    both classes occur in every split."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    categories = ["sports", "news", "finance", "travel"]
    news = [f"N{i}\t{categories[i % 4]}\tsub{i % 7}\tT\tA\tu\t[]\t[]" for i in range(1, 41)]
    (folder / "news.tsv").write_text("\n".join(news) + "\n")
    lines = []
    for imp in range(1, impressions + 1):
        items = rng.sample(range(1, 41), rng.randint(5, 8))
        shown = " ".join(f"N{i}-{int(i % 4 == imp % 4 or rng.random() < 0.15)}" for i in items)
        history = " ".join(f"N{i}" for i in rng.sample(range(1, 41), 3))
        lines.append(f"{imp}\tU{imp % 9}\t11/{11 + imp % 3}/2019 {1 + imp % 12}:05:00 PM\t{history}\t{shown}")
    (folder / "behaviors.tsv").write_text("\n".join(lines) + "\n")
    return folder


def _yaml(path: Path, data: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _run(argv: list[str]) -> dict[str, Any] | None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(argv) == 0, argv
    return json.loads(out.getvalue()) if "--json" in argv else None


class Collected:
    """Every key a file or command output held, with where it was seen and its values."""

    def __init__(self) -> None:
        self.where: dict[str, set[str]] = {}
        self.values: dict[str, list[Any]] = {}
        self.evals: dict[str, dict[str, Any]] = {}  # run directory -> its eval.json

    def add(self, record: dict[str, Any], where: str, prefix: str = "") -> None:
        for key, value in record.items():
            name = prefix + key
            self.where.setdefault(name, set()).add(where)
            self.values.setdefault(name, []).append(value)

    def add_run_dirs(self, root: Path) -> None:
        for path in root.rglob("metrics.jsonl"):
            for line in path.read_text().splitlines():
                self.add(json.loads(line), "metrics.jsonl")
        for path in root.rglob("eval.json"):
            self.evals[str(path.parent.relative_to(root))] = json.loads(path.read_text())
            self.add(self.evals[str(path.parent.relative_to(root))], "eval.json")

    def add_summary(self, summary: dict[str, Any]) -> None:
        self.add(summary, "summary.json")
        for row in summary["rows"]:
            self.add(row, "summary.json rows")
        for records in summary["per_seed"].values():
            for record in records:
                self.add(record, "summary.json per_seed")
        for top, value in summary.items():
            if isinstance(value, dict) and top not in OPAQUE and top != "per_seed":
                self.add(value, "summary.json", prefix=f"{top}.")
        for item in summary["latency"]["per_seed"]:
            self.add(item, "summary.json", prefix="latency.per_seed[].")


@pytest.fixture(scope="module")
def collected(tmp_path_factory) -> Collected:
    # Drawing PNGs is most of a tiny run's time and writes no key (tests/test_report.py
    # checks the plots): skip it here.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("dualrerank.report.plot_curves", lambda *args, **kwargs: None)
        mp.setattr("dualrerank.report.plot_bars", lambda *args, **kwargs: None)
        return _collect(tmp_path_factory.mktemp("names"))


def _collect(tmp: Path) -> Collected:
    keys = Collected()

    # The simulated world: the experiment trains evaluator_beam, teacher (evaluator targets),
    # dnn, lambdamart, nar_direct and student_skd (with the supervised term), so its run
    # directories hold every epoch key of train and distill.
    experiment = {
        "data": {"train_requests": 64, "valid_requests": 24, "test_requests": 24, "page_length": 4},
        "seeds": [0],
        "models": ["dnn", "lambdamart", "nar_direct", "student_skd"],
        "optim": {"epochs": 1, "batch_size": 64},
        "encoder": TINY_ENCODER,
        "decoder": {"n_layers": 1, "n_heads": 2},
        "objective": {"bpr_pairs": 2, "evaluator_beam": 2},
        "distill": {"supervised_weight": 0.5},
        "overrides": {
            "dnn": {"model_config": {"hidden": [8]}},
            "lambdamart": {"model_config": {"n_estimators": 3, "num_threads": 1}},
            "evaluator_beam": {"model_config": {"n_layers": 1, "beam_width": 2}},
        },
        "latency_requests": 2,
    }
    out = tmp / "synthetic"
    summary = _run(["experiment", "offline", "--config", _yaml(tmp / "exp.yaml", experiment), "--out", str(out),
                    "--quiet", "--json"])
    keys.add_summary(summary)
    keys.add_run_dirs(out / "runs")

    # MIND-format clicks (no world): NDCG on clicks, AUC of a score model and of the
    # evaluator, the teacher's NDCG beside the distilled student, and `evaluate --json`.
    mind = _write_mind(tmp / "mind")
    data = {"source": "mind", "path": str(mind), "page_length": 4, "valid_share": 0.2, "test_share": 0.2}
    train = {"data": data, "optim": {"epochs": 1, "batch_size": 64}, "objective": {"target": "logged", "bpr_pairs": 2}}
    runs = tmp / "mind_runs"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny news file leaves some items without categories
        for model, model_config in (
            ("dnn", {"hidden": [8]}),
            ("evaluator", {"encoder": TINY_ENCODER, "n_layers": 1, "long_view_name": "click", "value_weights": [1.0, 0.0]}),
            ("teacher", TINY_MODEL),
        ):
            cfg = _yaml(tmp / f"{model}.yaml", {**train, "model_config": model_config})
            _run(["train", "--model", model, "--config", cfg, "--out", str(runs / model)])
        cfg = _yaml(tmp / "distill.yaml", {"data": data, "optim": {"epochs": 1, "batch_size": 64}, "model_config": TINY_MODEL})
        _run(["distill", "--teacher", str(runs / "teacher"), "--config", cfg, "--out", str(runs / "student")])
        keys.add(_run(["evaluate", "--checkpoint", str(runs / "dnn"), "--json"]), "evaluate --json")
    keys.add_run_dirs(runs)
    return keys


def _documented(key: str) -> bool:
    if key.startswith("latency.per_seed[]."):
        inner = key[len("latency.per_seed[]."):]
        return inner == "seed" or f"latency.{inner}" in LOGGED_KEYS
    return describe_key(key) is not None


def test_every_logged_key_is_documented(collected):
    missing = sorted(f"{key} (in {', '.join(sorted(collected.where[key]))})"
                     for key in collected.where if not _documented(key) and not key.startswith(tuple(f"{o}." for o in OPAQUE)))
    assert not missing, "logged but not in metrics.LOGGED_KEYS / docs/metrics.md: " + "; ".join(missing)


def test_every_documented_name_is_logged(collected):
    never = sorted(set(LOGGED_KEYS) - set(collected.where))
    assert not never, f"documented but no command wrote them: {never}"
    # Each family of derived keys is in use.
    assert any(k.startswith("valid_") and k[len("valid_"):] in FIGURES for k in collected.where)
    assert any(k.endswith("_std") and k[: -len("_std")] in FIGURES for k in collected.where)


def test_every_figure_has_a_real_value_somewhere(collected):
    def finite(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    empty = sorted(name for name in FIGURES if not any(finite(v) for v in collected.values.get(name, [])))
    assert not empty, f"figures never computed (always null or absent): {empty}"
    # On real clicks (MIND format), AUC and GAUC are logged for a score model and for the
    # evaluator, and per epoch for the score model; a list generator has none.
    for run in ("dnn", "evaluator"):
        assert finite(collected.evals[run]["auc"]) and finite(collected.evals[run]["gauc"]), run
    assert collected.evals["teacher"]["auc"] is None
    assert finite(collected.evals["student"]["teacher_ndcg@10"])


def test_agreement_figures_and_code_constants_are_listed_names():
    from dualrerank.train import experiment

    assert set(AGREEMENT_FIGURES) <= set(FIGURES)
    for name in (*experiment.FIGURES, *getattr(experiment, "_AGREEMENT_KEYS", ()), *experiment.CURVE_PLOTS):
        assert describe_key(name) is not None, name
    # One name per meaning: no literal name is also a derived one.
    for name in LOGGED_KEYS:
        if name.startswith("valid_"):
            assert name[len("valid_"):] not in FIGURES, name
        if name.endswith("_std"):
            assert name[: -len("_std")] not in FIGURES, name
    groups = (FIGURES, EPOCH_KEYS, RUN_FIELDS, SUMMARY_FIELDS)
    assert sum(len(g) for g in groups) == len(LOGGED_KEYS), "a name is in two groups"
    for meaning in LOGGED_KEYS.values():
        assert meaning and "|" not in meaning and "\n" not in meaning  # one table cell, one line


def _doc_tables(text: str, heading: str) -> dict[str, dict[str, str]]:
    """`### title` -> {name: meaning} for the two-column tables under `## heading`."""
    section = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert section, f"docs/metrics.md has no '## {heading}' section"
    tables: dict[str, dict[str, str]] = {}
    title = None
    for line in section.group(1).splitlines():
        if line.startswith("### "):
            title = line[4:].strip()
            tables[title] = {}
        m = re.match(r"^\| `([^`]+)` \| (.*) \|$", line)
        if m and title is not None:
            assert m.group(1) not in tables[title], f"{m.group(1)} twice under {title}"
            tables[title][m.group(1)] = m.group(2)
    return tables


def test_docs_show_exactly_the_list():
    tables = _doc_tables((ROOT / "docs" / "metrics.md").read_text(), "Logged names")
    expected = {
        "Figures": FIGURES, "Per epoch (metrics.jsonl)": EPOCH_KEYS, "Run fields (eval.json, evaluate --json)": RUN_FIELDS,
        "Experiment summary (summary.json)": SUMMARY_FIELDS, "Derived names": DERIVED_KEYS,
        "Online steps (dualrerank online, metrics.jsonl)": ONLINE_KEYS,
        "A/B test (dualrerank ab, summary.json)": AB_KEYS,
        "Off-policy evaluation (dualrerank ope, summary.json)": OPE_KEYS,
    }
    assert list(tables) == list(expected)
    for title, names in expected.items():
        assert tables[title] == names, f"docs/metrics.md '{title}' differs from metrics.py"


def test_other_docs_name_only_listed_keys():
    # The first column of every table under a heading about logged keys or report columns.
    checked = 0
    for doc in sorted((ROOT / "docs").glob("*.md")):
        if doc.name == "metrics.md":
            continue
        text = doc.read_text()
        for section in re.findall(r"^##+ [^\n]*(?:Logged|Columns)[^\n]*\n(.*?)(?=^##+ |\Z)", text, re.S | re.M):
            for cell in re.findall(r"^\| (`[^|]+`) \|", section, re.M):
                for key in re.findall(r"`([^`]+)`", cell):
                    checked += 1
                    assert describe_key(key) is not None, f"docs/{doc.name} names {key}, which is not a logged name"
    assert checked > 20, "no logged-key tables found in docs/: has their layout changed?"
    for doc in ("metrics.md", "distillation.md"):
        text = (ROOT / "docs" / doc).read_text()
        for stale in ("exact_match", "`row_js`", "`row_entropy`"):
            assert stale not in text, f"docs/{doc} still uses {stale}"
