"""OmniKV itself: layer roles, the Context Selector (pure tensor functions), the filter and sparse
layers, the OmniKV cache that puts them together, the per-model presets and selection telemetry."""
