"""Speed and memory benchmarks (`omnikv bench`): methods interleaved in one run on one model.

`run` drives the interleaved measurement, `fill` puts a long context into a cache (a real prefill
or synthetic KV), `probe` times the parts of a decode step and watches memory, `report` formats and
writes the results with their provenance.
"""

from omnikv.bench.run import BenchSpec, parse_contexts, public_records, run_bench

__all__ = ["BenchSpec", "parse_contexts", "public_records", "run_bench"]
