"""One-call GPU benchmark of OmniKV on a random-weight model with Llama-3-8B's shapes.

Run through `benchmarks/gpu/run.sh` (paths, the transformers check, a hard time limit, the table
even after a crash). The default run is planned to end within 4 minutes on an H100 or H200; the
estimates below are from bytes, op counts and compile times reported elsewhere (no GPU run has
measured them yet), and each stage starts only when its estimate fits in what is left of the
budget (`--budget-seconds`, default 225 s from process start), otherwise it is recorded as
skipped. Stages, in the order they run (L = largest context, 128K; S = smallest, 32K):

  stage                 est. s  what
  bandwidths                10  HBM read, host->device copy from registered memory, a gather kernel
                                over mapped host memory (after the child-process mapped-memory probe)
  correctness               20  small fp32 model: OmniKV full budget == full; offload on == off (CUDA
                                transfer); the partial reload (the Triton kernel) == off
  timing L eager            30  random Llama-3-8B (bf16) built; offload on, host gather, stock full,
                                full_prealloc, interleaved (32 steps)
  timing L captured        120  static steps compiled with CUDA graphs (inductor, reduce-overhead):
                                OmniKV offload and full_prealloc, beside stock full (two compiles)
  trace S                   10  torch.profiler over 4 offload steps: host->device overlap
  throughput L              35  largest batch each of full_prealloc and OmniKV offload fits
  timing S eager            15
  timing L offload_off      15  OmniKV offload off beside offload on
  prefill S                 10  one real chunked prefill with offload: seconds, device peak
  limits                     0  longest prompt each method fits (plan_memory; arithmetic)
  timing S captured         90  (only when the compiles above were faster than estimated)
  timing S offload_off      10

Groups are timed one at a time and every cache is freed between them (table: `group`), so 128K
fits an H100 80GB; a method that fails (out of memory, not capturable) is recorded with its reason
and the others go on. A stage still running when the budget ends (a compile slower than its
estimate) is cut and recorded as failed, and the table is printed. Every stage's result is written to $OUT/summary.json as soon as it ends.
The last thing printed is the summary table (table.py): each target met / not met / not
measurable, with the reason.

`--tiny`: tiny shapes. `--device cpu` keeps every tensor on the CPU while torch.cuda is called as
on a GPU: the CI rehearsal (tests/test_gpu_rehearsal.py), with a fake torch.cuda, prints the same
table with "simulated" in place of numbers.
"""

from __future__ import annotations

import time

_START = time.perf_counter()  # the budget counts the imports too

import argparse  # noqa: E402
import contextlib  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import stages  # noqa: E402  (benchmarks/gpu/stages.py)
import table  # noqa: E402  (benchmarks/gpu/table.py)

LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=14336, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=1 << 20)
TINY = dict(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=512, rope_theta=500000.0, max_position_embeddings=1 << 20)
STAGES = ("bandwidths", "correctness", "timing", "trace", "throughput", "prefill", "limits")
# (stage, context: "L" | "S" | None, timing group, estimated seconds on an H100 / H200)
PLAN = (
    ("bandwidths", None, None, 10), ("correctness", None, None, 20),
    ("timing", "L", "eager", 30), ("timing", "L", "captured", 120), ("trace", "S", None, 10),
    ("throughput", "L", None, 35), ("timing", "S", "eager", 15), ("timing", "L", "offload_off", 15),
    ("prefill", "S", None, 10), ("limits", None, None, 0), ("timing", "S", "captured", 90),
    ("timing", "S", "offload_off", 10),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for summary.json, table.txt, the trace, bench.png")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (the rehearsal; a quick smoke test on a GPU)")
    p.add_argument("--device", default=None, help="where tensors live (default cuda; cpu = the rehearsal, with a fake torch.cuda)")
    p.add_argument("--budget-seconds", type=float, default=None, help="wall-clock budget from process start (default 225)")
    p.add_argument("--contexts", default=None, help="default 32k,128k (tiny 256)")
    p.add_argument("--budget", type=int, default=2048, help="tokens per sparse layer (the paper's latency setting 2048)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend of the captured rows (default inductor with CUDA graphs; the rehearsal: eager)")
    p.add_argument("--stage", choices=STAGES, action="append", default=None, help="run only this stage (repeatable)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from omnikv.bench.report import finish_metadata, run_metadata, write_json_atomic
    from omnikv.bench.run import parse_contexts

    if not torch.cuda.is_available():
        print("error: no CUDA device; run this on a GPU machine (the CPU rehearsal of this script is "
              "tests/test_gpu_rehearsal.py)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clock = stages.Clock(args.budget_seconds or 225.0)
    clock.t0 = _START
    device = torch.device(args.device) if args.device else torch.device("cuda", torch.cuda.current_device())
    rig = stages.Rig(device, cuda=True, tiny=args.tiny, clock=clock, out=out,
                     compile_backend=args.compile_backend)
    contexts = sorted(set(parse_contexts(args.contexts or ("256" if args.tiny else "32k,128k"))))
    budget = min(args.budget, 96) if args.tiny else args.budget
    labels = stages.Labels.make(budget, args.compile_backend)
    if rig.simulated:
        torch.set_num_threads(1)  # tiny tensors on a shared CPU: more threads only add contention
    torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 for the correctness stage
    warnings.filterwarnings("ignore", message="no OmniKV preset")
    import transformers

    from omnikv.hf.compat import version_note

    stages.log(f"{version_note()}; python {sys.version.split()[0]}, torch {torch.__version__}, transformers "
               f"{transformers.__version__}, {torch.cuda.get_device_name(rig.device)}")
    stages.log(f"device {rig.device}; budget {clock.total:.0f} s; tiny={args.tiny}")

    meta = run_metadata(["benchmarks/gpu/run.sh", *(sys.argv[1:] if argv is None else argv)], rig.device,
                        probe_bandwidth=False)
    props = torch.cuda.get_device_properties(rig.device)
    meta["gpu"] = {"name": props.name, "memory_bytes": props.total_memory, "capability": f"{props.major}.{props.minor}"}
    summary: dict[str, Any] = {"metadata": meta, "simulated": rig.simulated, "contexts": contexts,
                               "labels": labels.__dict__, "stages": {}, "timing": [], "notes": []}

    def save() -> None:  # after every stage: a run cut short still leaves what it measured
        summary["elapsed_seconds"] = round(clock.elapsed(), 1)
        write_json_atomic(out / "summary.json", summary)  # a kill mid-write leaves the previous one

    save()
    runner = _Runner(rig, args, labels, contexts, summary, save)
    for stage, which, group, estimate in PLAN:
        runner.run(stage, which, group, estimate)
    finish_metadata(meta)
    if runner.model is not None:
        summary["bounds"] = table.bounds(summary["timing"], summary.get("bandwidths") or {}, summary["model"])
    summary["targets"] = table.targets(summary)
    _plot(summary, out)
    save()
    text = table.render(summary)
    (out / "table.txt").write_text(text + "\n", encoding="utf-8")
    print(text, flush=True)
    failed = [n for n, s in summary["stages"].items() if s["status"] == "failed"]
    passed = all(v.get("passed") for v in (summary.get("correctness") or {}).values())
    return 0 if passed and not failed else 1


class _Runner:
    """Runs the plan's stages in order: the time check, the model (built once, when first
    needed), errors recorded per stage, the summary saved after each."""

    def __init__(self, rig, args, labels, contexts, summary, save) -> None:
        self.rig, self.args, self.labels, self.summary, self.save = rig, args, labels, summary, save
        self.small, self.large = contexts[0], contexts[-1]
        self.wanted = set(args.stage or STAGES)
        self.model = None
        self.done: set[str] = set()

    def run(self, stage: str, which: str | None, group: str | None, estimate: float) -> None:
        ctx = {"L": self.large, "S": self.small, None: None}[which]
        name = " ".join(str(x) for x in (stage, ctx, group) if x is not None)
        if stage not in self.wanted or name in self.done:  # one context: S and L name the same stage
            return
        self.done.add(name)
        rig, st = self.rig, self.summary["stages"]
        estimate = 1.0 if rig.tiny else estimate
        if not rig.clock.fits(estimate):
            st[name] = {"status": "skipped", "reason": f"{rig.clock.left():.0f} s of the budget left, needs ~{estimate:.0f} s"}
            stages.log(f"{name}: skipped ({st[name]['reason']})")
            self.save()
            return
        t0 = time.perf_counter()
        stages.log(f"{name}: start ({rig.clock.left():.0f} s left)")
        try:
            with _deadline(rig.clock.left() - 3):  # a stage that overruns is cut, and the table still printed
                self._stage(stage, ctx, group)
            st[name] = {"status": "done"}
        except (Exception, StageTimeout) as exc:  # noqa: BLE001 - a stage that fails must not lose the others
            st[name] = {"status": "failed", "reason": stages.first_line(exc)}
            stages.log(f"{name}: FAILED\n{traceback.format_exc()}")
        st[name]["seconds"] = round(time.perf_counter() - t0, 1)
        self.save()

    def _need_model(self):
        if self.model is None:
            rig = self.rig
            dtype = torch.float32 if rig.simulated else torch.bfloat16
            t0 = time.perf_counter()
            self.model = stages.random_llama(TINY if rig.tiny else LLAMA3_8B, rig.device, dtype)
            self.summary["model"] = {"weight_bytes": stages.weight_bytes(self.model),
                                     "embedding_bytes": stages.embedding_bytes(self.model), "dtype": str(dtype)}
            self.summary["metadata"]["model"] = f"random llama, {'tiny' if rig.tiny else 'Llama-3-8B shapes'}, {dtype}"
            stages.log(f"built the model in {time.perf_counter() - t0:.1f} s "
                       f"({self.summary['model']['weight_bytes'] / stages.GIB:.2f} GiB of weights)")
        return self.model

    def _stage(self, stage: str, ctx: int | None, group: str | None) -> None:
        rig, labels, s = self.rig, self.labels, self.summary
        if stage == "bandwidths":
            s["bandwidths"] = stages.bandwidths(rig)
        elif stage == "correctness":
            s["correctness"] = stages.correctness(rig)
            for name, res in s["correctness"].items():
                stages.log(f"correctness {name}: {'PASS' if res['passed'] else 'FAIL'} {res}")
        elif stage == "timing":
            model = self._need_model()
            group_labels = dict(stages.timing_groups(labels))[group]
            s["timing"].extend(stages.time_group(model, rig, group, group_labels, ctx))
            if group == "eager":
                generated = 3 + 1 + 1 if rig.tiny else 32 + 8 + 6
                s.setdefault("device_kv_target", {})[str(ctx)] = stages.device_kv_target(model, labels.on, ctx, generated)
        elif stage == "trace":
            s["trace"] = stages.trace(self._need_model(), rig, labels.on, ctx)
        elif stage == "throughput":
            s["throughput"] = stages.throughput(self._need_model(), rig, [labels.pre, labels.on], ctx)
        elif stage == "prefill":
            s["prefill"] = stages.real_prefill(self._need_model(), rig, labels.on, ctx, 64 if rig.tiny else 2048)
        elif stage == "limits":
            s["limits"] = stages.context_limits(self._need_model(), rig, labels)


class StageTimeout(BaseException):
    """The run's budget ran out inside a stage (e.g. compiling took longer than estimated). A
    BaseException, so that the bench's per-method error handling does not swallow it."""


@contextlib.contextmanager
def _deadline(seconds: float):
    """Raise StageTimeout in this (main) thread after `seconds`."""

    def expire(signum, frame):
        raise StageTimeout(f"cut at the end of the time budget, after {seconds:.0f} s in this stage")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _plot(summary: dict[str, Any], out: Path) -> None:
    """bench.png where matplotlib is installed (the GPU image may not have it: a note instead)."""
    records = [r for r in summary["timing"] if r.get("ms_per_token")]
    if not records:
        return
    try:
        from omnikv.bench.report import plot

        plot(records, out / "bench.png", summary["metadata"])
    except ImportError as exc:
        summary["notes"].append(f"bench.png not written: {exc}")


if __name__ == "__main__":
    sys.exit(main())
