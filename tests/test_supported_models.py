"""An unsupported architecture (GPT-2) gets one clear error, up front, from OmniKV and from every
baseline that builds its own cache: what is supported and why, no preset warning first and no
AttributeError. `full` / `full_offload` (transformers' own caches) still run it."""

from __future__ import annotations

import warnings

import pytest
import torch

from omnikv.cli import main
from omnikv.errors import UnsupportedModelError
from omnikv.hf.cache import TESTED_MODEL_TYPES
from omnikv.methods import available_methods, get_method, method_class

STOCK = ("full", "full_offload")  # transformers' DynamicCache / offloaded cache: any model


@pytest.fixture(scope="module")
def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=259, n_positions=256, bos_token_id=256,
                     eos_token_id=258)
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("name", [m for m in available_methods() if m not in STOCK])
def test_every_managed_method_refuses_gpt2_up_front(gpt2, name):
    method = get_method(name, budget=16) if method_class(name).takes_budget else get_method(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UnsupportedModelError) as err:
            method.make_cache(gpt2)
    msg = str(err.value)
    assert f"{name} does not support gpt2 models" in msg and "num_key_value_heads" in msg
    assert all(t in msg for t in TESTED_MODEL_TYPES) and "--method full" in msg
    assert not [w for w in caught if "preset" in str(w.message)]  # no "calibrate" hint before the error


def test_stock_full_attention_still_runs_gpt2(gpt2):
    from omnikv.decoding.generation import SamplingParams, generate
    from omnikv.models.tiny import build_tokenizer

    for name in STOCK:
        res = generate(gpt2, build_tokenizer(), list(range(20)), name, SamplingParams(max_new_tokens=3, ignore_eos=True))
        assert res.generated_tokens == 3


def test_cli_reports_the_architecture_in_one_line(gpt2, tmp_path, capsys):
    from omnikv.models.tiny import build_tokenizer

    gpt2.save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    capsys.readouterr()  # the save's progress bar
    assert main(["generate", "--model", str(tmp_path), "--method", "omnikv", "--max-new-tokens", "2", "hello"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("omnikv generate: error: omnikv does not support gpt2 models") and err.count("\n") == 1
    assert "Traceback" not in err and "calibrate" not in err
