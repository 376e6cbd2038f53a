"""`omnikv analyze`: inter-layer attention coverage of a model on real prompts (report + plots)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from omnikv.cli.common import add_command
from omnikv.config import ANALYSIS_SELECTORS, HEAD_REDUCTIONS
from omnikv.errors import ConfigError


def register(subparsers) -> None:
    from omnikv.analysis.session import add_input_arguments

    p = add_command(
        subparsers, "analyze", run,
        help="measure how well each layer's top-k covers every other layer's attention",
        description="Run full attention over real prompts and report, for every pair of layers (i, j), "
        "the share of layer j's attention mass on layer i's top-k set; its decay with layer distance; "
        "top-k stability across decode steps; where each layer puts its mass. Writes report.json, "
        "coverage_heatmap.png and coverage_decay.png.",
    )
    add_input_arguments(p)
    p.add_argument("--k", default="64,256,1024",
                   help="comma-separated budgets: tokens or fractions (default 64,256,1024)")
    p.add_argument("--head-reduce", default=",".join(HEAD_REDUCTIONS), help="comma-separated head reductions")
    p.add_argument("--sink", type=int, default=None,
                   help="sink tokens counted in the 'sink+recent' variants (default 4)")
    p.add_argument("--recent", type=int, default=None, help="recent prompt tokens counted likewise (default 64)")
    p.add_argument("--selector", choices=ANALYSIS_SELECTORS, default=None, help="selection scores (default last)")
    p.add_argument("--output-dir", default="omnikv-analysis", help="where report.json and the PNGs go")
    p.add_argument("--no-plots", action="store_true", help="write the JSON report only")


def run(args: argparse.Namespace) -> int:
    from omnikv.analysis.plots import plot_decay, plot_heatmap
    from omnikv.analysis.report import build_report, variant_key
    from omnikv.analysis.session import check_input_args, load, load_preset_settings, record_inputs
    from omnikv.budget import parse_budget

    preset = load_preset_settings(args.preset)
    ks = [parse_budget(x.strip()) for x in args.k.split(",") if x.strip()]
    if args.preset and "budget" in preset and preset["budget"] not in ks:
        ks.insert(0, preset["budget"])
    heads = [h.strip() for h in args.head_reduce.split(",") if h.strip()]
    bad = [h for h in heads if h not in HEAD_REDUCTIONS]
    if bad or not heads or not ks:
        raise ConfigError(
            f"--head-reduce takes {', '.join(HEAD_REDUCTIONS)} and --k at least one budget; got {bad or 'none'}"
        )
    sink = args.sink if args.sink is not None else preset.get("sink_tokens", 4)
    recent = args.recent if args.recent is not None else preset.get("recent_tokens", 64)
    selector = args.selector or preset.get("selector", "last")
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    check_input_args(args)
    lm = load(args.model, args.device)
    records, sources = record_inputs(lm, args)
    report = build_report(records, ks, heads, sink, recent, selector)
    cfg = lm.model.config
    report.update(model=lm.name, model_type=cfg.model_type, num_layers=cfg.num_hidden_layers, sources=sources)
    (out_dir / "report.json").write_text(json.dumps(report) + "\n", encoding="utf-8")
    written = [out_dir / "report.json"]
    main_key = variant_key(ks[0], heads[0], True)
    if not args.no_plots:
        written.append(plot_heatmap(report, main_key, out_dir / "coverage_heatmap.png"))
        topk_only = variant_key(ks[0], heads[0], False)
        written.append(plot_heatmap(report, topk_only, out_dir / "coverage_heatmap_topk_only.png"))
        decay_keys = [variant_key(ks[0], h, sr) for h in heads for sr in (True, False)]
        written.append(plot_decay(report, decay_keys, out_dir / "coverage_decay.png"))
    _print_summary(report, main_key)
    for path in written:
        print(f"wrote {path}")
    return 0


def _print_summary(report: dict, key: str) -> None:
    entry = report["coverage"][key]
    layers = report["layer_ids"]
    n = len(layers)
    m = entry["matrix"]
    nxt = [m[i][i + 1] for i in range(n - 1)]
    print(f"{report['model']}: {n} layers analysed, variant {key}")
    print(f"  own top-k (oracle) mean {sum(entry['oracle']) / n:.3f}; next layer's top-k mean "
          f"{sum(nxt) / max(1, len(nxt)):.3f}")
    worst = sorted(range(n), key=lambda j: max(m[i][j] for i in range(n) if i != j) if n > 1 else 1.0)[:3]
    print("  least covered by any other layer: " + ", ".join(
        f"layer {layers[j]} ({max(m[i][j] for i in range(n) if i != j):.3f})" for j in worst) if n > 1 else "")
    sink = report["mass"]["sink"]
    print(f"  mean attention mass on sink tokens per layer: min {min(sink):.3f}, max {max(sink):.3f}")
