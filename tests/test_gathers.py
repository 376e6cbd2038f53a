"""The offload parts one by one: each gather strategy against the slow reference (the layer-major
view of the bank, gathered row by row), the one place a strategy is chosen, and the static run's
lifecycle (`StaticState`) with stand-in layers."""

from __future__ import annotations

import pytest
import torch

from omnikv.errors import ConfigError, InputError
from omnikv.hf.static import StaticState
from omnikv.offload.bank import PackedBank, WorkBuffer
from omnikv.offload.gathers import GATHERS, GatherContext, choose_gather
from omnikv.offload.transfer import SimulatedTransfer, Transfer

CPU = torch.device("cpu")


def filled_bank(transfer: Transfer, t: int = 40, b: int = 2, layers: int = 3, h: int = 2, d: int = 4) -> PackedBank:
    bank = PackedBank(layers, transfer, CPU)
    bank.ensure(t, b, h, d, torch.float32)
    bank.data[:t].copy_(torch.randn(t, b, layers, 2, h, d, generator=torch.Generator().manual_seed(0)))
    bank.length = t
    return bank


def reference_rows(bank: PackedBank, idx: torch.Tensor) -> torch.Tensor:
    """(L, 2, B, H, k, D): row idx[b, g, j] of every layer, head h of group g, one at a time."""
    data = bank.data[: bank.length]  # (T, B, L, 2, H, D)
    _, b_, lsz, _, h_, d = data.shape
    k = idx.shape[-1]
    out = torch.empty(lsz, 2, b_, h_, k, d)
    for b in range(b_):
        for h in range(h_):
            g = 0 if idx.shape[1] == 1 else h
            for j in range(k):
                out[:, :, b, h, j] = data[int(idx[b, g, j]), b, :, :, h]
    return out


def selections(b: int, g: int, k: int, t: int, steps: int) -> list[torch.Tensor]:
    """Overlapping selections: each keeps most rows of the last (a partial reload's case)."""
    gen = torch.Generator().manual_seed(1)
    sel = [torch.stack([torch.stack([torch.randperm(t, generator=gen)[:k] for _ in range(g)]) for _ in range(b)])]
    for _ in range(steps - 1):
        nxt = sel[-1].clone()
        for bi in range(b):
            for gi in range(g):
                unused = [x for x in range(t) if x not in set(nxt[bi, gi].tolist())]
                nxt[bi, gi, : 2] = torch.tensor(unused[:2])
        sel.append(nxt)
    return sel


@pytest.mark.parametrize("kind", ["inline", "device_gather", "host_gather"])
@pytest.mark.parametrize("groups", [1, 2])
def test_each_eager_strategy_fills_the_working_buffer_like_the_reference(kind, groups):
    transfer = Transfer() if kind == "inline" else SimulatedTransfer(kind)
    bank = filled_bank(transfer)
    stream = transfer.side_stream(CPU)
    gather = GATHERS[kind](GatherContext(transfer, CPU, stream, partial_reload=True))
    work = WorkBuffer(transfer, CPU)
    k, partial = 8, 0
    for idx in selections(2, groups, k, bank.length, steps=4):
        prev = work.indices
        work.ensure(k, 0, bank, 0)
        work.k = k
        done = gather.load(bank, work, idx, prev)
        transfer.wait(work.ready, CPU)
        partial += done.partial
        # The slots may hold the rows in another order (a partial reload rewrites stale slots
        # only): the buffer holds the rows of `work.indices`, which are the selection's.
        assert torch.equal(work.indices.sort(-1).values, idx.sort(-1).values)
        assert torch.equal(work.selection(), reference_rows(bank, work.indices))
        if kind == "device_gather":  # every row of every sequence crosses the link
            assert done.h2d_bytes == 2 * k * bank.token_bytes()
        elif kind == "inline":
            assert done.h2d_bytes == 0
    if kind != "device_gather":  # both reload only the changed rows when they can
        assert partial == 3


def test_the_gather_choice():
    inline, device, host = Transfer(), SimulatedTransfer("device_gather"), SimulatedTransfer("host_gather")
    assert choose_gather(inline, filled_bank(inline), CPU, link=False, static=False) == "inline"
    assert choose_gather(inline, filled_bank(inline), CPU, link=False, static=True) == "static"
    assert choose_gather(device, filled_bank(device), CPU, link=True, static=False) == "device_gather"
    assert choose_gather(device, filled_bank(device), CPU, link=True, static=True) == "static"
    assert choose_gather(host, filled_bank(host), CPU, link=True, static=False) == "host_gather"
    with pytest.raises(ConfigError, match="device"):
        choose_gather(host, filled_bank(host), CPU, link=True, static=True)

    class Unmappable(SimulatedTransfer):
        """A driver that cannot map host memory: asking for the gather source switches it."""

        def gather_source(self, bank, device):
            self.gather = "host_gather"
            return bank

    for static, expect in ((False, "host_gather"), (True, None)):
        t = Unmappable("device_gather")
        if expect is None:
            with pytest.raises(ConfigError, match="device"):
                choose_gather(t, filled_bank(t), CPU, link=True, static=static)
        else:
            assert choose_gather(t, filled_bank(t), CPU, link=True, static=static) == expect
    assert set(GATHERS) == {"inline", "device_gather", "host_gather", "static"}


@pytest.mark.parametrize("transfer", ["inline", "simulated", "simulated_host_gather"])
def test_a_segment_loads_through_the_chosen_strategy(models, transfer):
    from omnikv import OmniKVCache, OmniKVConfig
    from omnikv.hf.compat import cache_kwargs

    model = models("llama", num_hidden_layers=6)
    config = OmniKVConfig(filter_layers=(1, 3), num_wait_layers=0, budget=0.3, sink_tokens=2, recent_tokens=4)
    cache = OmniKVCache(model, config.replace(offload=transfer != "inline"), transfer=transfer)
    ids = torch.randint(0, 256, (1, 60), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tok = model(input_ids=ids, use_cache=True, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
        for _ in range(3):
            tok = model(input_ids=tok, use_cache=True, **cache_kwargs(cache)).logits[:, -1:].argmax(-1)
    expect = {"inline": "inline", "simulated": "device_gather", "simulated_host_gather": "host_gather"}[transfer]
    for seg in cache.all_segments():
        assert set(seg._gathers) == {expect} and seg.k == config.resolve_budget(60)


class _Layer:
    """A stand-in layer that records the static hooks StaticState calls."""

    supports_static = True

    def __init__(self, log: list[str], name: str, makes_pos: bool) -> None:
        self.log, self.name, self.makes_pos = log, name, makes_pos

    def begin_static(self, state: StaticState) -> None:
        self.log.append(f"begin {self.name}")
        if self.makes_pos:
            state.ensure_pos(CPU)

    def advance_static(self) -> None:
        self.log.append(f"advance {self.name}")


def test_the_static_run_lifecycle():
    log: list[str] = []
    layers = [_Layer(log, "a", True), _Layer(log, "b", False)]
    state = StaticState(layers, "toy")
    assert all(layer.static is state for layer in layers)
    state.reserve(12)
    assert state.prepare(layers, 0) is False and not state.active  # nothing cached: a prompt
    assert state.prepare(layers, 10, on_step=lambda: log.append("step")) is True
    assert log == ["begin a", "begin b", "step", "advance a", "advance b"] and int(state.pos) == 10
    assert state.active and not state.step_coming()
    state.prepared = True
    assert state.step_coming()
    state.forward_start(1, lambda: 11)  # the prepared forward starts: consumed
    assert not state.prepared
    log.clear()
    assert state.prepare(layers, 11) and log == ["advance a", "advance b"]  # the run goes on
    with pytest.raises(InputError, match="reserve"):
        state.prepare(layers, 12)  # past the reserved capacity
    with pytest.raises(ConfigError, match="StaticDecoder"):
        state.forward_start(1, lambda: 12)  # a decode step nobody prepared
    state.forward_start(5, lambda: 12)  # a prompt forward ends the run
    assert not state.active
    alone = [_Layer(log, "c", False)]
    no_pos = StaticState(alone, "toy")
    no_pos.reserve(10)
    with pytest.raises(ConfigError, match="dense or filter layer"):
        no_pos.prepare(alone, 3)  # no layer made the device position

    class Sliding:
        supports_static = False

    with pytest.raises(ConfigError, match="sliding"):
        StaticState([Sliding()], "gemma3_text")
