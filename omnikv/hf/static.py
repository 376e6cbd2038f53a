"""Static-shape decode steps, and capturing them with torch.compile / CUDA graphs.

A cache built with `static=True` (`PreallocatedCache`, `OmniKVCache`) decodes, after
`cache.reserve(n, decode_tokens=m)`, with the same shapes at every step, like transformers'
StaticCache:

* dense and filter layers attend over their whole reserved buffer (`capacity` rows); the rows not
  written yet are masked by transformers' own causal mask, which is built over `capacity`
  columns (`get_mask_sizes`) from a query offset that is a device tensor (`StaticState.pos`);
* a filter layer scores, selects and gathers with tensor operations only (a full gather every
  step: a partial reload would size itself from a count read on the host);
* sparse layers attend over all k + decode-capacity rows of their segment's working buffer; the
  rows of tokens not generated yet have logical positions >= the current one, so the same causal
  mask, gathered at the rows' positions, hides them;
* the new token is written with `index_copy_` at a position held in a device tensor.

What changes from step to step on the Python side (lengths, step counters, transfer accounting)
is advanced by `StaticState.prepare` (through the cache's `prepare_static_step`), outside any
compiled region. `StaticDecoder` calls it and then the captured forward, in which nothing reads a
Python value that changes per step.

`StaticState` owns the static run: its capacity, the device position, and its lifecycle (a run
begins at the first static step after a prompt, each step advances every layer, a prompt forward
ends it). The layers take part through two hooks, `begin_static(state)` and `advance_static()`
(omnikv/hf/layers.py; OmniKV's filter layers pass them on to their segments,
omnikv/offload/segment.py); the cache only forwards transformers' mask questions to it.
"""

from __future__ import annotations

import contextlib
import time
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from omnikv.errors import ConfigError, InputError
from omnikv.hf.compat import cache_kwargs, query_position_kwargs


class StaticState:
    """The static run of one cache, shared by all its layers.

    `active` is True during a run of static decode steps (set and cleared outside compiled code);
    `capacity` is the number of logical positions every full-attention layer attends over (the mask
    width, from `reserve`); `pos` (0-d int64 on the compute device) is the position the current
    decode step writes; `prepared` is True between `prepare` and the forward it prepared.
    """

    def __init__(self, layers: Sequence[Any], model_type: str) -> None:
        """Refuse layers whose cache changes shape (`supports_static` False), join the others."""
        if any(not getattr(layer, "supports_static", False) for layer in layers):
            raise ConfigError(
                f"static=True / compile=True supports models whose layers all use full attention; "
                f"{model_type} has sliding-window layers (their window cache changes "
                f"shape); drop static/compile for this model"
            )
        self.active = False
        self.capacity = 0
        self.pos: torch.Tensor | None = None
        self.prepared = False
        for layer in layers:
            layer.static = self

    def index(self) -> torch.Tensor:
        """(1,) int64 view of `pos` for `index_copy_`."""
        return self.pos.view(1)

    def reserve(self, total: int) -> None:
        self.capacity = max(self.capacity, total)

    def forward_start(self, q: int, seen: Callable[[], int]) -> None:
        """Layer 0 of a forward of `q` tokens; `seen()` = the tokens the cache holds. Under
        torch.compile the driver has already prepared the step (`prepared`), so nothing here reads
        per-step state (`seen` is called only for a step nobody prepared)."""
        if q != 1:
            self.active = False  # a prompt forward: the eager, growing path
        elif self.prepared:
            self.prepared = False
        elif seen() > 0:
            # The step must be prepared before the forward: the model builds its mask (from
            # `get_query_offset`) and positions before the first layer's update.
            raise ConfigError(
                "a static cache's decode steps are driven by omnikv.hf.static.StaticDecoder (or "
                "Session / generate with the method's static/compile option); model.generate and "
                "plain forwards cannot drive it: build the cache without static=True for those"
            )

    def prepare(self, layers: Sequence[Any], seen: int, on_step: Callable[[], None] | None = None) -> bool:
        """Advance every layer by the coming single-token forward and put its position in `pos`;
        outside compiled code. `on_step` runs after a new run began and before the layers advance
        (the cache's own per-step bookkeeping). Returns False when that forward is not a static
        decode step (nothing cached yet: it is a prompt)."""
        if seen == 0:
            self.active = False
            return False
        if seen + 1 > self.capacity:
            raise InputError(
                f"static decoding: this step writes position {seen} but the cache reserved "
                f"{self.capacity} positions; call cache.reserve(extra_tokens, decode_tokens=...) with "
                "the prompt and every token to generate before the prompt forward"
            )
        if not self.active:
            self._begin(layers)
        if on_step is not None:
            on_step()
        for layer in layers:
            layer.advance_static()
        self.pos.fill_(seen)
        return True

    def _begin(self, layers: Sequence[Any]) -> None:
        """The first static step after a prompt: every layer takes its fixed shapes."""
        for layer in layers:
            layer.begin_static(self)
        if self.pos is None:
            raise ConfigError("static decoding needs at least one dense or filter layer")
        self.active = True

    def ensure_pos(self, device: torch.device) -> None:
        """The device position tensor, made once, on the device of the first layer that asks."""
        if self.pos is None:
            self.pos = torch.zeros((), dtype=torch.long, device=device)
            mark_static(self.pos.device, self.pos)

    def step_coming(self) -> bool:
        """The model is about to run a prepared static step (the mask is built before layer 0;
        a prompt forward after a static run must get the ordinary mask)."""
        return self.active and self.prepared


def zero_tail(buf: torch.Tensor, start: int, dim: int = -2) -> None:
    """Zero rows `start:` of `buf` along `dim`: never-written rows must not hold NaN, since a masked
    softmax weight of exactly 0 times a NaN value is still NaN."""
    buf.narrow(dim, start, buf.shape[dim] - start).zero_()


def mark_static(device: torch.device, *tensors: torch.Tensor) -> None:
    """On CUDA, tell dynamo these buffers keep their address from step to step (as transformers'
    StaticCache does): CUDA graphs then read and update them in place instead of copying them in
    as inputs each replay (a KV buffer or a host bank is far too large for that) or skipping
    capture because a mutated input has no fixed address.

    Not on CPU, where no graph is replayed by address, and where inductor's freezing
    (`CPU_INDUCTOR_CONFIG`) treats a marked buffer like a weight and folds it into the graph as a
    constant: the step would then read the KV as it was at compile time (measured: the greedy
    tokens leave eager's at the second step, `benchmarks/compile_levers.py`)."""
    if torch.device(device).type == "cpu":
        return
    for t in tensors:
        torch._dynamo.mark_static_address(t)


# Inductor settings for a decode step on CPU, where there are no CUDA graphs to capture: the weights
# frozen into the graph and its matrix products autotuned against inductor's own C++ GEMM. A
# one-token step's products are matrix-vector products bound by reading the weights, and inductor's
# kernels over the frozen (pre-packed) weights read them faster than the ATen products plain
# inductor calls: SmolLM2 at 4K, 54 -> 30 ms a compiled full-attention step (2 threads, idle),
# OmniKV at 16K 74 -> 60 ms (1 thread, loaded; docs/performance.md). The price: longer compiles, and the frozen weights are constants of the
# graph (a model whose weights change in place after compiling needs torch._dynamo.reset()).
CPU_INDUCTOR_CONFIG: dict[str, Any] = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}


def compile_backend(device: torch.device, backend: str | None = None, mode: str | None = None) -> dict[str, Any]:
    """torch.compile arguments: inductor everywhere; CUDA graphs (`reduce-overhead`) on CUDA."""
    backend = backend or "inductor"
    if mode is None and backend == "inductor" and torch.device(device).type == "cuda":
        mode = "reduce-overhead"
    return {"backend": backend, "mode": mode}


def inductor_config(device: torch.device, options: dict[str, Any]) -> dict[str, Any]:
    """Inductor settings patched in around the compiled step (`options` from `compile_backend`):
    `CPU_INDUCTOR_CONFIG` for inductor on CPU with no mode given, none otherwise
    (`compile_mode="default"` is plain inductor)."""
    if options.get("backend") == "inductor" and options.get("mode") is None and torch.device(device).type == "cpu":
        return dict(CPU_INDUCTOR_CONFIG)
    return {}


class StaticDecoder:
    """Runs the forwards of `model` on a static cache: `decoder(input_ids)` -> (B, 1, V) logits.

    A single-token forward after a prompt is a static step: `prepare_static_step` (`StaticState.prepare`)
    advances the cache's counters and position outside the model, then the forward runs, through
    `torch.compile` when `compile=True`. Prompt forwards (more than one token) run eagerly and
    unchanged. Seconds spent in calls that compiled (the first step, and any recompile, e.g. for
    a new prompt length, which the selection budget depends on) are summed in `compile_seconds`,
    counted in `compiles`, so a timing loop can leave them out.
    """

    def __init__(self, model: torch.nn.Module, cache, *, compile: bool = False, backend: str | None = None,
                 mode: str | None = None, method: str = "this method") -> None:
        if getattr(cache, "static", None) is None:
            raise ConfigError(
                f"compile=True needs a static-shape decode step; {method} has none "
                "(supported: full_prealloc, omnikv)"
            )
        self.model = model
        self.cache = cache
        self.compiled = compile
        self.options: dict[str, Any] = {}
        self.inductor_config: dict[str, Any] = {}
        self._cuda_graphs = False
        self._fn = self._step
        if compile:
            device = next(model.parameters()).device
            self.options = compile_backend(device, backend, mode)
            self._cuda_graphs = self.options["mode"] in ("reduce-overhead", "max-autotune")
            self.inductor_config = inductor_config(device, self.options)
            key = repr(sorted(self.inductor_config.items())) if self.inductor_config else ""
            step = types.MethodType(step_function(key), self)
            self._fn = torch.compile(step, dynamic=False, fullgraph=True, **self.options)
        self._ids: torch.Tensor | None = None
        self.compile_seconds = 0.0
        self.compiles = 0
        self.eager_fallback = False  # True once torch's recompile limit sent this decoder to eager

    def _step(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
              attention_mask: torch.Tensor | None) -> torch.Tensor:
        st = self.cache.static
        pos = st.pos if st is not None and st.active and input_ids.shape[-1] == 1 else None
        out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                         use_cache=True, logits_to_keep=1, **cache_kwargs(self.cache), **query_position_kwargs(pos))
        return out.logits

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, q) -> logits (B, 1, V). `position_ids` (B, q): default = the cache
        positions (no left padding); `attention_mask` (B, length so far) 2D padding mask or None."""
        if input_ids.shape[-1] != 1 or not self.cache.prepare_static_step():
            return self._step(input_ids, position_ids, attention_mask)
        st = self.cache.static
        if position_ids is None:
            position_ids = st.pos.view(1, 1).expand(input_ids.shape[0], 1)
        if self.compiled:
            # One input buffer: dynamo guards on strides, and a first token made elsewhere (not by
            # an argmax) would otherwise compile a second graph; CUDA graphs want fixed inputs.
            if self._ids is None or self._ids.shape != input_ids.shape:
                self._ids = torch.empty(input_ids.shape, dtype=input_ids.dtype, device=input_ids.device)
            input_ids = self._ids.copy_(input_ids)
        st.prepared = True
        before = _compile_count() if self.compiled else 0
        t0 = time.perf_counter()
        try:
            with _inductor_patch(self.inductor_config):  # read when a step compiles
                logits = self._fn(input_ids, position_ids, attention_mask)
        except Exception as exc:
            if not (self.compiled and _is_recompile_limit(exc)):
                raise
            # Each new capacity (prompt length + tokens to generate) is a new graph of this one
            # step function; past torch's recompile limit a fullgraph compile fails hard. The
            # limit is checked before anything runs, so this step is simply run eagerly (same
            # result), and so are the later steps of this decoder.
            _warn_recompile_limit()
            self._fn, self.compiled, self._cuda_graphs = self._step, False, False
            self.eager_fallback = True
            logits = self._step(input_ids, position_ids, attention_mask)
        if self._cuda_graphs:
            logits = logits.clone()  # a CUDA-graph output is overwritten by the next replay
        if self.compiled and _compile_count() != before:
            if logits.device.type == "cuda":
                torch.cuda.synchronize(logits.device)
            self.compile_seconds += time.perf_counter() - t0
            self.compiles += 1
        return logits


_STEP_FUNCTIONS: dict[str, Any] = {}


def step_function(key: str = ""):
    """`StaticDecoder._step` under a code object of its own per `key` ("" = `_step` itself).

    Dynamo keys compiled graphs by code object and guards, not by the inductor settings patched in
    while compiling, so decoders with different settings in one process (e.g. `compile_mode=default`
    beside the CPU default in one bench) would otherwise run whichever graph compiled first.
    `StaticDecoder` keys by its inductor settings; `benchmarks/compile_levers.py` by variant."""
    if key not in _STEP_FUNCTIONS:
        f = StaticDecoder._step
        if not key:
            _STEP_FUNCTIONS[key] = f
        else:
            code = f.__code__.replace(co_name=f"_step_{len(_STEP_FUNCTIONS)}")
            _STEP_FUNCTIONS[key] = types.FunctionType(code, f.__globals__, code.co_name, f.__defaults__, f.__closure__)
    return _STEP_FUNCTIONS[key]


def _inductor_patch(config: dict[str, Any]):
    """A context with inductor's `config` patched in (a no-op context when empty)."""
    if not config:
        return contextlib.nullcontext()
    import torch._inductor.config as inductor

    return inductor.patch(config)


def _is_recompile_limit(exc: BaseException) -> bool:
    """Whether `exc` (or its cause) is dynamo's recompile-limit failure."""
    limit_hit = getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", ())
    while exc is not None:
        if (limit_hit and isinstance(exc, limit_hit)) or "recompile limit" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


_warned_recompile_limit = False


def _warn_recompile_limit() -> None:
    global _warned_recompile_limit
    if _warned_recompile_limit:
        return
    _warned_recompile_limit = True
    limit = getattr(torch._dynamo.config, "recompile_limit", "?")
    warnings.warn(
        f"torch.compile: the static decode step reached torch's recompile limit ({limit} graphs, one per "
        "distinct prompt length + generation budget); decoders that need a new graph now run eagerly "
        "(same results, eager speed). Fewer distinct prompt lengths, or a higher "
        "torch._dynamo.config.recompile_limit, keep them compiled.",
        RuntimeWarning,
        stacklevel=3,
    )


def _compile_count() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
