"""Driving decoding: `Session` / `generate` (chunked prefill, sampling, streaming, stop strings,
multi-turn reuse), the stop-string matcher, and forks of a shared prefill."""
