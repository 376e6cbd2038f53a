"""Static-shape decode steps (omnikv/hf/static.py) against the default growing path, and compiled
steps against eager ones.

Static eager == dynamic eager: the same rows are attended, the static step only adds masked rows
(weight exactly 0) and reorders nothing, so fp32 logits agree to rounding (1e-5) and greedy tokens
are identical. Compiled tests use torch.compile's `aot_eager` backend: it traces the whole step
with dynamo into one graph (fullgraph=True, so any graph break fails the test) and runs it through
AOT autograd's functionalization, which is what inductor and CUDA graphs consume; inductor itself
takes minutes to compile a real model on the 2 shared test cores, so its speed is measured in the
benchmark, and one test compiles a tiny model with it (CPU's frozen-weights settings).
"""

import pytest
import torch

from omnikv import OmniKVCache, OmniKVConfig
from omnikv.hf.compat import cache_kwargs
from omnikv.errors import ConfigError, InputError
from omnikv.decoding.generation import Session, SamplingParams, teacher_forced_logits
from omnikv.methods import get_method
from omnikv.methods.full import PreallocatedCache
from omnikv.methods.spec import parse_method
from omnikv.models.tiny import build_tokenizer
from omnikv.hf.static import StaticDecoder

ATOL = 1e-5
COMPILED_ATOL = 1e-4  # aot_eager may fuse/reorder decompositions: rounding-level differences


def omni_cfg(**kw) -> OmniKVConfig:
    base = dict(filter_layers=(1, 3), num_wait_layers=0, budget=0.1, sink_tokens=2, recent_tokens=4)
    base.update(kw)
    return OmniKVConfig(**base)


def make_cache(kind: str, model, static: bool, **kw):
    if kind == "full_prealloc":
        return PreallocatedCache(model, static=static)
    return OmniKVCache(model, omni_cfg(**kw), static=static)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from an empty dynamo cache (the suite compiles many step shapes in one
    process; torch's recompile limit counts them per code object)."""
    torch._dynamo.reset()
    yield


def prompt_ids(batch: int, n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


def greedy(model, cache, ids, steps, *, decoder=None, mask=None):
    """Prefill `ids` (B, N) (left padding in `mask`), then `steps` greedy tokens. Returns tokens
    (B, steps) and the logits of every decode step (steps, B, V)."""
    cache.reserve(ids.shape[1] + steps, decode_tokens=steps)
    b = ids.shape[0]
    pos = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                   **cache_kwargs(cache)).logits[:, -1]
    toks, rows = [], []
    for _ in range(steps):
        tok = logits.argmax(-1, keepdim=True)
        toks.append(tok)
        if mask is not None:
            mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype)], dim=1)
            pos = pos[:, -1:] + 1
        if decoder is not None:
            logits = decoder(tok, position_ids=pos, attention_mask=mask)[:, -1]
        else:
            logits = model(input_ids=tok, attention_mask=mask, position_ids=pos, use_cache=True,
                           **cache_kwargs(cache)).logits[:, -1]
        rows.append(logits)
    return torch.cat(toks, dim=1), torch.stack(rows)


@pytest.mark.parametrize("kind", ["full_prealloc", "omnikv"])
def test_static_eager_equals_dynamic(models, kind):
    model = models("llama", num_hidden_layers=6)
    ids = prompt_ids(1, 150, seed=1)
    with torch.inference_mode():
        dyn = make_cache(kind, model, static=False)
        ref_toks, ref_logits = greedy(model, dyn, ids, 12)
        st = make_cache(kind, model, static=True)
        toks, logits = greedy(model, st, ids, 12, decoder=StaticDecoder(model, st))
    assert torch.equal(toks, ref_toks)
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)
    assert st.static.active and st.get_seq_length() == dyn.get_seq_length() == 150 + 12
    if kind == "omnikv":
        # The same selection, and a real (lossy) budget: the comparison is not full attention.
        for f, seg in dyn.segments.items():
            assert torch.equal(seg.indices.sort(-1).values, st.segments[f].indices.sort(-1).values)
        assert st.segments[1].k == 15 < 150


@pytest.mark.parametrize("kind", ["full_prealloc", "omnikv"])
def test_static_eager_equals_dynamic_left_padded_batch(models, kind):
    model = models("llama", num_hidden_layers=6)
    ids = torch.cat([torch.full((1, 40), 256), prompt_ids(1, 100, seed=2)], dim=1)
    ids = torch.cat([ids, prompt_ids(1, 140, seed=3)], dim=0)
    mask = torch.ones_like(ids)
    mask[0, :40] = 0
    with torch.inference_mode():
        dyn = make_cache(kind, model, static=False)
        ref_toks, ref_logits = greedy(model, dyn, ids, 8, mask=mask)
        st = make_cache(kind, model, static=True)
        toks, logits = greedy(model, st, ids, 8, decoder=StaticDecoder(model, st), mask=mask)
    assert torch.equal(toks, ref_toks)
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)
    if kind == "omnikv":
        # The same selection in both paths. With a fractional budget each row selects a fraction
        # of its own prompt: the padded row's k real positions, its index list filled up to the
        # batch's k with its own (masked) padding positions.
        static_idx = st.segments[1].indices.sort(-1).values
        assert torch.equal(static_idx, dyn.segments[1].indices.sort(-1).values)
        k_own = omni_cfg().resolve_budget(100)
        assert int((static_idx[0] >= 40).sum()) == k_own


def test_static_multi_turn_and_per_head_selection(models):
    """A second turn (prompt extension after decoding) and per-KV-head selection, through Session."""
    model = models("llama", num_hidden_layers=6)
    ids = prompt_ids(1, 120, seed=4)[0].tolist()
    outs = {}
    for static in (False, True):
        method = get_method("omnikv", config=omni_cfg(head_reduce="per_kv_head"), static=static)
        session = Session(model, build_tokenizer(), method)
        session.append(ids)
        first = session.generate(SamplingParams(max_new_tokens=6, ignore_eos=True))
        session.append([5, 6, 7, 8, 9])
        second = session.generate(SamplingParams(max_new_tokens=6, ignore_eos=True))
        outs[static] = (first.token_ids, second.token_ids)
    assert outs[True] == outs[False]


def test_teacher_forced_logits_static_equals_dynamic(models):
    model = models("llama", num_hidden_layers=6)
    ids = prompt_ids(1, 130, seed=5)[0].tolist()
    cont = prompt_ids(1, 8, seed=6)[0].tolist()
    for name, opts in (("full_prealloc", {}), ("omnikv", {"config": omni_cfg()})):
        ref = teacher_forced_logits(model, ids, cont, get_method(name, **opts))
        got = teacher_forced_logits(model, ids, cont, get_method(name, static=True, **opts))
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["full_prealloc", "omnikv"])
def test_compiled_equals_eager(models, kind):
    model = models("llama", num_hidden_layers=4)
    ids = prompt_ids(1, 100, seed=7)
    with torch.inference_mode():
        ref_toks, ref_logits = greedy(model, make_cache(kind, model, static=False, filter_layers=(1,)), ids, 6)
        st = make_cache(kind, model, static=True, filter_layers=(1,))
        dec = StaticDecoder(model, st, compile=True, backend="aot_eager")
        toks, logits = greedy(model, st, ids, 6, decoder=dec)
    assert torch.equal(toks, ref_toks)
    torch.testing.assert_close(logits, ref_logits, atol=COMPILED_ATOL, rtol=0)
    # One compile for the first step; the other steps reuse the graph (no per-step recompiles).
    assert dec.compiles == 1 and dec.compile_seconds > 0


def test_inductor_on_cpu_freezes_the_weights_and_keeps_the_kv_live(models):
    """compile=True on CPU runs inductor with the weights frozen into the graph
    (`CPU_INDUCTOR_CONFIG`). Freezing folds every static-address-marked tensor as a constant, so
    the KV buffers must stay unmarked on CPU: otherwise the step reads the KV of compile time and
    the tokens leave eager's. The one inductor compile of the suite (a 4-layer tiny model)."""
    from omnikv.hf.static import CPU_INDUCTOR_CONFIG

    model = models("llama", num_hidden_layers=4)
    ids = prompt_ids(1, 80, seed=11)
    with torch.inference_mode():
        ref_toks, ref_logits = greedy(model, make_cache("omnikv", model, static=False, filter_layers=(1,)), ids, 6)
        st = make_cache("omnikv", model, static=True, filter_layers=(1,))
        dec = StaticDecoder(model, st, compile=True)
        toks, logits = greedy(model, st, ids, 6, decoder=dec)
    assert dec.inductor_config == CPU_INDUCTOR_CONFIG and dec.options["backend"] == "inductor"
    assert torch.equal(toks, ref_toks)
    # Inductor's C++ GEMM sums in another order than ATen's: rounding-level differences.
    torch.testing.assert_close(logits, ref_logits, atol=1e-3, rtol=0)
    assert dec.compiles == 1
    buffers = [t for seg in st.all_segments() for t in (seg.work.data, seg.static_gather.source)] + [st.static.pos]
    assert not [t for t in buffers if hasattr(t, "_dynamo_static_input_type")]
    # Plain inductor beside it in the same process compiles a graph of its own (dynamo does not key
    # graphs by the inductor settings patched in, so each setting has its own step code object).
    with torch.inference_mode():
        st2 = make_cache("omnikv", model, static=True, filter_layers=(1,))
        plain = StaticDecoder(model, st2, compile=True, mode="default")
        toks2, _ = greedy(model, st2, ids, 6, decoder=plain)
    assert plain.inductor_config == {} and plain.compiles == 1 and torch.equal(toks2, ref_toks)


@pytest.mark.parametrize("mask_heads", [None, 1, 6])
def test_sdpa_attention_traced_packing_equals_transformers(mask_heads):
    from omnikv.hf.compat import sdpa_attention_forward
    from omnikv.hf.attention import sdpa_attention

    class Attn(torch.nn.Module):
        num_key_value_groups = 3

    module, g = Attn(), torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, n, 8, generator=g) for h, n in ((6, 1), (2, 37), (2, 37)))
    mask = None if mask_heads is None else torch.rand(2, mask_heads, 1, 37, generator=g) > 0.3
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    traced = torch.compile(lambda *a: sdpa_attention(module, *a, scaling=0.3)[0], backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(traced(q, k, v, mask), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(sdpa_attention(module, q, k, v, mask, scaling=0.3)[0], ref, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["full_prealloc", "omnikv"])
def test_traced_step_reads_kv_heads_once_and_writes_buffers_in_place(models, kind):
    """Two copies a traced step must not make (each cost more than the attention when profiled):
    transformers' SDPA falls back to repeat_kv when traced (every layer's whole K/V copied Hq/Hk
    times a step; omnikv.hf.attention.sdpa_attention keeps the single-query GQA packing instead), and
    an in-place write into a *view* of a buffer is functionalized into a rebuild of the whole
    buffer. So: no tensor of the traced step holds Hq heads over more than one row, and every
    in-place write targets a graph input itself."""
    model = models("llama", num_hidden_layers=4)
    hq, hk = model.config.num_attention_heads, model.config.num_key_value_heads
    d = model.config.hidden_size // hq
    assert hq > hk
    shapes: list[tuple[int, ...]] = []
    writes: list[tuple[str, str]] = []  # (method, op of the node it writes into)

    def recording(gm, example_inputs):
        for node in gm.graph.nodes:
            val = node.meta.get("example_value")
            if isinstance(val, torch.Tensor):
                shapes.append(tuple(val.shape))
            name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
            if node.op in ("call_method", "call_function") and name.endswith("_") and not name.startswith("_"):
                writes.append((name, node.args[0].op))
        return gm.forward

    ids = prompt_ids(1, 60, seed=9)
    with torch.inference_mode():
        ref_toks, ref_logits = greedy(model, make_cache(kind, model, static=False, filter_layers=(1,)), ids, 3)
        st = make_cache(kind, model, static=True, filter_layers=(1,))
        dec = StaticDecoder(model, st, compile=True, backend=recording)
        toks, logits = greedy(model, st, ids, 3, decoder=dec)
    assert torch.equal(toks, ref_toks)
    torch.testing.assert_close(logits, ref_logits, atol=COMPILED_ATOL, rtol=0)
    kv_rows = [s for s in shapes if len(s) == 4 and s[1] == hk and s[2] > 1 and s[3] == d]
    repeated = [s for s in shapes if len(s) == 4 and s[1] == hq and s[2] > 1 and s[3] == d]
    assert kv_rows, "the traced step should read the cache's K/V rows"
    assert not repeated, f"K/V repeated to {hq} heads in the traced step: {sorted(set(repeated))}"
    buffer_writes = [w for w in writes if w[0] in ("index_copy_", "index_put_", "copy_")]
    assert buffer_writes, "the traced step should write the new K/V rows"
    assert all(op == "placeholder" for _, op in buffer_writes), f"writes into views: {buffer_writes}"


def test_traced_cpu_filter_step_makes_no_product_against_the_keys(models):
    """A filter layer's logits against its key buffer are a multiply-and-sum when traced for CPU
    (omnikv.hf.attention.grouped_logits): as a matrix product, inductor's max-autotune C++ GEMM
    template copies and re-packs the whole key buffer every step (measured 4.5-14 ms against 0.5 ms
    at 16K, benchmarks/micro_filter_attention.py). The softmax-weighted sum of the values stays a
    product (the values are its row-major right operand: no re-pack). Greedy tokens as eager."""
    import operator

    model = models("llama", num_hidden_layers=4)
    d = model.config.hidden_size // model.config.num_attention_heads
    products: list[tuple[tuple[int, ...], ...]] = []

    def recording(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in (torch.matmul, torch.bmm, operator.matmul):
                products.append(tuple(tuple(a.meta["example_value"].shape) for a in node.args[:2]))
        return gm.forward

    ids = prompt_ids(1, 60, seed=12)
    with torch.inference_mode():
        ref_toks, _ = greedy(model, make_cache("omnikv", model, static=False, filter_layers=(1,)), ids, 3)
        st = make_cache("omnikv", model, static=True, filter_layers=(1,))
        toks, _ = greedy(model, st, ids, 3, decoder=StaticDecoder(model, st, compile=True, backend=recording))
    assert torch.equal(toks, ref_toks)
    capacity = st.static.capacity
    assert [p for p in products if p[1][-2:] == (capacity, d)], "the filter's weighted sum of values"
    assert not [p for p in products if p[1][-2:] == (d, capacity)], f"a product against K^T: {products}"


def test_grouped_logits_traced_equals_the_product():
    from omnikv.hf.attention import grouped_logits

    g = torch.Generator().manual_seed(0)
    q, keys = torch.randn(2, 3, 4, 16, generator=g), torch.randn(2, 3, 50, 16, generator=g)
    ref = torch.matmul(q, keys.transpose(-1, -2))
    torch.testing.assert_close(grouped_logits(q, keys), ref, atol=0, rtol=0)
    traced = torch.compile(grouped_logits, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(traced(q, keys), ref, atol=1e-5, rtol=0)


def test_compile_option_in_specs_and_session(models):
    spec = parse_method("omnikv:compile=true:compile_backend=aot_eager")
    method = get_method(spec.name, config=omni_cfg(filter_layers=(1,)), **spec.options)
    assert method.compile and method.static and method.describe()["compile"] is True
    model = models("llama", num_hidden_layers=4)
    ids = prompt_ids(1, 90, seed=8)[0].tolist()
    eager = Session(model, build_tokenizer(), get_method("omnikv", config=omni_cfg(filter_layers=(1,))))
    eager.append(ids)
    compiled = Session(model, build_tokenizer(), method)
    compiled.append(ids)
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    a, b = eager.generate(params), compiled.generate(params)
    assert a.token_ids == b.token_ids
    assert b.stats["compiles"] == 1 and b.stats["compile_seconds"] > 0
    assert "compile_seconds" not in a.stats


@pytest.mark.parametrize("name", ["full", "snapkv", "streaming_llm"])
def test_methods_without_static_step_refuse_compile(name):
    with pytest.raises(ConfigError, match=f"method '{name}' cannot be compiled"):
        get_method(name, compile=True)


def test_static_needs_reserve_and_a_driver(models):
    model = models("llama", num_hidden_layers=4)
    ids = prompt_ids(1, 40, seed=9)
    with torch.inference_mode():
        cache = PreallocatedCache(model, static=True)
        model(input_ids=ids, use_cache=True, **cache_kwargs(cache))
        with pytest.raises(InputError, match="reserve"):
            StaticDecoder(model, cache)(ids[:, :1])
        cache = PreallocatedCache(model, static=True)
        cache.reserve(50, decode_tokens=10)
        model(input_ids=ids, use_cache=True, **cache_kwargs(cache))
        with pytest.raises(ConfigError, match="StaticDecoder"):
            model(input_ids=ids[:, :1], use_cache=True, **cache_kwargs(cache))


@pytest.mark.parametrize("bad", [dict(selector="uniform"), dict(refresh_every=2)])
def test_static_refuses_what_it_cannot_capture(models, bad):
    with pytest.raises(ConfigError, match="static"):
        OmniKVCache(models("llama", num_hidden_layers=4), omni_cfg(**bad), static=True)
    with pytest.raises(ConfigError, match="sliding"):
        PreallocatedCache(models("gemma3_text"), static=True)


def test_cli_compile_flags_build_compiled_methods():
    from omnikv.cli import build_parser
    from omnikv.methods.spec import with_compile
    from omnikv.cli.common import build_method

    args = build_parser().parse_args(["generate", "hello", "--model", "smollm2", "--method", "full_prealloc", "--compile"])
    method = build_method(args)
    assert method.name == "full_prealloc" and method.compile and method.static
    args = build_parser().parse_args(["generate", "hello", "--model", "smollm2", "--method", "snapkv", "--compile"])
    with pytest.raises(ConfigError, match="'snapkv' cannot be compiled"):
        build_method(args)
    # bench --compile: compile=true added where a static step exists, other methods unchanged
    labels = [with_compile(parse_method(x)).label for x in ("full", "full_prealloc", "omnikv:budget=64")]
    assert labels == ["full", "full_prealloc:compile=true", "omnikv:budget=64:compile=true"]


def test_eval_and_serve_compile_flags(models):
    from omnikv.cli import build_parser
    from omnikv.cli.cmd_eval import method_labels
    from omnikv.cli.common import build_method
    from omnikv.server.engine import Engine

    # eval --compile: the same labels as bench --compile (they name the rows of the tables)
    args = build_parser().parse_args(["eval", "--model", "smollm2", "--methods", "full,omnikv,snapkv", "--compile"])
    assert method_labels(args) == ["full", "omnikv:compile=true", "snapkv"]
    args = build_parser().parse_args(["eval", "--model", "smollm2", "--methods", "full,omnikv"])
    assert method_labels(args) == ["full", "omnikv"]
    # serve --compile: a compiled method, decoded one request at a time (a batch would run eager)
    args = build_parser().parse_args(["serve", "--model", "smollm2", "--method", "full_prealloc", "--compile"])
    method = build_method(args)
    assert method.compile and method.static
    model = models("llama")
    tok = build_tokenizer()
    assert Engine(model, tok, method, name="t", max_batch_size=4).max_batch_size == 1
    assert Engine(model, tok, get_method("full_prealloc"), name="t", max_batch_size=4).max_batch_size == 4
    args = build_parser().parse_args(["serve", "--model", "smollm2", "--method", "snapkv", "--compile"])
    with pytest.raises(ConfigError, match="'snapkv' cannot be compiled"):
        build_method(args)


def test_compiled_first_token_from_elsewhere_compiles_once(models):
    """A first decode token not made by an argmax (other strides) reuses the same graph."""
    model = models("llama", num_hidden_layers=4)
    ids = prompt_ids(1, 60, seed=10)
    with torch.inference_mode():
        cache = PreallocatedCache(model, static=True)
        cache.reserve(64, decode_tokens=4)
        dec = StaticDecoder(model, cache, compile=True, backend="eager")
        dec(ids)
        tok = ids[:, -2:-1].t()  # (1, 1), a transposed view
        for _ in range(3):
            tok = dec(tok)[:, -1].argmax(-1, keepdim=True)
    assert dec.compiles == 1


def test_static_offload_simulated_equals_inline(models):
    """The static step over an offloaded bank (simulated transfer: CUDA ordering rules on CPU, NaN
    in anything read before its copy landed) == the default step without offload."""
    model = models("llama", num_hidden_layers=6)
    ids = prompt_ids(1, 150, seed=11)
    with torch.inference_mode():
        ref_toks, ref_logits = greedy(model, OmniKVCache(model, omni_cfg(offload=False)), ids, 8)
        st = OmniKVCache(model, omni_cfg(), transfer="simulated", static=True)
        toks, logits = greedy(model, st, ids, 8, decoder=StaticDecoder(model, st))
    assert torch.equal(toks, ref_toks)
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)
    assert st.offload and st.stats()["h2d_bytes_per_step"] > 0  # the gather is counted


def test_past_the_recompile_limit_a_decoder_runs_eagerly(models, monkeypatch):
    """A new prompt length is a new graph of the one step function; past torch's recompile limit a
    fullgraph compile fails hard. The decoder then runs the step eagerly: same tokens, a warning,
    and the session's stats say so."""
    import omnikv.hf.static

    monkeypatch.setattr(omnikv.hf.static, "_warned_recompile_limit", False)
    model = models("llama", num_hidden_layers=4)
    method = get_method("full_prealloc", compile=True, compile_backend="aot_eager")
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)

    def run(m, ids):
        session = Session(model, build_tokenizer(), m)
        session.append(ids)
        return session, session.generate(params)

    first_ids, second_ids = (prompt_ids(1, n, seed=n)[0].tolist() for n in (70, 90))
    with torch._dynamo.config.patch(recompile_limit=1):
        first, res = run(method, first_ids)  # the one graph the limit allows
        assert res.stats["compiles"] == 1 and "compile_fallback" not in res.stats
        with pytest.warns(RuntimeWarning, match="recompile limit"):
            second, got = run(method, second_ids)  # another capacity: a second graph, refused
    _, ref = run(get_method("full_prealloc"), second_ids)
    assert got.token_ids == ref.token_ids
    assert got.stats["compile_fallback"] == "eager" and second.decoder.eager_fallback


def _offload_compiled(model, ids, steps):
    st = OmniKVCache(model, omni_cfg(), transfer="simulated", static=True)
    dec = StaticDecoder(model, st, compile=True, backend="aot_eager")
    toks, logits = greedy(model, st, ids, steps, decoder=dec)
    return st, dec, toks, logits


def test_offload_static_step_compiles_whole_and_syncs_nothing(models):
    """The offload static step (mapped-bank device gather, simulated on CPU) traces into one graph
    (fullgraph=True: a graph break fails the compile), compiles once, matches the eager step
    without offload, and the transfer counts no host sync in a step: what `reduce-overhead` needs
    to capture it as one CUDA graph."""
    model = models("llama", num_hidden_layers=6)
    ids = prompt_ids(1, 150, seed=11)
    with torch.inference_mode():
        ref_toks, ref_logits = greedy(model, OmniKVCache(model, omni_cfg(offload=False)), ids, 6)
        st, dec, toks, logits = _offload_compiled(model, ids, 6)
    assert torch.equal(toks, ref_toks)
    torch.testing.assert_close(logits, ref_logits, atol=COMPILED_ATOL, rtol=0)
    assert dec.compiles == 1
    stats = st.stats()
    assert st.offload and stats["transfer"] == "simulated/device_gather"
    assert stats["host_syncs_per_step"] == 0 and stats["h2d_bytes_per_step"] > 0


def test_a_sync_planted_in_the_offload_static_step_fails_the_compile(models, monkeypatch):
    """The check above can fail: a host read of a device value inside the step (here the gather
    sizing itself from the indices, as a partial reload that counts its changed rows on the host
    would) is a graph break, and fullgraph=True refuses it."""
    from omnikv.offload.gathers import StaticGather

    original = StaticGather.load

    def load_with_a_sync(self, bank, work, idx, prev):
        if int(idx.max()) >= bank.length:  # a host read of a device tensor: a sync on a GPU
            raise AssertionError("unreachable")
        return original(self, bank, work, idx, prev)

    monkeypatch.setattr(StaticGather, "load", load_with_a_sync)
    model = models("llama", num_hidden_layers=6)
    with torch.inference_mode(), pytest.raises(Exception) as err:
        _offload_compiled(model, prompt_ids(1, 150, seed=11), 2)
    assert "graph break" in str(err.value).lower() or "unsupported" in type(err.value).__name__.lower() or \
        "data-dependent" in str(err.value).lower(), repr(err.value)[:500]
