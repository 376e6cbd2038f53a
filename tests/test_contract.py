"""Fails loudly, naming the transformers version, when a seam we rely on moves."""

import torch

from omnikv.hf import compat as _compat
from omnikv.hf.compat import cache_kwargs, check_seams, version_note
from omnikv.decoding.generation import Session


def test_seams_exist():
    problems = check_seams()
    assert not problems, f"{version_note()}: {problems}; update omnikv/hf/compat.py"


def test_version_in_tested_range():
    lo, hi = _compat.TESTED_RANGE
    assert lo <= _compat.TRANSFORMERS_VERSION < hi, version_note()


def test_model_calls_cache_update_and_our_attention(models):
    """The whole integration rests on: forward calls cache.update(k, v, layer_idx) for every layer,
    then the registered attention function with the layer's module; and get_seq_length drives
    positions."""
    from omnikv.methods import get_method

    model = models("llama")
    session = Session(model, None, get_method("full_prealloc"))
    calls = []
    orig = session.cache.attend

    def spy(layer_idx, *a, **k):
        calls.append(layer_idx)
        return orig(layer_idx, *a, **k)

    session.cache.attend = spy
    session.append(list(range(20)))
    session.feed()
    assert calls == list(range(4)), f"{version_note()}: attention no longer goes through the cache hand-off"
    assert session.cache.get_seq_length() == 20


def test_generate_accepts_cache_keyword(models):
    from omnikv import OmniKVCache, OmniKVConfig

    model = models("llama")
    cache = OmniKVCache(model, OmniKVConfig(filter_layers=(1,), num_wait_layers=0, budget=1.0))
    out = model.generate(torch.arange(30)[None], max_new_tokens=3, do_sample=False, **cache_kwargs(cache))
    assert out.shape == (1, 33), f"{version_note()}: generate() did not use the `{_compat.CACHE_KWARG}` cache"
    assert cache.get_seq_length() == 32


def test_a_cache_under_the_other_keyword_is_used_or_refused(models):
    """Never silently ignored: 5.24 still takes `past_key_values=` (deprecated); before it, a
    forward given `cache=` would run full attention without the cache, so our attention function
    refuses it, naming the keyword to use."""
    import pytest

    from omnikv import InputError, OmniKVCache, OmniKVConfig

    model = models("llama")
    cache = OmniKVCache(model, OmniKVConfig(filter_layers=(1,), num_wait_layers=0, budget=4))
    ids = torch.arange(12)[None]
    if _compat.CACHE_KWARG == "cache":
        with pytest.warns(FutureWarning):
            model.generate(ids, past_key_values=cache, max_new_tokens=2, do_sample=False)
        assert cache.get_seq_length() == 13, version_note()
    else:
        with pytest.raises(InputError, match="pass it as `past_key_values=cache`"):
            model(ids, cache=cache)
        assert cache.get_seq_length() == 0


def test_an_input_that_does_not_continue_the_cache_is_refused(models):
    """On every version: 5.24 passes `update` the positions (refused before anything is written);
    earlier releases pass them only to the attention call, after layer 0 has written, so the cache
    then refuses all further input instead of decoding from a corrupt state."""
    import pytest

    from omnikv import InputError, OmniKVCache, OmniKVConfig

    model = models("llama")
    cache = OmniKVCache(model, OmniKVConfig(filter_layers=(1,), num_wait_layers=0, budget=4))
    prompt = torch.arange(3, 23)[None]
    at = lambda start, n: torch.arange(start, start + n)[None]  # noqa: E731  (B, q) positions

    def forward(ids, start):
        with torch.no_grad():
            return model(ids, position_ids=at(start, ids.shape[1]), **cache_kwargs(cache))

    forward(prompt, 0)
    forward(torch.tensor([[7]]), 20)  # a decode step: continues at 20
    with pytest.raises(InputError, match="a cache continues one sequence"):
        forward(prompt, 0)  # the same prompt again, as a second `generate` would feed it
    if cache._broken is None:  # refused before writing: the cache goes on where it was
        assert cache.get_seq_length() == 21, version_note()
        forward(torch.tensor([[8]]), 21)
        assert cache.get_seq_length() == 22
    else:
        with pytest.raises(InputError, match="build a new one"):
            forward(torch.tensor([[8]]), 21)
    assert (cache._broken is None) == (_compat.CACHE_KWARG == "cache"), version_note()


def test_tested_range_is_pyprojects():
    """compat's TESTED_RANGE is the range pyproject.toml declares (the floor venv installs its
    lower end, scripts/setup_floor.sh), so the contract test's range check means what pip allows."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    lo, hi = re.search(r'"transformers>=([0-9.]+),<([0-9.]+)"', text).groups()
    assert (_compat.TESTED_RANGE[0], _compat.TESTED_RANGE[1]) == (_compat.Version(lo), _compat.Version(hi))


def test_mask_and_position_seams_read_both_forms():
    """The forms transformers passes inside the tested range: a query length or the forward's
    cache_position; position_ids to `update` (5.24), or none that tell where the input starts."""
    pos = torch.arange(5, 8)
    assert _compat.mask_query_length(3) == 3 == _compat.mask_query_length(pos)
    assert _compat.update_positions((), {"position_ids": pos[None]}).tolist() == [[5, 6, 7]]
    assert _compat.update_positions((), {"kwargs": {"position_ids": pos[None]}}).tolist() == [[5, 6, 7]]
    assert _compat.update_positions(({"cache_position": pos},), {}) is None  # derived from the cache: checked at attention
    assert _compat.update_positions((), {}) is None
