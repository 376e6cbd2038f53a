"""OmniKV configuration: a frozen, validated dataclass.

Every field is checked in `__post_init__` so that a bad value fails at construction with a message
naming the field and the fix. Checks that need the model (layer indices in range, filter layers on
full-attention layers) happen in `validate_for_model`, called when a cache is built.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omnikv.budget import Budget, block_selection, forced_blocks
from omnikv.errors import ConfigError, check_int

# The vocabulary of token selection, in one place: the config, the layers, the CLI flags, the
# analysis and the vLLM plugin all read these.
QUERY_SELECTORS = ("last", "softmax_last")  # scored from the current decode query's logits alone
WINDOW_SELECTORS = ("uniform", "exp", "union")  # scored with an observation window of recent queries
SELECTORS = QUERY_SELECTORS + WINDOW_SELECTORS
ANALYSIS_SELECTORS = QUERY_SELECTORS  # what the analysis scores (one decode query's logits)
HEAD_REDUCTIONS = ("max", "sum", "per_kv_head")

_FITTED: set[tuple[int, int, int]] = set()  # (budget, sink, recent) already warned about
_ROUNDED: set[tuple[int, int]] = set()  # (budget, selection_block) already warned about


@dataclass(frozen=True)
class OmniKVConfig:
    """How OmniKV splits the layers and picks tokens.

    Attributes:
        filter_layers: indices of the filter layers (sorted, distinct). They run full attention and
            pick the tokens the following sparse layers attend to. On hybrid models they must be
            full-attention layers.
        num_wait_layers: dense layers right after each filter layer (paper: 1); they give the
            host->device copy of the selected rows time to land.
        budget: prompt tokens each sparse layer attends to (int), or a fraction of the prompt
            (float in (0, 1]). Sink and recent tokens count inside the budget: an int budget
            smaller than sink_tokens + recent_tokens shrinks both proportionally to fit (with a
            warning, once). A `Budget` is taken as it is and stored as its value.
        selector: how a filter layer scores prompt tokens: `last` (raw scaled logits of the current
            query, the paper's main setting), `softmax_last`, `uniform` / `exp` (per-head softmax
            over an observation window of the last `window_size` queries, summed with uniform or
            2^-age weights), `union` (the union of `last`'s and `uniform`'s best tokens, taken in
            turn: see omnikv.algorithm.selection.union_scores; not in the paper).
        head_reduce: `max` over query heads (paper), `sum` over heads, or `per_kv_head` (one index
            set per KV head: max over the query heads of its group).
        window_size: observation window for `uniform` / `exp` / `union`.
        sink_tokens: first prompt tokens always attended (attention sinks).
        recent_tokens: last prompt tokens always attended.
        offload: keep the sparse layers' KV in host memory (the Context Bank). None = on when the
            model runs on an accelerator, off on CPU.
        refresh_every: re-select every N decode steps (1 = every step, as the paper).
        partial_reload: when a new selection keeps most rows of the last one, move only the rows
            that changed into the working buffer (exact: the attended set is the same). False =
            gather all k rows at every selection, as the paper's code does.
        prefill_chunk_size: default chunk size for chunked prefill in `omnikv.decoding.generation` (None =
            one pass). Results are identical; it bounds activation memory.
        selection_block: the unit of selection. 1 (default): tokens, as the paper. N > 1: blocks of
            N prompt positions (block b = [b*N, (b+1)*N)): the filter layer scores each block by
            the max of its tokens' scores and keeps whole blocks: the top ones, the blocks of the
            sink and recent tokens, and always the last (possibly partial) block. The budget
            rounds up to whole blocks (`omnikv.budget.block_selection`). This is what a paged KV
            cache can attend without copying rows (the vLLM backend uses N = its block size).
    """

    filter_layers: tuple[int, ...] = (2, 8, 18)
    num_wait_layers: int = 1
    budget: int | float = 0.067
    selector: str = "last"
    head_reduce: str = "max"
    window_size: int = 16
    sink_tokens: int = 4
    recent_tokens: int = 64
    offload: bool | None = None
    refresh_every: int = 1
    partial_reload: bool = True
    prefill_chunk_size: int | None = None
    selection_block: int = 1
    # Free-form provenance (e.g. which preset / calibration produced this config). Not used by the
    # algorithm; kept so that results can say where their settings came from.
    source: str = field(default="user", compare=False)

    def __post_init__(self) -> None:
        layers = self.filter_layers
        if isinstance(layers, int) or not isinstance(layers, (tuple, list)):
            raise ConfigError(
                f"filter_layers must be a tuple of layer indices, e.g. (2, 8, 18); got {layers!r}"
            )
        layers = tuple(layers)
        object.__setattr__(self, "filter_layers", layers)
        if not layers:
            raise ConfigError("filter_layers is empty: give at least one filter layer, e.g. (2,)")
        for idx in layers:
            check_int("filter_layers entries", idx, 0)
        if list(layers) != sorted(set(layers)):
            raise ConfigError(
                f"filter_layers must be sorted and distinct; got {layers}, "
                f"use {tuple(sorted(set(layers)))}"
            )
        check_int("num_wait_layers", self.num_wait_layers, 0)
        # The one check of the budget on its way to `k` (ConfigError naming it and the fix); a
        # `Budget` (from a method, already checked) is taken as it is. `resolve_budget` uses it.
        rule = self.budget if isinstance(self.budget, Budget) else Budget(self.budget)
        object.__setattr__(self, "budget", rule.value)
        object.__setattr__(self, "_budget", rule)
        if self.selector not in SELECTORS:
            raise ConfigError(f"selector {self.selector!r} is unknown; choose one of {SELECTORS}")
        if self.head_reduce not in HEAD_REDUCTIONS:
            raise ConfigError(
                f"head_reduce {self.head_reduce!r} is unknown; choose one of {HEAD_REDUCTIONS}"
            )
        check_int("window_size", self.window_size, 1)
        check_int("sink_tokens", self.sink_tokens, 0)
        check_int("recent_tokens", self.recent_tokens, 0)
        check_int("refresh_every", self.refresh_every, 1)
        if not isinstance(self.partial_reload, bool):
            raise ConfigError(f"partial_reload must be true or false; got {self.partial_reload!r}")
        if self.offload is not None and not isinstance(self.offload, bool):
            raise ConfigError(f"offload must be true, false or null (auto); got {self.offload!r}")
        if self.prefill_chunk_size is not None:
            check_int("prefill_chunk_size", self.prefill_chunk_size, 1)
        if isinstance(self.budget, int) and self.budget < self.sink_tokens + self.recent_tokens:
            self._fit_sink_recent()
        check_int("selection_block", self.selection_block, 1)
        if self.selection_block > 1:
            self._check_block_budget()

    def _check_block_budget(self) -> None:
        """Block selection keeps whole blocks: say once when a token budget is not a whole number
        of them (the selection then holds up to selection_block - 1 rows more than asked)."""
        n = self.selection_block
        if isinstance(self.budget, int) and self.budget % n and (self.budget, n) not in _ROUNDED:
            _ROUNDED.add((self.budget, n))
            warnings.warn(
                f"budget={self.budget} tokens is not a multiple of selection_block={n}; whole blocks are "
                f"selected, {-(-self.budget // n)} blocks = {-(-self.budget // n) * n} tokens (give a "
                f"multiple of {n} to silence this)",
                stacklevel=4,
            )

    def _fit_sink_recent(self) -> None:
        """The budget is the user's number: shrink sink and recent proportionally to fit inside it
        (sink' + recent' = budget, each no larger than before; at least one sink token is kept
        when there were sinks: attention sinks matter most) and say so once."""
        budget, sink, recent = self.budget, self.sink_tokens, self.recent_tokens
        new_sink = max(1 if sink else 0, round(sink * budget / (sink + recent)))
        new_recent = min(recent, budget - new_sink)
        new_sink = budget - new_recent
        if (budget, sink, recent) not in _FITTED:
            _FITTED.add((budget, sink, recent))
            warnings.warn(
                f"budget={budget} tokens is smaller than sink_tokens + recent_tokens = {sink + recent}; "
                f"using sink_tokens={new_sink} and recent_tokens={new_recent} to fit inside the budget",
                stacklevel=4,
            )
        object.__setattr__(self, "sink_tokens", new_sink)
        object.__setattr__(self, "recent_tokens", new_recent)

    # ------------------------------------------------------------------ budget
    def resolve_budget(self, prompt_len: int) -> int:
        """Number of prompt rows a sparse layer attends to for a prompt of `prompt_len` tokens.

        `Budget.selected`: a float budget is a fraction of the prompt (rounded up). The result
        never goes below the always-kept sink + recent tokens (so they are never crowded out) nor
        above the prompt.

        With `selection_block` > 1 it is the prompt rows of the selected whole blocks
        (`omnikv.budget.block_selection`): the same for every step of a prompt.
        """
        k = self._budget.selected(prompt_len, sink=self.sink_tokens, recent=self.recent_tokens)
        if self.selection_block == 1:
            return k
        block = self.selection_block
        n, rows = block_selection(prompt_len, k, block, self.sink_tokens, self.recent_tokens)
        forced = len(forced_blocks(prompt_len, block, self.sink_tokens, self.recent_tokens))
        if n == forced < math.ceil(prompt_len / block):
            # Measured (docs/results.md, "Block vs token selection"): Gemma 3 at 2K with blocks of
            # 128 and a 205-token budget kept only the sink and last blocks and missed 17 of 20
            # needles that token selection found.
            warnings.warn(
                f"selection_block={block}: a budget of {k} tokens on a {prompt_len}-token prompt is {n} "
                f"blocks, all of them forced (sink, recent and last block), so no block of the context "
                f"is selected; raise the budget to at least {(forced + 1) * block} tokens or use smaller "
                "blocks", UserWarning, stacklevel=2)
        return rows

    @property
    def uses_query_window(self) -> bool:
        """The selector scores with an observation window of recent queries (filter layers keep
        one; static steps and the analysis cannot)."""
        return self.selector in WINDOW_SELECTORS

    # ------------------------------------------------------------------ model checks
    def validate_for_model(self, num_layers: int, full_attention_layers: list[int]) -> None:
        """Check the layer indices against a model with `num_layers` layers."""
        for idx in self.filter_layers:
            if idx >= num_layers:
                raise ConfigError(
                    f"filter_layers contains {idx}, but the model has {num_layers} layers "
                    f"(valid indices 0..{num_layers - 1})"
                )
            if idx not in full_attention_layers:
                raise ConfigError(
                    f"filter layer {idx} is a sliding-window layer; OmniKV filter layers must be "
                    f"full-attention layers, which on this model are {full_attention_layers}"
                )

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["filter_layers"] = list(self.filter_layers)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str | None = None) -> OmniKVConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - _PRESET_METADATA_KEYS)
        if unknown:
            raise ConfigError(
                f"unknown OmniKV config keys {unknown}; valid keys are {sorted(known)}"
            )
        kwargs = {k: v for k, v in data.items() if k in known}
        if "filter_layers" in kwargs and isinstance(kwargs["filter_layers"], list):
            kwargs["filter_layers"] = tuple(kwargs["filter_layers"])
        if source is not None:
            kwargs["source"] = source
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> OmniKVConfig:
        """Load a preset file (as written by `omnikv calibrate --output`)."""
        return cls.from_json_with_metadata(path)[0]

    @classmethod
    def from_json_with_metadata(cls, path: str | Path) -> tuple[OmniKVConfig, dict[str, Any]]:
        """A preset file's config and, from the same read, the metadata keys it carries
        (`model_type`, `num_layers`, ...: what model it was made for)."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"preset file {p} does not exist")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"preset file {p} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"preset file {p} must hold a JSON object")
        metadata = {k: v for k, v in data.items() if k in _PRESET_METADATA_KEYS}
        return cls.from_dict(data, source=str(p)), metadata

    def replace(self, **changes: Any) -> OmniKVConfig:
        changes.setdefault("budget", self._budget)  # checked once already: carried, not re-checked
        return dataclasses.replace(self, **changes)


# Keys a preset file may carry besides the config fields: what model it was made for.
_PRESET_METADATA_KEYS = frozenset({"model_type", "num_layers", "name", "notes", "coverage"})

