"""The Method interface: one configured KV-cache policy, able to make a cache per request."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from omnikv.config import _check_budget


class Method(ABC):
    """A named, configured KV-cache method.

    `budget` means the same for every method: the number of *prompt* tokens a budgeted layer
    attends to at a decode step (int), or that number as a fraction of the prompt (float in
    (0, 1]). Which layers are budgeted, and what stays on the device, each method states in
    `describe()` (see docs/methods.md).
    """

    name: ClassVar[str]
    lossy: ClassVar[bool] = False  # True when tokens are evicted for good
    supports_batch: ClassVar[bool] = True
    supports_static: ClassVar[bool] = False  # has a static-shape decode step (omnikv/static.py)
    # Set by `get_method` from the options static= / compile= / compile_backend= / compile_mode=.
    static: bool = False  # static-shape decode steps, eager
    compile: bool = False  # ... captured with torch.compile (implies static)
    compile_backend: str | None = None  # default inductor
    compile_mode: str | None = None  # default: reduce-overhead (CUDA graphs) on CUDA

    def __init__(self, budget: int | float | None = None) -> None:
        if budget is not None:
            _check_budget(budget)
        self.budget = budget

    @abstractmethod
    def make_cache(self, model: torch.nn.Module):
        """A fresh `transformers.Cache` for one request (or one batch)."""

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "budget": self.budget, "lossy": self.lossy}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"
