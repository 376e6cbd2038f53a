"""Layer roles: which layers are dense, filter, sparse (or untouched sliding-window layers)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from omnikv.config import OmniKVConfig
from omnikv.errors import ConfigError


class Role(str, Enum):
    DENSE = "dense"  # full attention, never selects (before the first filter, and wait layers)
    FILTER = "filter"  # full attention + picks the top-k for its segment
    SPARSE = "sparse"  # attends to the selected prompt rows + all generated tokens
    SLIDING = "sliding"  # hybrid models: sliding-window layer, kept exact with its own window cache


@dataclass(frozen=True)
class LayerPlan:
    """Roles of every layer and, for sparse layers, the filter layer whose indices they use."""

    roles: tuple[Role, ...]
    source_filter: tuple[int | None, ...]  # per layer: the filter layer a sparse layer follows

    @property
    def num_layers(self) -> int:
        return len(self.roles)

    def layers_with(self, role: Role) -> list[int]:
        return [i for i, r in enumerate(self.roles) if r is role]

    def segment(self, filter_layer: int) -> list[int]:
        """Sparse layers that use `filter_layer`'s indices, in order."""
        return [i for i, f in enumerate(self.source_filter) if f == filter_layer]

    def summary(self) -> str:
        def fmt(role: Role) -> str:
            return ",".join(map(str, self.layers_with(role))) or "-"

        return (
            f"dense=[{fmt(Role.DENSE)}] filter=[{fmt(Role.FILTER)}] sparse=[{fmt(Role.SPARSE)}]"
            + (f" sliding=[{fmt(Role.SLIDING)}]" if self.layers_with(Role.SLIDING) else "")
        )


def plan_layers(config: OmniKVConfig, layer_types: list[str]) -> LayerPlan:
    """Assign roles following the paper's layer split (docs/how-it-works.md), over the full-attention layers only.

    Layers before the first filter are dense; each filter layer is followed by `num_wait_layers`
    dense full-attention layers; every other full-attention layer is sparse and follows the
    nearest preceding filter. Sliding-window layers keep their role.
    """
    full = [i for i, t in enumerate(layer_types) if t == "full_attention"]
    config.validate_for_model(len(layer_types), full)
    roles: list[Role] = [Role.SLIDING] * len(layer_types)
    source: list[int | None] = [None] * len(layer_types)
    filters = set(config.filter_layers)
    current: int | None = None
    wait_left = 0
    for i in full:
        if i in filters:
            roles[i] = Role.FILTER
            current, wait_left = i, config.num_wait_layers
        elif current is None or wait_left > 0:
            roles[i] = Role.DENSE
            wait_left = max(wait_left - 1, 0)
        else:
            roles[i] = Role.SPARSE
            source[i] = current
    if Role.SPARSE not in roles:
        raise ConfigError(
            f"filter_layers={config.filter_layers} with num_wait_layers={config.num_wait_layers} leave no "
            f"sparse layer among the full-attention layers {full}: every layer would be dense. Lower "
            f"num_wait_layers or put a filter layer earlier"
        )
    return LayerPlan(tuple(roles), tuple(source))
