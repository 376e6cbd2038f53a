"""The Method interface: one configured KV-cache policy, able to make a cache per request.

A method is a small validated dataclass (fields = its options, checked in `__post_init__`) that
owns everything callers would otherwise switch on its name for: whether it takes a budget
(`takes_budget`), whether a benchmark must run a real prefill before timing it
(`needs_real_prefill`), its memory plan for a model shape and a context (`kv_plan`), and the one
line that summarises its configuration next to a result (`summarize`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, ContextManager

import torch

from omnikv.budget import Budget
from omnikv.config import OmniKVConfig
from omnikv.errors import ConfigError, check_int

if TYPE_CHECKING:
    from omnikv.methods.memory import KVContext, KVPlan

# The budget of the budgeted baselines when none is given: OmniKV's, for comparability.
DEFAULT_BUDGET: int | float = OmniKVConfig().budget

__all__ = ["DEFAULT_BUDGET", "Method", "check_int"]  # check_int (omnikv.errors) for the methods' validate()


@dataclass(eq=False)
class Method(ABC):
    """A named, configured KV-cache method.

    `budget` means the same for every method: the number of *prompt* tokens a budgeted layer
    attends to at a decode step (int), or that number as a fraction of the prompt (float in
    (0, 1]); see `omnikv.budget.Budget`. Which layers are budgeted, and what stays on the device,
    each method states in `describe()` (see docs/methods.md).
    """

    budget: int | float | None = None
    # Static-shape decode steps (omnikv/hf/static.py), for a method with `supports_static`; a
    # method without one refuses them. `compile` (or a backend / mode) implies `static`.
    static: bool = False  # static-shape decode steps, eager
    compile: bool = False  # ... captured with torch.compile
    compile_backend: str | None = None  # default inductor
    compile_mode: str | None = None  # default: reduce-overhead (CUDA graphs) on CUDA

    name: ClassVar[str]
    lossy: ClassVar[bool] = False  # True when tokens are evicted for good
    supports_batch: ClassVar[bool] = True
    takes_budget: ClassVar[bool] = True  # False: exact full attention, a budget means nothing
    # True when the method decides what to keep from the prefill's attention (H2O, SnapKV): a
    # cache filled with synthetic KV through `cache.update` would time a different method.
    needs_real_prefill: ClassVar[bool] = False
    default_budget: ClassVar[int | float | None] = None  # used when no budget is given
    supports_static: ClassVar[bool] = False  # has a static-shape decode step (omnikv/hf/static.py)
    # True when the prompt must reach the cache in one forward (a kvpress press compresses at the
    # end of that forward): callers do not chunk its prefill.
    prefill_in_one_forward: ClassVar[bool] = False
    # The option a method spec may give without its key, right after the name (`kvpress:SnapKVPress`).
    positional_option: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        if self.budget is None:
            self.budget = self.default_budget
        # The one check of a method's budget (ConfigError naming the bad value); what uses it
        # (OmniKV's config, the lossy layers, Quest) gets `budget_rule`, not the raw value again.
        self.budget_rule: Budget | None = None if self.budget is None else Budget(self.budget)
        self._check_static()
        self.validate()

    def _check_static(self) -> None:
        for key in ("static", "compile"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, bool):
                raise ConfigError(f"{key} must be true or false; got {value!r}")
        self.compile = bool(self.compile) or bool(self.compile_backend) or bool(self.compile_mode)
        self.static = bool(self.static) or self.compile
        if self.static and not self.supports_static:
            from omnikv.methods import available_methods, method_class

            supported = ", ".join(n for n in available_methods() if method_class(n).supports_static)
            raise ConfigError(
                f"method {self.name!r} cannot be compiled: its decode step changes shape from step to step. "
                f"static=true / compile=true work with: {supported}"
            )

    def validate(self) -> None:
        """Check the method's own options (ConfigError naming the option and the fix)."""

    # -- construction from user options ---------------------------------------------------------
    @classmethod
    def option_names(cls) -> frozenset[str]:
        """The options `from_options` accepts (the dataclass fields)."""
        return frozenset(f.name for f in dataclasses.fields(cls) if f.init)

    @classmethod
    def from_options(cls, **options: Any) -> Method:
        """A method from the options users give (`get_method(name, **options)`)."""
        unknown = sorted(set(options) - cls.option_names())
        if unknown:
            raise ConfigError(
                f"bad options for method {cls.name!r}: {', '.join(unknown)}; it takes "
                f"{', '.join(sorted(cls.option_names()))}"
            )
        return cls(**options)

    # -- what callers ask -----------------------------------------------------------------------
    @abstractmethod
    def make_cache(self, model: torch.nn.Module):
        """A fresh `transformers.Cache` for one request (or one batch)."""

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "budget": self.budget, "lossy": self.lossy}

    def forward_context(self, model: torch.nn.Module, cache: Any, n_tokens: int) -> ContextManager[dict[str, Any]]:
        """Entered around each forward of `n_tokens` through `cache` (omnikv.decoding's Session);
        yields extra keyword arguments for the model. Default: nothing to add. Another library's
        method (kvpress, omnikv/methods/presses.py) hooks the model here."""
        return contextlib.nullcontext({})

    def kv_plan(self, ctx: KVContext) -> KVPlan:
        """KV bytes one request needs on the device and in host memory (see methods/memory.py).
        Default: every row of every layer on the device, as full attention."""
        from omnikv.methods.memory import KVPlan

        return KVPlan(device_kv_bytes=ctx.full_kv_bytes, host_kv_bytes=0, offload=False)

    def summarize(self, stats: dict[str, Any], config: dict[str, Any]) -> str:
        """One line on the configuration a result ran with (`omnikv compare`)."""
        if config.get("budget") is not None:
            return f"budget {config['budget']}"
        return str(config.get("note", "exact"))
