"""`dualrerank data inspect`, dataset statistics, and what the synthetic source accepts as a path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dualrerank.cli import main
from dualrerank.data.synthetic import (
    generate_logs,
    load_logs,
    load_synthetic,
    load_world,
    load_world_config,
    save_logs,
    simulate_logs,
)
from dualrerank.data.stats import dataset_stats, format_stats, value_counts
from dualrerank.errors import ConfigError, DataError
from dualrerank.schema import RerankBatch
from dualrerank.sim import World


SVM = "2 qid:a 1:1 2:3\n0 qid:a 1:2\n1 qid:a 2:1\n0 qid:b 1:1\n3 qid:b 1:5\n"
KEYS = {"source", "path", "num_lists", "num_documents", "items_per_list", "padded_length", "feature_width",
        "context_width", "label_distribution", "has_item_ids", "has_upstream_score", "logged_pages", "notes"}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def svm_file(tmp_path) -> Path:
    p = tmp_path / "train.txt"
    p.write_text(SVM)
    return p


def test_inspect_letor_json(capsys, svm_file):
    code, out, _ = run(capsys, "data", "inspect", "--source", "letor", "--path", str(svm_file), "--json")
    assert code == 0
    s = json.loads(out)
    assert set(s) == KEYS
    assert (s["num_lists"], s["num_documents"], s["feature_width"]) == (2, 5, 2)
    assert s["items_per_list"] == {"min": 2, "median": 2.5, "mean": 2.5, "max": 3}
    assert s["label_distribution"] == {"relevance": {"0": 2, "1": 1, "2": 1, "3": 1}}
    assert s["logged_pages"] is None
    assert any("no known upstream" in n for n in s["notes"])


def test_inspect_table_and_config(capsys, svm_file, tmp_path):
    cfg = tmp_path / "data.yaml"
    cfg.write_text(f"source: letor\npath: {svm_file}\nletor:\n  upstream_feature: 1\n  max_candidates: 2\n")
    code, out, _ = run(capsys, "data", "inspect", "--config", str(cfg))
    assert code == 0
    assert "lists" in out and "documents" in out and "label relevance" in out
    assert "min 2, median 2, mean 2.0, max 2" in out and "note:" not in out
    cfg.write_text("source: letor\nletor:\n  upstream: 1\n")
    code, _, err = run(capsys, "data", "inspect", "--config", str(cfg), "--path", str(svm_file))
    assert code == 2 and "unknown key" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, message", [
    (["--source", "letor"], "--path is required"),
    (["--source", "mind"], "--path is required"),
    (["--source", "letor", "--path", "/definitely/not/here"], "no such file or folder"),
    (["--source", "mind", "--path", "/definitely/not/here"], "no such file or folder"),
    (["--source", "mind", "--path", "x", "--fold", "1"], "--fold applies to --source letor only"),
])
def test_inspect_user_errors_exit_2(capsys, argv, message):
    code, out, err = run(capsys, "data", "inspect", *argv)
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_malformed_file_exit_2_names_line(capsys, tmp_path):
    p = tmp_path / "bad.txt"
    p.write_text("1 qid:1 1:1\n1 qid:1 1:zz\n")
    code, _, err = run(capsys, "data", "inspect", "--source", "letor", "--path", str(p))
    assert code == 2 and f"{p}:2:" in err


def test_inspect_mind_json(capsys, tmp_path):
    (tmp_path / "behaviors.tsv").write_text("1\tU1\t11/11/2019 9:05:00 AM\tN1\tN3-1 N4-0 N1-0\n"
                                            "2\tU2\t11/12/2019 3:30:00 PM\t\tN3-0 N5-1\n")
    code, out, _ = run(capsys, "data", "inspect", "--source", "mind", "--path", str(tmp_path), "--json")
    assert code == 0
    s = json.loads(out)
    assert (s["num_lists"], s["num_documents"]) == (2, 5)
    assert s["label_distribution"] == {"click": {"0": 3, "1": 2}}
    assert s["logged_pages"]["feedback"] == {"click": {"0": 3, "1": 2}}
    assert s["logged_pages"]["positions_per_page"] == {"min": 2, "median": 2.5, "mean": 2.5, "max": 3}
    assert any("no news.tsv" in n for n in s["notes"])


def test_inspect_synthetic(capsys):
    code, out, _ = run(capsys, "data", "inspect", "--source", "synthetic", "--seed", "1", "--num-requests", "8", "--json")
    assert code == 0
    assert json.loads(out)["num_lists"] == 8


@pytest.fixture(scope="module")
def logs_folder(tmp_path_factory) -> Path:
    """30 logged requests with pages of 4, as `dualrerank simulate --out` writes them."""
    out = tmp_path_factory.mktemp("logs") / "run"
    save_logs(simulate_logs(World(), 30, 3, 4), out)
    return out


def _one_line_error(capsys, *argv: str) -> str:
    code, out, err = run(capsys, "data", "inspect", *argv)
    assert code == 2 and out == "" and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_synthetic_path_that_is_not_a_world_says_what_it_is(capsys, svm_file, tmp_path):
    expected = "a world YAML"
    err = _one_line_error(capsys, "--source", "synthetic", "--path", str(svm_file))
    assert f"{svm_file} is an SVMlight/LETOR ranking file (line 1" in err and "--source letor" in err
    assert expected in err and "simulate --out" in err and "not valid YAML" not in err
    tsv = tmp_path / "behaviors.tsv"
    tsv.write_text("1\tU1\t11/11/2019 9:05:00 AM\tN1\tN3-1 N4-0\n")
    err = _one_line_error(capsys, "--source", "synthetic", "--path", str(tsv))
    assert "looks like a MIND behaviors.tsv" in err and "--source mind" in err and expected in err
    err = _one_line_error(capsys, "--source", "synthetic", "--path", str(tmp_path))
    assert f"{tmp_path} is a folder without meta.json" in err and "MIND impressions" in err and expected in err
    letor_dir = tmp_path / "letor"
    letor_dir.mkdir()
    (letor_dir / "S1.txt").write_text(SVM)
    err = _one_line_error(capsys, "--source", "synthetic", "--path", str(letor_dir))
    assert "SVMlight ranking files" in err and "--source letor" in err
    for text, what in (("seed: [1\n", "not valid YAML at line 2"), ("- 1\n- 2\n", "its top level is a list")):
        junk = tmp_path / "junk.yaml"
        junk.write_text(text)
        err = _one_line_error(capsys, "--source", "synthetic", "--path", str(junk))
        assert f"{junk} is not a world YAML ({what}" in err and expected in err
    # a world YAML with a typo still gets the config loader's own message
    junk.write_text("response:\n  redundnacy: 1\n")
    assert "unknown key" in _one_line_error(capsys, "--source", "synthetic", "--path", str(junk))


def test_synthetic_logs_folder_honours_num_requests(capsys, logs_folder):
    def lists(*extra: str) -> int:
        code, out, _ = run(capsys, "data", "inspect", "--source", "synthetic", "--path", str(logs_folder), "--json", *extra)
        assert code == 0
        return json.loads(out)["num_lists"]

    assert lists() == 30  # no count asked for: all logged requests
    assert lists("--num-requests", "12") == 12
    err = _one_line_error(capsys, "--source", "synthetic", "--path", str(logs_folder), "--num-requests", "31")
    assert "holds 30 logged requests but num_requests=31" in err and "simulate --requests 31" in err


def test_load_logs_takes_the_first_requests_or_refuses(logs_folder):
    full = load_logs(logs_folder)
    first = load_logs(logs_folder, 10, page_length=4)
    assert first.batch_size == 10 and torch.equal(first.candidates, full.candidates[:10])
    assert torch.equal(first.logged_feedback, full.logged_feedback[:10])
    assert torch.equal(load_synthetic(logs_folder, num_requests=10).candidates, first.candidates)
    with pytest.raises(DataError, match=r"holds 30 logged requests but data\.train_requests=8,000"):
        load_logs(logs_folder, 8000, option="data.train_requests")
    with pytest.raises(DataError, match="have 4 positions but page_length=10"):
        load_logs(logs_folder, 10, page_length=10)
    with pytest.raises(ConfigError, match="num_requests: must be a positive integer"):
        load_logs(logs_folder, 0)


def test_data_without_action_prints_help(capsys):
    code, out, _ = run(capsys, "data")
    assert code == 2 and "inspect" in out


def test_inspect_mq2008(capsys, require_data):
    MQ2008 = require_data("letor/MQ2008/S1.txt").parent
    code, out, _ = run(capsys, "data", "inspect", "--source", "letor", "--path", str(MQ2008), "--json")
    assert code == 0
    s = json.loads(out)
    assert (s["num_lists"], s["num_documents"], s["feature_width"]) == (784, 15211, 46)
    assert s["items_per_list"]["min"] == 5 and s["items_per_list"]["median"] == 8 and s["items_per_list"]["max"] == 121
    assert s["label_distribution"]["relevance"] == {"0": 12279, "1": 2001, "2": 931}
    code, out, _ = run(capsys, "data", "inspect", "--source", "letor", "--path", str(MQ2008), "--fold", "1", "--json")
    splits = json.loads(out)["splits"]
    assert sum(v["num_lists"] for v in splits.values()) == 784
    assert sum(v["num_documents"] for v in splits.values()) == 15211


# ---------------------------------------------------------------------------- stats
def test_stats_ignore_padding_values():
    batch = RerankBatch(
        candidates=torch.zeros(2, 3, 1),
        candidate_mask=torch.tensor([[True, True, False], [True, False, False]]),
        context=torch.zeros(2, 1),
        # 7.0 sits in padding only and must not be counted
        labels=torch.tensor([[[1.0, 0.5], [0.0, 0.5], [7.0, 7.0]], [[2.0, 9.0], [7.0, 7.0], [7.0, 7.0]]]),
        label_names=("grade", "watch"),
    )
    s = dataset_stats(batch)
    assert s["num_documents"] == 3 and s["items_per_list"] == {"min": 1, "median": 1.5, "mean": 1.5, "max": 2}
    assert s["label_distribution"] == {"grade": {"0": 1, "1": 1, "2": 1}, "watch": {"0.5": 2, "9": 1}}
    assert not s["has_item_ids"] and "label watch" in format_stats(s)


def test_value_counts_summarises_continuous_values():
    x = torch.arange(50, dtype=torch.float32) / 10
    v = value_counts(x, max_distinct=20)
    assert v == {"distinct": 50, "min": 0.0, "mean": pytest.approx(2.45), "max": pytest.approx(4.9)}
    assert "50 distinct values" in format_stats({**dataset_stats(RerankBatch(
        candidates=torch.zeros(1, 50, 1), candidate_mask=torch.ones(1, 50, dtype=torch.bool),
        context=torch.zeros(1, 1), labels=x.view(1, 50, 1)))})


def test_world_config_reader_says_what_a_file_is(svm_file):
    with pytest.raises(ConfigError, match=r"is an SVMlight/LETOR ranking file \(line 1"):
        load_world_config(svm_file)
    with pytest.raises(ConfigError, match=r"is an SVMlight/LETOR ranking file \(line 1"):
        generate_logs(svm_file, 5, 0)
    assert load_world_config(Path(__file__).resolve().parents[1] / "configs" / "control.yaml").response.redundancy == 0


def test_logs_from_before_packaged_durations_say_how_to_rebuild_their_world(logs_folder, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(logs_folder, old)
    meta = json.loads((old / "meta.json").read_text())
    assert meta["duration_source"] == "packaged:kuairand_duration_quantiles.json"
    meta["duration_source"] = "kuairand:video_features_basic_pure.csv"  # what a checkout beside the data wrote
    (old / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"world\.yaml now gives 'packaged:.*set catalogue\.durations there to kuairand:PATH"):
        load_world(old)
    assert load_world(logs_folder).catalogue.duration_source == "packaged:kuairand_duration_quantiles.json"
