"""OmniKV: drop-free dynamic context selection for long-context decoding."""
