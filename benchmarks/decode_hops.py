"""How many files and functions of omnikv/ one decode step with offload passes through
(docs/internals.md, "Following a decode step"). Runs on this tree and on older commits (the flat
layout before the layer folders too):

    PYTHONPATH=. .venv/bin/python benchmarks/decode_hops.py            # this tree
    PYTHONPATH=/path/to/other/checkout .venv/bin/python benchmarks/decode_hops.py

A tiny Llama (6 layers, filter layers 1 and 3, so layers 2, 4, 5 are sparse) is prefilled with 120
tokens on an OmniKVCache with the simulated transfer (the CUDA offload path with a device gather,
on CPU), then one eager decode step and one static decode step (`StaticDecoder`, eager) run under
`sys.setprofile`, which records every call whose code lives in omnikv/ (the model's own code and
torch are not counted). Prints, per step: the files, the distinct functions, and the calls.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import torch

import omnikv
from omnikv import OmniKVCache, OmniKVConfig

try:
    from omnikv.hf.compat import cache_kwargs
    from omnikv.hf.static import StaticDecoder
    from omnikv.models.tiny import tiny_model
except ImportError:  # before the layer folders (commit 9c3eb4e and earlier): flat modules
    from omnikv._compat import cache_kwargs
    from omnikv.static import StaticDecoder
    from omnikv.models.tiny import tiny_model

ROOT = Path(omnikv.__file__).parent


def traced(fn) -> tuple[Counter, Counter]:
    """(calls per file, calls per file:function) of omnikv code while `fn` runs."""
    files, funcs = Counter(), Counter()

    def profile(frame, event, arg):
        if event != "call":
            return
        path = Path(frame.f_code.co_filename)
        if ROOT in path.parents:
            rel = str(path.relative_to(ROOT))
            files[rel] += 1
            funcs[f"{rel}:{frame.f_code.co_qualname if hasattr(frame.f_code, 'co_qualname') else frame.f_code.co_name}"] += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return files, funcs


def main() -> None:
    torch.manual_seed(0)
    model = tiny_model("llama", num_hidden_layers=6)
    config = OmniKVConfig(filter_layers=(1, 3), num_wait_layers=0, budget=0.2, sink_tokens=2, recent_tokens=4)
    ids = torch.randint(0, 256, (1, 120), generator=torch.Generator().manual_seed(0))
    out = {}
    for name, static in (("eager", False), ("static", True)):
        cache = OmniKVCache(model, config, transfer="simulated", static=static)
        cache.reserve(130, decode_tokens=10)
        decoder = StaticDecoder(model, cache) if static else None
        with torch.no_grad():
            tok = model(input_ids=ids, use_cache=True, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)

            kwargs = cache_kwargs(cache)  # the caller's part, not the step's

            def step(tok=tok, kwargs=kwargs, decoder=decoder):  # one step of this cache
                if decoder is not None:
                    return decoder(tok)
                return model(input_ids=tok, use_cache=True, **kwargs).logits

            step()  # the first decode step after the prompt (a static run begins here)
            files, funcs = traced(step)  # a steady-state step
        out[name] = {"files": sorted(files), "n_files": len(files), "n_functions": len(funcs),
                     "calls": sum(funcs.values()), "functions": sorted(funcs)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
