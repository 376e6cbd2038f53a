"""Aggregate recorded attention into the `omnikv analyze` report (a JSON-able dict)."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from omnikv.analysis.capture import AttentionRecord
from omnikv.analysis.coverage import coverage_decay, coverage_matrices, coverage_matrix, mass_distribution, topk_jaccard
from omnikv.errors import InputError


def variant_key(k: int | float, head_reduce: str, sink_recent: bool) -> str:
    return f"k={k}/{head_reduce}/{'sink+recent' if sink_recent else 'topk-only'}"


def pooled_coverage(
    records: Iterable[AttentionRecord],
    k: int | float,
    head_reduce: str = "max",
    sink: int = 0,
    recent: int = 0,
    selector: str = "last",
) -> torch.Tensor:
    """Coverage matrix (L, L) over several prompts, each decode step weighted equally."""
    total, steps = None, 0
    for rec in records:
        cov = coverage_matrix(rec.scores(selector), rec.probs(), k, head_reduce, rec.num_kv_heads, sink, recent)
        s = rec.logits.shape[0]
        total = cov * s if total is None else total + cov * s
        steps += s
    if total is None:
        raise InputError("no recorded prompts to analyse")
    return total / steps


def build_report(
    records: list[AttentionRecord],
    ks: list[int | float],
    head_reduces: list[str],
    sink: int,
    recent: int,
    selector: str = "last",
) -> dict[str, Any]:
    """Coverage (with and without sink/recent, per k and head reduction), its decay with layer
    distance, top-k Jaccard across decode steps, and the attention mass distribution."""
    if not records:
        raise InputError("no recorded prompts to analyse")
    acc: dict[str, torch.Tensor] = {}
    jac: dict[str, torch.Tensor] = {}
    mass: dict[str, torch.Tensor] = {}
    total_steps = 0
    for rec in records:
        scores, probs, s = rec.scores(selector), rec.probs(), rec.logits.shape[0]
        total_steps += s
        for hr in head_reduces:
            for with_sr in (True, False):
                covs = coverage_matrices(
                    scores, probs, ks, hr, rec.num_kv_heads, sink if with_sr else 0, recent if with_sr else 0
                )
                for k, cov in zip(ks, covs):
                    key = variant_key(k, hr, with_sr)
                    acc[key] = acc.get(key, 0) + cov * s
            for k in ks:
                if s >= 2:
                    jkey = f"k={k}/{hr}"
                    jac[jkey] = jac.get(jkey, 0) + topk_jaccard(scores, k, hr, rec.num_kv_heads) * s
        for part, v in mass_distribution(probs, rec.prompt_len, sink, recent).items():
            mass[part] = mass.get(part, 0) + v * s
    coverage = {}
    for key, total in acc.items():
        m = total / total_steps
        k_str, hr, sr = key.split("/")
        coverage[key] = {
            "k": _num(k_str[2:]),
            "head_reduce": hr,
            "sink_recent": sr == "sink+recent",
            "matrix": _rows(m),
            "oracle": [round(float(x), 5) for x in torch.diagonal(m)],
            "decay": [round(x, 5) for x in coverage_decay(m)],
        }
    return {
        "layer_ids": records[0].layer_ids,
        "num_kv_heads": records[0].num_kv_heads,
        "num_heads": int(records[0].logits.shape[2]),
        "inputs": [{"prompt_tokens": r.prompt_len, "decode_steps": int(r.logits.shape[0])} for r in records],
        "settings": {"ks": ks, "head_reduces": head_reduces, "sink": sink, "recent": recent, "selector": selector},
        "coverage": coverage,
        "jaccard": {key: [round(float(x), 5) for x in v / total_steps] for key, v in jac.items()},
        "mass": {part: [round(float(x), 5) for x in v / total_steps] for part, v in mass.items()},
    }


def _num(text: str) -> int | float:
    return float(text) if "." in text else int(text)


def _rows(m: torch.Tensor) -> list[list[float]]:
    return [[round(float(x), 5) for x in row] for row in m]
