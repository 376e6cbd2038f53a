"""Method spec strings: `name[:key=value[:key=value]]`, e.g. `omnikv:selector=uniform:budget=0.2`.

One syntax for every command that compares methods (`omnikv bench --methods`, `omnikv eval
--methods`), so that variants of one method can run side by side under their own labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omnikv.errors import ConfigError


@dataclass(frozen=True)
class MethodSpec:
    """One configuration to run: `label` is the spec as written (the name shown in tables),
    `name` the registry method, `options` its constructor options."""

    label: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def takes_budget(self) -> bool:
        """Whether the method takes a budget (exact full attention does not)."""
        from omnikv.methods import method_class

        return method_class(self.name).takes_budget


def _parse_value(raw: str) -> Any:
    low = raw.lower()
    if low in ("true", "on", "yes"):
        return True
    if low in ("false", "off", "no"):
        return False
    if low in ("none", "null", "auto"):
        return None
    if "/" in raw:  # a tuple of ints, e.g. filter_layers=2/8/18
        return tuple(int(x) for x in raw.split("/") if x)
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def _split_top(text: str, sep: str) -> list[str]:
    """`text` split on `sep` outside parentheses (a kvpress press's options hold commas)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _positional(name: str, part: str, text: str) -> str:
    """The option a method takes without a key (`kvpress:SnapKVPress`: its `press`)."""
    from omnikv.methods import method_class

    key = getattr(method_class(name), "positional_option", None)
    if key is None:
        raise ConfigError(f"bad option {part!r} in {text!r}; options are key=value")
    return key


def parse_method(text: str) -> MethodSpec:
    """`omnikv:offload=false:filter_layers=2/8/18` -> MethodSpec; `kvpress:SnapKVPress(window_size=16)`
    (a method's positional option, here kvpress's press, right after its name); ConfigError on a
    malformed spec."""
    parts = _split_top(text.strip(), ":")
    name, options = parts[0], {}
    if not name:
        raise ConfigError(f"bad method spec {text!r}; use name or name:key=value, e.g. omnikv:offload=false")
    for i, part in enumerate(parts[1:]):
        if "=" not in part.split("(")[0]:
            if i > 0:
                raise ConfigError(f"bad option {part!r} in {text!r}; options are key=value")
            options[_positional(name, part, text)] = part.strip()
            continue
        key, raw = part.split("=", 1)
        try:
            value = _parse_value(raw)
        except ValueError:
            raise ConfigError(f"bad value {raw!r} for {key} in {text!r}") from None
        if key.endswith("_layers") and key != "num_wait_layers" and isinstance(value, int):
            value = (value,)  # filter_layers=3 means the one layer 3
        options[key] = value
    return MethodSpec(label=text.strip(), name=name, options=options)


def with_compile(spec: MethodSpec) -> MethodSpec:
    """`spec` with compile=true when its method has a static-shape step, others unchanged (what a
    command's `--compile` flag does to each method it runs: `full` stays eager, `omnikv` compiles)."""
    from omnikv.methods import method_class

    if spec.options.get("compile") is not None or not method_class(spec.name).supports_static:
        return spec
    return parse_method(spec.label + ":compile=true")


def split_specs(text: str) -> list[str]:
    """Comma-separated specs as written (commas inside a press's parentheses do not split)."""
    return [x.strip() for x in _split_top(text, ",") if x.strip()]


def parse_methods(text: str) -> list[MethodSpec]:
    """Comma-separated specs."""
    return [parse_method(x) for x in split_specs(text)]


@dataclass(frozen=True)
class BudgetPlan:
    """The budget each spec of a multi-method run gets (what `omnikv eval` / `omnikv bench` pass
    to `get_method`): one `common` budget for every budgeted method, except the specs whose own
    options set a budget (`own`, label -> budget). Unbudgeted methods (full attention) get None."""

    budgets: dict[str, int | float | None]
    common: int | float
    common_source: str  # "--budget" or "default"
    own: dict[str, int | float]

    @property
    def unequal(self) -> bool:
        """True when budgeted methods run at different budgets (a per-method budget differs)."""
        used = {b for label, b in self.budgets.items() if b is not None}
        return len(used) > 1

    def warning(self) -> str | None:
        """The loud line every report prints when the budgets differ; None when they are equal."""
        if not self.unequal:
            return None
        parts = ", ".join(f"{label} {b}" for label, b in self.budgets.items() if b is not None)
        return (f"WARNING: methods run at DIFFERENT budgets ({parts}): their scores and speeds are not "
                f"comparable at equal cost; drop the per-method budget options for one budget ({self.common})")

    def to_json(self) -> dict[str, Any]:
        return {"common": self.common, "common_source": self.common_source, "own": dict(self.own),
                "per_method": dict(self.budgets), "unequal": self.unequal}


def plan_budgets(specs: list[MethodSpec], budget: int | float | None, default: int | float) -> BudgetPlan:
    """One budget for every budgeted spec: `budget` (the command's --budget) or else `default`;
    a spec whose options hold `budget` keeps its own (and the plan says the budgets differ).
    A spec's own budget on a method that takes none is refused."""
    from omnikv.budget import Budget

    common = Budget(budget if budget is not None else default).value
    budgets: dict[str, int | float | None] = {}
    own: dict[str, int | float] = {}
    for spec in specs:
        value = spec.options.get("budget")
        if not spec.takes_budget:
            if value is not None:
                raise ConfigError(f"{spec.label}: {spec.name} is exact full attention and takes no budget")
            budgets[spec.label] = None
        elif value is not None:
            own[spec.label] = budgets[spec.label] = Budget(value).value
        else:
            budgets[spec.label] = common
    return BudgetPlan(budgets, common, "--budget" if budget is not None else "default", own)
