"""`omnikv calibrate`: choose filter layers for a model from its own attention, write a preset."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

from omnikv.cli.common import add_command
from omnikv.config import ANALYSIS_SELECTORS, HEAD_REDUCTIONS
from omnikv.errors import ConfigError

# Above this many candidate sets the exhaustive cross-check of the DP result is skipped.
_EXHAUSTIVE_CHECK_MAX = 200_000


def register(subparsers) -> None:
    from omnikv.analysis.session import add_input_arguments

    p = add_command(
        subparsers, "calibrate", run,
        help="choose dense and filter layers that maximise the sparse layers' attention coverage",
        description="Record the model's attention on real prompts (--input / --task; default: the built-in "
        "narrative haystack at a length that suits the model), choose the filter layers (and so the "
        "leading dense layers) whose selections cover the sparse layers' attention best under a cap "
        "on dense layers, compare with the paper-style choice, and write a preset file (--output) "
        "that commands accept with --preset.",
    )
    add_input_arguments(p, model_required=False)
    p.add_argument("--from-report", metavar="FILE",
                   help="reuse the coverage recorded by `omnikv analyze` (its report.json) instead of running "
                   "the model; the report must hold the variant for --budget / --head-reduce with sink+recent")
    p.add_argument("--num-filters", type=int, default=3, help="filter layers to choose (default 3)")
    p.add_argument("--num-wait", type=int, default=None, help="dense wait layers after each filter (default 1)")
    p.add_argument("--budget", default=None,
                   help="prompt tokens a sparse layer attends: int or fraction (default 0.067)")
    p.add_argument("--head-reduce", choices=HEAD_REDUCTIONS, default=None, help="default max")
    p.add_argument("--selector", choices=ANALYSIS_SELECTORS, default=None, help="default last")
    p.add_argument("--sink", type=int, default=None, help="sink tokens always kept (default 4)")
    p.add_argument("--recent", type=int, default=None, help="recent prompt tokens always kept (default 64)")
    p.add_argument("--method", choices=("dp", "greedy", "exhaustive"), default="dp", help="search (default dp, exact)")
    p.add_argument("--max-dense", type=int, default=None,
                   help="most dense layers allowed (default: as many as the baseline choice)")
    p.add_argument("--baseline", default=None,
                   help="comma-separated filter layers to compare with (default: --preset's, else paper-style 2,8,18)")
    p.add_argument("--output", metavar="FILE", help="write the calibrated preset here (JSON)")
    p.add_argument("--report", metavar="FILE", help="write the coverage matrix and the comparison here (JSON)")


@dataclass(frozen=True)
class _Settings:
    """The calibration settings: flags over the --preset file's values over the defaults."""

    budget: int | float
    num_wait: int
    head_reduce: str
    selector: str
    sink: int
    recent: int


def _settings(args: argparse.Namespace, preset: dict) -> _Settings:
    from omnikv.analysis.preset import make_preset
    from omnikv.budget import parse_budget

    budget = parse_budget(args.budget) if args.budget is not None else preset.get("budget", 0.067)
    num_wait = args.num_wait if args.num_wait is not None else preset.get("num_wait_layers", 1)
    head_reduce = args.head_reduce or preset.get("head_reduce", "max")
    selector = args.selector or preset.get("selector", "last")
    sink = args.sink if args.sink is not None else preset.get("sink_tokens", 4)
    recent = args.recent if args.recent is not None else preset.get("recent_tokens", 64)
    if args.output and Path(args.output).parent and not Path(args.output).parent.exists():
        raise ConfigError(f"--output directory {Path(args.output).parent} does not exist")
    # Validate the settings before the (slow) recording; an int budget below sink + recent fits
    # them inside it (as the config does), and the coverage is measured with what will be written.
    checked = make_preset([0], num_wait, budget, sink, recent, selector, head_reduce, "check", 1)
    return _Settings(budget, num_wait, head_reduce, selector, checked["sink_tokens"], checked["recent_tokens"])


def _coverage(args: argparse.Namespace, st: _Settings):
    """(coverage matrix, layer ids, model name, model type, layers, sources): from --from-report,
    or recorded on --model's attention."""
    from omnikv.analysis.report import pooled_coverage
    from omnikv.analysis.session import check_input_args, load, record_inputs

    if args.from_report:
        return _from_report(args.from_report, st.budget, st.head_reduce, st.sink, st.recent, st.selector)
    if not args.model:
        raise ConfigError("give --model (prompts optional: the built-in narrative haystack by default), "
                          "or --from-report REPORT.json")
    check_input_args(args, require_inputs=False)  # none given: the built-in haystack
    lm = load(args.model, args.device)
    records, sources = record_inputs(lm, args, require_inputs=False)
    cov = pooled_coverage(records, st.budget, st.head_reduce, st.sink, st.recent, st.selector)
    return (cov, records[0].layer_ids, lm.name, lm.model.config.model_type, lm.model.config.num_hidden_layers,
            sources)


def _baseline(args: argparse.Namespace, preset: dict, layer_ids: list[int]) -> tuple[list[int], str]:
    """The choice to compare with, as indices into layer_ids, and its name."""
    from omnikv.analysis.layout import paper_style_filters

    if args.baseline:
        base_model, base_name = [int(x) for x in args.baseline.split(",") if x.strip()], "baseline (--baseline)"
    elif preset.get("filter_layers"):
        base_model, base_name = list(preset["filter_layers"]), f"baseline ({args.preset})"
    else:
        return paper_style_filters(len(layer_ids), args.num_filters), "paper-style"
    missing = [x for x in base_model if x not in layer_ids]
    if missing:
        raise ConfigError(f"baseline filter layers {missing} are not full-attention layers of this model")
    return [layer_ids.index(x) for x in base_model], base_name


def _choices(args: argparse.Namespace, cov, num_wait: int, max_dense: int, baseline) -> tuple[list, bool | None]:
    """(name, score) rows: the calibrated choice, the baseline, the exhaustive optimum when the DP
    missed it (checked when small enough) and greedy; and whether the exhaustive check passed."""
    from omnikv.analysis.search import choose_filter_layers

    n = cov.shape[0]
    chosen = choose_filter_layers(cov, args.num_filters, num_wait, args.method, max_dense)
    rows = [(f"calibrated ({args.method})", chosen), baseline]
    check = None
    if args.method != "exhaustive" and math.comb(n, args.num_filters) <= _EXHAUSTIVE_CHECK_MAX:
        exhaustive = choose_filter_layers(cov, args.num_filters, num_wait, "exhaustive", max_dense)
        check = abs(exhaustive.missed_mass - chosen.missed_mass) < 1e-9
        if not check:
            rows.append(("exhaustive", exhaustive))
    if args.method != "greedy":
        try:
            rows.append(("greedy", choose_filter_layers(cov, args.num_filters, num_wait, "greedy", max_dense)))
        except ConfigError:
            pass  # greedy can paint itself into a corner under the dense cap; DP cannot
    return rows, check


def run(args: argparse.Namespace) -> int:
    from omnikv.analysis.layout import layer_layout, score_layout
    from omnikv.analysis.preset import make_preset, write_preset
    from omnikv.analysis.session import load_preset_settings

    preset = load_preset_settings(args.preset)
    st = _settings(args, preset)
    cov, layer_ids, model_name, model_type, num_layers, sources = _coverage(args, st)
    n = len(layer_ids)
    if not 1 <= args.num_filters <= n:
        raise ConfigError(f"--num-filters must be in 1..{n} for this model")
    base, base_name = _baseline(args, preset, layer_ids)
    base_score = score_layout(cov, base, st.num_wait)
    max_dense = args.max_dense if args.max_dense is not None else base_score.num_dense
    rows, check = _choices(args, cov, st.num_wait, max_dense, (base_name, base_score))
    chosen = rows[0][1]

    to_model = lambda layers: [layer_ids[i] for i in layers]  # noqa: E731
    print(f"{model_name}: {n} layers, budget {st.budget}, head_reduce {st.head_reduce}, selector {st.selector}, "
          f"sink {st.sink}, recent {st.recent}, wait {st.num_wait}, at most {max_dense} dense layers")
    print(f"{'choice':<28} {'filter layers':<18} {'dense':>5} {'sparse':>6} {'sparse cov':>10} {'all-layer cov':>13}")
    for name, sc in rows:
        print(f"{name:<28} {','.join(map(str, to_model(sc.filter_layers))):<18} {sc.num_dense:>5} {sc.num_sparse:>6} "
              f"{sc.mean_sparse_coverage:>10.4f} {sc.mean_all_coverage:>13.4f}")
    lay = layer_layout(chosen.filter_layers, st.num_wait, n)
    idle = [layer_ids[f] for f in chosen.filter_layers if f not in lay.source]
    if idle:
        # Legal and sometimes optimal: near the end a "filter" is the cheapest way to keep a layer dense.
        print(f"note: filter layer(s) {idle} serve no sparse layer; they only keep those layers dense")
    if check is not None:
        print(f"exhaustive check: {'DP result is optimal' if check else 'MISMATCH (see rows above)'}")

    preset_out = make_preset(to_model(chosen.filter_layers), st.num_wait, st.budget, st.sink, st.recent,
                             st.selector, st.head_reduce, model_type, num_layers)
    if args.output:
        print(f"wrote {write_preset(args.output, preset_out)}")
    if args.report:
        report = {
            "model": model_name, "sources": sources, "layer_ids": layer_ids, "preset": preset_out,
            "max_dense": max_dense, "exhaustive_check": check,
            "choices": [{"name": name, **sc.as_dict(), "filter_layers": to_model(sc.filter_layers)} for name, sc in rows],
            "coverage": [[round(float(x), 5) for x in row] for row in cov],
        }
        Path(args.report).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.report}")
    return 0


def _from_report(path: str, budget, head_reduce: str, sink: int, recent: int, selector: str):
    """Coverage matrix and model facts from an `omnikv analyze` report.json."""
    import torch

    from omnikv.analysis.report import variant_key

    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"report {path} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"report {path} is not valid JSON: {exc}") from None
    settings = report.get("settings", {})
    if (settings.get("sink"), settings.get("recent"), settings.get("selector")) != (sink, recent, selector):
        raise ConfigError(
            f"report {path} was made with sink={settings.get('sink')}, recent={settings.get('recent')}, "
            f"selector={settings.get('selector')}; pass the same --sink/--recent/--selector or re-run analyze"
        )
    key = variant_key(budget, head_reduce, True)
    if key not in report.get("coverage", {}):
        have = sorted(k for k in report.get("coverage", {}) if k.endswith("sink+recent"))
        raise ConfigError(f"report {path} has no variant {key}; it has {have}: choose --budget/--head-reduce from them")
    cov = torch.tensor(report["coverage"][key]["matrix"], dtype=torch.float64)
    return (cov, report["layer_ids"], report.get("model", "?"), report.get("model_type", "?"),
            report.get("num_layers", len(report["layer_ids"])), report.get("sources", []))
