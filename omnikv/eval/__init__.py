"""Evaluation: download-free synthetic tasks, loaders for official long-context benchmarks, metrics,
fidelity against full attention, and the `omnikv eval` runner.

- `omnikv.eval.tasks`: `Sample`, the `TASKS` registry of local generators (RULER-style NIAH, variable
  tracking, word extraction, InfiniteBench synthetic tasks, OmniKV's 2-stage retrieval).
- `omnikv.eval.loaders`: LongBench (v1 / -E), LongBench v2, InfiniteBench from a local directory.
- `omnikv.eval.metrics`: scorers by name (`METRICS`), each `(prediction, answers, **kw) -> float in [0, 1]`.
- `omnikv.eval.fidelity`: agreement / KL / perplexity between a method and full attention.
- `omnikv.eval.runner`: the work loop behind `omnikv eval` (resume, shards, merge, reports).
"""
