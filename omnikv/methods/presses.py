"""kvpress's presses as baselines: `kvpress:SnapKVPress`, `kvpress:TOVAPress`, ... (NVIDIA kvpress).

A press is kvpress's own object, applied with kvpress's own API: its forward hooks
(`press(model)`, or `press.forward_hook` on the full-attention layers of a hybrid model, which
kvpress's context manager would otherwise compress too) run while the prompt is prefilled in one
forward, on transformers' stock `DynamicCache`; a `DecodingPress` keeps its hooks on during
decoding too. Nothing of kvpress is copied here: this module turns a method spec into a press,
sets its `compression_ratio` from the budget, and keeps the positions right after the cache shrank.

The budget means what it means for every method (the prompt tokens a layer keeps, an int or a
fraction, `omnikv.budget.Budget`): for a prompt of n tokens and k = budget.tokens(n) kept, the press
gets `compression_ratio = 1 - (k + 0.5) / n` (kvpress keeps `int(n * (1 - ratio))` rows: the half
row makes that exactly k, never k - 1 by rounding). A press without a compression ratio
(`DecodingPress` and other wrappers) keeps its own options; its rows are whatever it keeps.

kvpress is optional: listing the methods never imports it; building a press without it installed
says how to install it. `import kvpress` patches transformers' attention functions (kvpress's
doing, for its head-wise presses), so it is imported only when a press is built.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from omnikv.errors import ConfigError
from omnikv.hf.cache import check_supported
from omnikv.hf.compat import DynamicCache, layer_types
from omnikv.methods import register
from omnikv.methods.base import DEFAULT_BUDGET, Method

# kvpress's release that this module is tested with (in the floor venv, scripts/setup_floor.sh).
KVPRESS_TESTED = "0.5.5"
_PRESS = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*$", re.S)


def kvpress_available() -> bool:
    """Whether kvpress is installed (without importing it: the import patches transformers)."""
    return importlib.util.find_spec("kvpress") is not None


def _kvpress():
    if not kvpress_available():
        raise ConfigError(
            "the kvpress methods need NVIDIA's kvpress: `pip install kvpress` (kvpress "
            f"{KVPRESS_TESTED} needs transformers < 5.3: install it beside omnikv in a venv with "
            "transformers 5.2, as scripts/setup_floor.sh does)"
        )
    import kvpress

    return kvpress


def parse_press(text: str) -> tuple[str, dict[str, Any]]:
    """`"SnapKVPress(window_size=64, kernel_size=5)"` -> ("SnapKVPress", {...}); values are Python
    literals (numbers, strings, True/False/None) or another press (`AdaKVPress(press=SnapKVPress)`)."""
    m = _PRESS.match(text or "")
    if m is None:
        raise ConfigError(f"bad press {text!r}; write a kvpress class name, optionally with options: "
                          "SnapKVPress or SnapKVPress(window_size=64)")
    name, inner = m.group(1), (m.group(2) or "").strip()
    if not inner:
        return name, {}
    try:
        call = ast.parse(f"f({inner})", mode="eval").body
    except SyntaxError:
        raise ConfigError(f"bad press options in {text!r}; write key=value pairs separated by commas") from None
    if call.args:
        raise ConfigError(f"bad press options in {text!r}: options are key=value, not positional")
    return name, {kw.arg: _option_value(kw.value, text) for kw in call.keywords}


def _option_value(node: ast.expr, text: str) -> Any:
    if isinstance(node, ast.Name) and node.id not in ("True", "False", "None"):
        return parse_press(node.id)  # a nested press given by name
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        return parse_press(ast.unparse(node))
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ConfigError(f"bad press option {ast.unparse(node)!r} in {text!r}: use numbers, strings, "
                          "True/False/None or another press") from None


def press_names() -> list[str]:
    """The press classes kvpress exports (empty when it is not installed)."""
    if not kvpress_available():
        return []
    kv = _kvpress()
    return sorted(n for n in dir(kv) if n.endswith("Press") and isinstance(getattr(kv, n), type)
                  and issubclass(getattr(kv, n), kv.BasePress) and n != "BasePress")


def build_press(name: str, options: dict[str, Any]):
    """A kvpress press object; ConfigError naming the press, or its options, when kvpress refuses."""
    kv = _kvpress()
    cls = getattr(kv, name, None)
    if not (isinstance(cls, type) and issubclass(cls, kv.BasePress)):
        raise ConfigError(f"kvpress has no press {name!r}; its presses: {', '.join(press_names())}")
    values = {k: build_press(*v) if isinstance(v, tuple) else v for k, v in options.items()}
    try:
        return cls(**values)
    except (TypeError, AssertionError, ValueError) as exc:
        fields = ", ".join(getattr(cls, "__dataclass_fields__", {})) or "none"
        raise ConfigError(f"kvpress {name} refused options {options}: {exc}; its options: {fields}") from None


def set_kept(press, kept: int, prompt_len: int) -> bool:
    """Set `press` (or the press it wraps) to keep `kept` of `prompt_len` rows; False when it has
    no compression ratio (it then keeps what its own options say)."""
    if prompt_len <= 0:
        return False
    ratio = max(0.0, (prompt_len - kept - 0.5) / prompt_len)
    target = press if hasattr(press, "compression_ratio") and not hasattr(press, "press") else getattr(press, "press", None)
    if target is None or not hasattr(target, "compression_ratio"):
        return False
    target.compression_ratio = ratio
    return True


@contextlib.contextmanager
def press_hooks(press, model: torch.nn.Module) -> Iterator[None]:
    """kvpress's hooks on `model`: its own context manager, or, for a model with sliding-window
    layers, `press.forward_hook` on the full-attention layers only (kvpress skips sliding layers
    for its Gemma 3 multimodal class alone; compressing a window cache decodes garbage)."""
    types = layer_types(model.config)
    if "sliding_attention" not in types:
        with press(model):
            yield
        return
    press.post_init_from_model(model)
    inner = model.model.language_model if hasattr(model.model, "language_model") else model.model
    hooks = []
    try:
        for layer, kind in zip(inner.layers, types):
            if kind == "sliding_attention":
                continue
            layer.self_attn.rotary_emb = inner.rotary_emb  # what kvpress's own manager sets
            hooks.append(layer.self_attn.register_forward_hook(press.forward_hook, with_kwargs=True))
        yield
    finally:
        for hook in hooks:
            hook.remove()


@contextlib.contextmanager
def stock_attention(model: torch.nn.Module) -> Iterator[None]:
    """Run the forwards inside on transformers' "sdpa" attention. kvpress's head-wise presses
    (AdaKVPress) mask through the attention functions kvpress wraps when it is imported; omnikv's
    "omnikv" function, registered when one of our caches is built (often after that import), is
    not wrapped, and a model another method switched to it would ignore those masks."""
    current = getattr(model.config, "_attn_implementation", None)
    if current == "sdpa":
        yield
        return
    model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        model.set_attn_implementation(current)


@register("kvpress")
@dataclass(eq=False)
class KVPress(Method):
    """A kvpress press as a baseline: `kvpress:SnapKVPress`, `kvpress:TOVAPress`,
    `kvpress:SnapKVPress(window_size=32)`, `kvpress:AdaKVPress(press=SnapKVPress)`."""

    press: str = "SnapKVPress"  # `kvpress` alone is kvpress:SnapKVPress

    lossy: ClassVar[bool] = True
    supports_batch: ClassVar[bool] = False
    needs_real_prefill: ClassVar[bool] = True
    prefill_in_one_forward: ClassVar[bool] = True  # kvpress compresses at the prompt's one forward
    positional_option: ClassVar[str | None] = "press"  # kvpress:SnapKVPress
    default_budget: ClassVar[int | float] = DEFAULT_BUDGET

    def validate(self) -> None:
        if not self.press:
            raise ConfigError("the kvpress method needs a press: kvpress:SnapKVPress, kvpress:TOVAPress, "
                              "kvpress:SnapKVPress(window_size=64) (kvpress's class names)")
        self.press_name, self.press_options = parse_press(self.press)
        if kvpress_available():
            build_press(self.press_name, self.press_options)  # refuse bad names and options now

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "press": self.press}

    def make_cache(self, model: torch.nn.Module):
        check_supported(model, self.name)  # the families kvpress and omnikv both run
        return PressCache(model, build_press(self.press_name, self.press_options), self)

    @contextlib.contextmanager
    def forward_context(self, model: torch.nn.Module, cache, n_tokens: int) -> Iterator[dict[str, Any]]:
        """Around each forward of `n_tokens`: the press's hooks during the prompt's forward (and
        during decoding for a press that compresses then), and the tokens' positions, which the
        model would otherwise read from the shrunken cache's length."""
        kv = _kvpress()
        decoding = isinstance(cache.press, (kv.DecodingPress, kv.PrefillDecodingPress))
        prompt = cache.seen == 0
        if prompt:
            cache.kept_target = self.budget_rule.tokens(n_tokens)
            cache.ratio_set = set_kept(cache.press, cache.kept_target, n_tokens)
            cache.prompt_len = n_tokens
        device = next(model.parameters()).device
        positions = torch.arange(cache.seen, cache.seen + n_tokens, device=device)[None]
        hooks = press_hooks(cache.press, model) if prompt or decoding else contextlib.nullcontext()
        with stock_attention(model), hooks:
            yield {"position_ids": positions}
        cache.seen += n_tokens

    def summarize(self, stats: dict[str, Any], config: dict[str, Any]) -> str:
        return f"kvpress {self.press}, budget {config.get('budget')}"


class PressCache(DynamicCache):
    """transformers' `DynamicCache` for one request, carrying the press and the logical length
    (`seen`: tokens fed, the next position; the cache's own length is what the press kept)."""

    def __init__(self, model: torch.nn.Module, press, method: KVPress) -> None:
        super().__init__(config=model.config)  # sliding layers get transformers' window cache
        self.press = press
        self.method_name = f"kvpress:{method.press}"
        self.seen = 0
        self.prompt_len = 0
        self.kept_target = 0  # the budget's rows for the prompt
        self.ratio_set = False  # whether the press took the budget (it has a compression ratio)

    def stats(self) -> dict[str, Any]:
        """The stats every method's cache has: KV rows on the device, per layer (after the press)."""
        rows, nbytes = [], 0
        for layer in self.layers:
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            n = 0 if keys is None or keys.dim() < 3 else int(keys.shape[-2])
            rows.append(n)
            if n:
                nbytes += keys.numel() * keys.element_size() + values.numel() * values.element_size()
        return {"device_kv_bytes": nbytes, "host_kv_bytes": 0, "h2d_bytes_per_step": 0,
                "attended_tokens_per_layer": rows, "prompt_tokens": self.prompt_len,
                "kept_target": self.kept_target, "press_took_budget": self.ratio_set}
