"""Dataset statistics of a `RerankBatch`: what `dualrerank data inspect` prints.

`dataset_stats` returns a JSON-ready dict; `format_stats` renders it as a plain table.
Counts only ever look at valid candidates (and valid logged positions): padding is never
counted, whatever value it holds.
"""

from __future__ import annotations

from typing import Any

import torch

from dualrerank.schema import RerankBatch

__all__ = ["dataset_stats", "format_stats", "value_counts"]


def value_counts(values: torch.Tensor, max_distinct: int = 20) -> dict[str, Any]:
    """Distribution of a 1-D tensor: `{value: count}` for at most `max_distinct` distinct
    values (graded labels, clicks), else a summary `{"distinct", "min", "mean", "max"}`
    (continuous labels such as watch time). Keys are strings, integral values without ".0".
    """
    if values.numel() == 0:
        return {}
    uniq, counts = torch.unique(values, return_counts=True)
    if len(uniq) > max_distinct:
        v = values.double()
        return {"distinct": int(len(uniq)), "min": float(v.min()), "mean": float(v.mean()), "max": float(v.max())}
    return {_key(float(u)): int(c) for u, c in zip(uniq.tolist(), counts.tolist(), strict=True)}


def _key(v: float) -> str:
    return str(int(v)) if v.is_integer() else repr(v)


def dataset_stats(batch: RerankBatch, max_distinct: int = 20) -> dict[str, Any]:
    """Summary of a batch.

    Returns keys: num_lists, num_documents, items_per_list {min, median, mean, max},
    padded_length, feature_width, context_width, label_distribution {label name:
    value_counts}, has_item_ids, has_upstream_score, logged_pages (None, or {num_pages,
    positions per page {min, median, max}, feedback {name: value_counts}}).
    """
    valid = batch.candidate_mask
    per_list = valid.sum(dim=1)
    stats: dict[str, Any] = {
        "num_lists": batch.batch_size,
        "num_documents": int(per_list.sum()),
        "items_per_list": _spread(per_list),
        "padded_length": batch.num_candidates,
        "feature_width": batch.candidate_dim,
        "context_width": batch.context_dim,
        "label_distribution": {},
        "has_item_ids": batch.item_ids is not None,
        "has_upstream_score": batch.upstream_score is not None,
        "logged_pages": None,
    }
    if batch.labels is not None:
        m = batch.labels.shape[2]
        names = batch.label_names or tuple(f"label_{j}" for j in range(m))
        stats["label_distribution"] = {names[j]: value_counts(batch.labels[..., j][valid], max_distinct) for j in range(m)}
    if batch.logged_page is not None:
        pmask = (
            batch.logged_page_mask if batch.logged_page_mask is not None else torch.ones_like(batch.logged_page, dtype=torch.bool)
        )
        pages: dict[str, Any] = {"num_pages": batch.batch_size, "positions_per_page": _spread(pmask.sum(dim=1))}
        if batch.logged_feedback is not None:
            f = batch.logged_feedback.shape[2]
            names = batch.feedback_names or tuple(f"feedback_{j}" for j in range(f))
            pages["feedback"] = {names[j]: value_counts(batch.logged_feedback[..., j][pmask], max_distinct) for j in range(f)}
        stats["logged_pages"] = pages
    return stats


def _spread(x: torch.Tensor) -> dict[str, float | int]:
    x = x.double()
    med = float(x.median()) if x.numel() % 2 else float(x.sort().values[x.numel() // 2 - 1 : x.numel() // 2 + 1].mean())
    return {"min": int(x.min()), "median": med, "mean": round(float(x.mean()), 3), "max": int(x.max())}


def format_stats(stats: dict[str, Any], title: str = "") -> str:
    """Human-readable table of `dataset_stats` output (plus optional "source", "path",
    "notes" keys added by the caller)."""
    rows: list[tuple[str, str]] = []
    for key in ("source", "path"):
        if stats.get(key) is not None:
            rows.append((key, str(stats[key])))
    ipl = stats["items_per_list"]
    rows += [
        ("lists", f"{stats['num_lists']:,}"),
        ("documents", f"{stats['num_documents']:,}"),
        ("items per list", f"min {ipl['min']}, median {_num(ipl['median'])}, mean {ipl['mean']}, max {ipl['max']}"),
        ("feature width", str(stats["feature_width"])),
        ("context width", str(stats["context_width"])),
        ("item ids", "yes" if stats["has_item_ids"] else "no"),
        ("upstream score", "yes" if stats["has_upstream_score"] else "no"),
    ]
    for name, dist in stats["label_distribution"].items():
        rows.append((f"label {name}", _dist(dist)))
    pages = stats.get("logged_pages")
    if pages:
        ppp = pages["positions_per_page"]
        rows.append(
            (
                "logged pages",
                f"{pages['num_pages']:,} (positions min {ppp['min']}, median {_num(ppp['median'])}, max {ppp['max']})",
            )
        )
        for name, dist in pages.get("feedback", {}).items():
            rows.append((f"feedback {name}", _dist(dist)))
    width = max(len(k) for k, _ in rows)
    lines = [title] if title else []
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    for note in stats.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _dist(dist: dict[str, Any]) -> str:
    if "distinct" in dist:
        return f"{dist['distinct']} distinct values, min {dist['min']:g}, mean {dist['mean']:g}, max {dist['max']:g}"
    total = sum(dist.values()) or 1
    return ", ".join(f"{k}: {c:,} ({100 * c / total:.1f}%)" for k, c in dist.items())
