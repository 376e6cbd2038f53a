"""The work loop behind `omnikv eval`: samples x methods -> predictions, metrics, reports.

Output directory layout:

- `predictions.jsonl`: one line per (method, task, length, sample), appended as produced, the
  file opened anew for each (prediction, references, score, speed, the method's budget report,
  fidelity, ...);
- `metrics.json`: aggregated scores per (method, task, length) and the per-length average;
- `run.json`: run metadata (arguments, git commit, package versions, hardware, method configs);
- `summary.md`: task x length rows, method columns; fidelity / perplexity tables when measured;
- `scores.png`: score vs length per method (one panel per task plus the average).

A *work unit* is one (task, length, sample); every method runs on it in turn ("full" first, so it
can serve as the fidelity reference). `--shard i/n` keeps units whose index is i modulo n, so
fidelity references never cross shards. `--resume` skips records already in predictions.jsonl.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

from omnikv.errors import ConfigError, InputError
from omnikv.eval import report
from omnikv.eval.fidelity import fidelity_report, perplexity
from omnikv.eval.loaders import is_dataset_task, load_dataset_task
from omnikv.eval.metrics import CHINESE_TOKENIZATION, score_sample
from omnikv.eval.tasks import (Sample, canonical_task_name, check_question_position_for, encode_prompt,
                               generate_samples, takes_prose_haystack)
from omnikv.budget import parse_token_count
from omnikv.methods import REFERENCE

PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"
RUN = "run.json"
SUMMARY = "summary.md"
PLOT = "scores.png"

# Keys from a sample's metadata worth keeping in each record (the rest can be regenerated).
_META_DROP = ("needles",)
SHARED_CONTEXT = "shared_context"


@dataclasses.dataclass
class EvalConfig:
    """Everything one `omnikv eval` run needs. `lengths` are token counts (the exact prompt length
    of generated tasks; the truncation limit of dataset tasks)."""

    model: str
    methods: list[str]
    tasks: list[str]
    lengths: list[int]
    output: Path
    samples: int = 5
    budget: float | int | None = None
    seed: int = 0
    shard: tuple[int, int] = (0, 1)
    resume: bool = False
    fidelity: bool = False
    perplexity: bool = False
    task_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    haystack: str | None = None  # for every generated task with a prose haystack
    # "after" (every task's own layout) or "before": the question ahead of the haystack, for the
    # generated tasks that take it (omnikv.eval.tasks.QUESTION_POSITION_TASKS); others raise.
    question_position: str = "after"
    # Constructor options per method name; "*" applies to every method except full attention.
    method_options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    data_dir: str | None = None
    dtype: str | None = None
    device: str | None = None
    prefill_chunk_size: int | None = None
    max_new_tokens: int | None = None  # caps every sample's generation length when set
    progress: bool = True
    # One full-attention prefill per sample, every method (and fidelity / perplexity pass) forked
    # from it (omnikv.decoding.fork); False = each pass prefills on its own, as before.
    shared_prefill: bool = True
    # The shared-context task's documents and questions from this JSONL file instead of generated
    # ones (omnikv.eval.tasks.user_documents).
    documents: str | None = None

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        if not self.methods:
            raise ConfigError("no methods given; pass e.g. --methods full,omnikv")
        if not self.tasks:
            raise ConfigError("no tasks given; pass e.g. --tasks passkey,niah_single_2")
        if not self.lengths or any(n <= 0 for n in self.lengths):
            raise ConfigError(f"lengths must be positive token counts, got {self.lengths}")
        if self.samples <= 0:
            raise ConfigError(f"--samples must be positive, got {self.samples}")
        i, n = self.shard
        if not (n >= 1 and 0 <= i < n):
            raise ConfigError(f"shard must be i/n with 0 <= i < n, got {i}/{n}")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"methods listed twice: {self.methods}")
        from omnikv.methods.spec import parse_method

        for label in self.methods:  # malformed variant specs fail here, before a model loads
            parse_method(label)
        # Canonical task names (aliases resolved); dataset tasks pass through.
        self.tasks = [t if is_dataset_task(t) else canonical_task_name(t) for t in self.tasks]
        if "question_position" in self.task_options:
            opt = self.task_options["question_position"]
            if self.question_position not in ("after", opt):
                raise ConfigError(f"--question-position {self.question_position} and --task-opt "
                                  f"question_position={opt} disagree; give one")
            self.question_position = opt
            self.task_options = {k: v for k, v in self.task_options.items() if k != "question_position"}
        for t in self.tasks:  # an unsupported task fails here, before a model loads
            if is_dataset_task(t) and self.question_position != "after":
                raise ConfigError(f"{t}: dataset tasks keep their own prompt layout; --question-position "
                                  f"{self.question_position} is for the generated tasks")
            if not is_dataset_task(t):
                check_question_position_for(t, self.question_position)
        if self.documents is not None and SHARED_CONTEXT not in self.tasks:
            raise ConfigError(f"--documents is the {SHARED_CONTEXT} task's input; add {SHARED_CONTEXT} to --tasks")
        if self.documents is not None:  # a malformed file fails here, before a model loads
            from omnikv.eval.tasks.user_documents import read_documents

            read_documents(self.documents)

    def run_methods(self) -> list[str]:
        """Methods in run order: the reference ("full") first; added when fidelity needs it."""
        methods = list(self.methods)
        if self.fidelity and REFERENCE not in methods:
            methods.insert(0, REFERENCE)
        if REFERENCE in methods:
            methods.remove(REFERENCE)
            methods.insert(0, REFERENCE)
        return methods

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["output"] = str(self.output)
        d["shard"] = f"{self.shard[0]}/{self.shard[1]}"
        return d


def parse_length(text: str) -> int:
    """"4k" -> 4096, "1.5k" -> 1536, "2000" -> 2000, "1m" -> 1048576 (k = 1024, as RULER's 4K = 4096)."""
    return parse_token_count(text, "length")


def parse_shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise ConfigError(f"bad shard {text!r}; use i/n, e.g. 0/4 for the first of four shards")
    i, n = int(m.group(1)), int(m.group(2))
    if not (n >= 1 and 0 <= i < n):
        raise ConfigError(f"shard {text!r}: need 0 <= i < n")
    return i, n


def record_key(rec: dict[str, Any]) -> tuple[str, str, int, str]:
    return (rec["method"], rec["task"], int(rec["length"]), str(rec["sample_id"]))


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """Records of a predictions.jsonl; a torn last line (a crash mid-write) is ignored."""
    if not path.is_file():
        return []
    records = []
    with path.open(encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if lineno < len(lines) - 1:  # only the last (unterminated) line may be torn
                raise InputError(f"{path}:{lineno} is not valid JSON; the file is damaged") from None
    return records


def append_record(path: Path, rec: dict[str, Any]) -> None:
    """One record appended to predictions.jsonl, written through when this returns.

    The file is opened for each record rather than held open for the run: a run lasts hours, and
    when the file is replaced meanwhile (git stash / checkout / pull write a tracked file anew) a
    held handle goes on writing into the unlinked old file, and every later record is lost
    without a word (it happened to a run of ours)."""
    with path.open("a", encoding="utf-8") as out:
        out.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _rewrite(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------- metadata


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _git_commit() -> str | None:
    """HEAD of the git checkout this package runs from; None when it runs as an installed package
    (whose site-packages may sit inside some other repository: that one's commit says nothing)."""
    top = _git("rev-parse", "--show-toplevel")
    checkout = Path(__file__).resolve().parents[2]  # omnikv/eval/runner.py -> the checkout's root
    if top is None or Path(top).resolve() != checkout:
        return None
    return _git("rev-parse", "HEAD")


def run_metadata(config: EvalConfig | None = None) -> dict[str, Any]:
    """Code version (git commit in a checkout, else the installed package's version), package
    versions and hardware of this process."""
    import torch
    import transformers

    try:
        from importlib.metadata import version

        omnikv_version = version("omnikv")
    except Exception:  # not installed as a distribution
        omnikv_version = None
    commit = _git_commit()
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    meta = {
        "args": config.to_json() if config else None,
        "code_version": f"git {commit}" if commit else f"omnikv {omnikv_version or 'unknown'} (installed package)",
        "versions": {"omnikv": omnikv_version, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": sys.version.split()[0]},
        "hardware": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "cuda_device": cuda,
                     "torch_threads": torch.get_num_threads()},
        "chinese_tokenization": CHINESE_TOKENIZATION,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if commit:
        meta["git_commit"] = commit
    return meta


# ---------------------------------------------------------------- work


def _full_kv_bytes(model: Any, seq_len: int) -> int:
    """KV bytes full attention keeps for `seq_len` tokens (K and V, model dtype): every token in a
    full-attention layer, but only the last `sliding_window - 1` in a sliding-window layer, as
    transformers' DynamicCache does. Counting every layer at `seq_len` would make every method's
    device share look ~6x smaller than it is on Gemma 3 (15 of 18 layers slide over 512 tokens)."""
    from omnikv.hf.compat import layer_types, sliding_window, text_shape

    shape = text_shape(model)
    heads, head_dim = shape.kv_heads, shape.head_dim
    elem = next(model.parameters()).element_size()
    window = sliding_window(model.config)
    rows = sum(min(seq_len, window - 1) if t == "sliding_attention" and window else seq_len
               for t in layer_types(model.config))
    return 2 * heads * head_dim * rows * elem


def budget_report(stats: dict[str, Any], model: Any, seq_len: int) -> dict[str, Any]:
    """The method's budget as measured: attended tokens per layer, their mean fraction of the
    sequence, and device-resident KV bytes as a share of what full attention keeps."""
    attended = list(stats.get("attended_tokens_per_layer") or [])
    seq = int(stats.get("seq_length") or seq_len)
    full = _full_kv_bytes(model, seq)
    device = stats.get("device_kv_bytes")
    return {
        "attended_tokens_per_layer": attended,
        "attended_fraction": (sum(attended) / len(attended) / seq) if attended and seq else None,
        "device_kv_bytes": device,
        "host_kv_bytes": stats.get("host_kv_bytes"),
        "h2d_bytes_per_step": stats.get("h2d_bytes_per_step"),
        "full_kv_bytes": full,
        "device_kv_share": (device / full) if device is not None and full else None,
    }


def build_samples(config: EvalConfig, task: str, length: int, tokenizer: Any) -> list[Sample]:
    if is_dataset_task(task):
        return load_dataset_task(task, config.data_dir, tokenizer, length, config.samples)
    options = dict(config.task_options)
    if config.haystack and takes_prose_haystack(task):
        options["haystack"] = config.haystack
    if config.documents is not None and task == SHARED_CONTEXT:
        options["documents"] = config.documents
    if config.question_position != "after":  # "after" leaves every generator's call as it was
        options["question_position"] = config.question_position
    return generate_samples(task, tokenizer, length, config.samples, config.seed, **options)


def work_units(config: EvalConfig, tokenizer: Any) -> Iterator[tuple[int, str, int, Sample]]:
    """(unit index, task, length, sample) in a fixed order, all shards included."""
    k = 0
    for task in config.tasks:
        for length in config.lengths:
            for sample in build_samples(config, task, length, tokenizer):
                yield k, task, length, sample
                k += 1


def _check_resume(config: EvalConfig, pred_path: Path) -> list[dict[str, Any]]:
    existing = read_predictions(pred_path)
    if existing and not config.resume:
        raise ConfigError(f"{config.output} already holds {len(existing)} predictions; pass --resume to "
                          "continue that run or choose a new --output directory")
    run_file = config.output / RUN
    if existing and run_file.is_file():
        old = (json.loads(run_file.read_text()).get("args") or {})
        for field in ("model", "budget", "seed", "shard", "documents"):
            new = config.to_json()[field]
            if field in old and old[field] != new:
                raise ConfigError(f"--resume: this run's {field}={new!r} differs from the previous run's "
                                  f"{old[field]!r} in {config.output}; use a new --output directory")
    return existing


def _generation_length(sample: Any, config: EvalConfig) -> int:
    """The sample's own generation length, capped by --max-new-tokens."""
    return min(sample.max_new_tokens, config.max_new_tokens or sample.max_new_tokens)


# Budget of every budgeted method in `omnikv eval` when --budget is not given: one share of the
# prompt for all of them (see docs/evaluation.md, "One budget for every method").
EVAL_DEFAULT_BUDGET = 0.1


def build_methods(config: EvalConfig) -> tuple[dict[str, Any], Any]:
    """label -> configured Method in run order, and the BudgetPlan behind their budgets: one budget
    (--budget, or `--method-opt budget=B` for all, else EVAL_DEFAULT_BUDGET) for every budgeted
    method; only a per-method budget (`omnikv:budget=B`, `--method-opt omnikv.budget=B`) differs."""
    from omnikv.methods import get_method
    from omnikv.methods.spec import MethodSpec, parse_method, plan_budgets

    every = dict(config.method_options.get("*", {}))
    common = every.pop("budget", None)
    if common is not None and config.budget is not None and common != config.budget:
        raise ConfigError(f"--budget {config.budget} and --method-opt budget={common} disagree; give one")
    specs = []
    for label in config.run_methods():
        # A label is a method spec: `omnikv` or a variant such as `omnikv:selector=uniform`.
        spec = parse_method(label)
        options = dict(every) if spec.takes_budget else {}
        options.update(config.method_options.get(spec.name, {}))
        options.update(spec.options)
        specs.append(MethodSpec(label, spec.name, options))
    plan = plan_budgets(specs, config.budget if config.budget is not None else common, EVAL_DEFAULT_BUDGET)
    methods = {}
    for spec in specs:
        options = {k: v for k, v in spec.options.items() if k != "budget"}
        methods[spec.label] = get_method(spec.name, budget=plan.budgets[spec.label], **options)
    return methods, plan


def check_methods_on_model(methods: dict[str, Any], model: Any) -> None:
    """Build one cache per method before any sample runs, so that an unsupported architecture, a
    preset file made for another model or a static step on sliding layers fails up front with its
    own message (not after full attention has run); OmniKV's describe() then shows the resolved
    config instead of "per model"."""
    for method in methods.values():
        method.make_cache(model)


def _prefill_plan(config: EvalConfig, methods: dict[str, Any], model: Any) -> dict[str, Any]:
    """Which methods fork from the shared prefill (`alone`: those that prefill themselves), the
    tail every fork prefills itself, and whether the shared prefill records queries (H2O)."""
    from omnikv.decoding.fork import DEFAULT_TAIL, prefill_needs

    tail, record_queries, alone = DEFAULT_TAIL, False, set()
    if config.shared_prefill:
        for name, m in methods.items():
            need = prefill_needs(m, model)
            if need is None:
                alone.add(name)
            else:
                tail, record_queries = max(tail, need[0]), record_queries or need[1]
    return {"shared": config.shared_prefill, "tail": tail if config.shared_prefill else None,
            "record_queries": record_queries, "own_prefill_methods": sorted(alone)}


def _shard_units(config: EvalConfig, loaded: Any) -> list[tuple[str, int, Sample]]:
    """This shard's (task, length, sample) units; ConfigError when one does not fit the model."""
    tok = loaded.tokenizer
    shard_i, shard_n = config.shard
    units = [(task, length, s) for k, task, length, s in work_units(config, tok) if k % shard_n == shard_i]
    max_context = getattr(loaded, "max_context", None)
    for task, length, s in units:
        need = len(encode_prompt(tok, s.prompt)) + _generation_length(s, config)
        if max_context and need > max_context:
            raise ConfigError(f"{task} at length {length} needs {need} tokens (prompt + generation) but the "
                              f"model handles {max_context}; drop that length")
    return units


def _chinese_note(units: list[tuple[str, int, Sample]], meta: dict[str, Any]) -> None:
    if CHINESE_TOKENIZATION == "characters" and any(s.metric in ("qa_f1_zh", "rouge_l_zh") for _, _, s in units):
        note = ("jieba is not installed: Chinese F1 / ROUGE-L are computed on characters, not LongBench's "
                "jieba words (pip install jieba for comparable numbers)")
        meta.setdefault("notes", []).append(note)
        print(f"note: {note}", file=sys.stderr)


@dataclasses.dataclass
class _Work:
    """What every unit of one run_eval call shares."""

    config: EvalConfig
    model: Any
    tok: Any
    methods: dict[str, Any]
    prefill: dict[str, Any]  # _prefill_plan
    done: set[tuple[str, str, int, str]]  # record keys already in predictions.jsonl (--resume)
    full_tokens: dict[tuple[str, int, str], list[int]]  # full attention's greedy tokens per unit
    # method -> why it stopped: its first exception, with the sample it raised on. A method that
    # raises (a kvpress press on a model it does not support, say) is skipped for the rest of the
    # run; the other methods go on and the report says which one failed and why.
    failed: dict[str, str] = dataclasses.field(default_factory=dict)

    def missing(self, method: str, task: str, length: int, sample: Sample) -> bool:
        return any((method, task, length, i) not in self.done for i in record_ids(sample))


def run_eval(config: EvalConfig, *, loaded: Any = None) -> dict[str, Any]:
    """Run the evaluation described by `config`; return the aggregated metrics.

    `loaded` is an already loaded model (an `omnikv.models.LoadedModel` or anything with `.model`,
    `.tokenizer`, `.max_context`); by default `config.model` is loaded."""
    config.output.mkdir(parents=True, exist_ok=True)
    pred_path = config.output / PREDICTIONS
    existing = _check_resume(config, pred_path)
    if existing:
        _rewrite(pred_path, existing)  # drops a torn last line before appending
    meta = run_metadata(config)
    methods, budgets = build_methods(config)  # bad options and budgets fail before the model loads
    if loaded is None:
        from omnikv.models import load_model

        loaded = load_model(config.model, dtype=config.dtype, device=config.device)
    meta["model"] = {"name": getattr(loaded, "name", config.model), "source": str(getattr(loaded, "source", "")),
                     "max_context": getattr(loaded, "max_context", None)}
    check_methods_on_model(methods, loaded.model)
    meta["methods"] = {name: m.describe() for name, m in methods.items()}
    meta["budgets"] = budgets.to_json()
    if budgets.warning():
        print(budgets.warning(), file=sys.stderr)
    work = _Work(config, loaded.model, loaded.tokenizer, methods, _prefill_plan(config, methods, loaded.model),
                 done={record_key(r) for r in existing},
                 full_tokens={record_key(r)[1:]: r.get("token_ids") or [] for r in existing if r["method"] == REFERENCE})
    meta["prefill"] = work.prefill
    units = _shard_units(config, loaded)
    todo = sum(1 for task, length, s in units for m in methods for i in record_ids(s)
               if (m, task, length, i) not in work.done)
    _chinese_note(units, meta)

    from tqdm.auto import tqdm

    bar = tqdm(total=todo, desc="eval", unit="gen", disable=not config.progress)
    for task, length, s in units:
        for rec in _run_unit(work, task, length, s, bar):
            append_record(pred_path, rec)
            bar.update(1)
    bar.close()
    if work.failed:
        meta["failed_methods"] = work.failed
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    meta["new_records"] = todo
    (config.output / RUN).write_text(json.dumps(meta, indent=2, default=str))
    return write_reports(config.output, read_predictions(pred_path), meta=meta)


def _run_unit(work: _Work, task: str, length: int, s: Sample, bar: Any) -> Iterator[dict[str, Any]]:
    """Every method's records on one (task, length, sample), full attention first; the prompt is
    prefilled once for all of them unless the run says otherwise."""
    from omnikv.decoding.fork import SharedPrefill

    config = work.config
    ids = encode_prompt(work.tok, s.prompt)
    shared = None
    if config.shared_prefill and len(ids) >= 2 and any(work.missing(m, task, length, s) for m in work.methods):
        shared = SharedPrefill.run(work.model, ids, tail=work.prefill["tail"],
                                   record_queries=work.prefill["record_queries"],
                                   prefill_chunk_size=config.prefill_chunk_size)
    alone = set(work.prefill["own_prefill_methods"])
    full_logits: list[Any] = []  # full attention's teacher-forced logits, computed once per unit
    for name, method in work.methods.items():
        if name in work.failed or not work.missing(name, task, length, s):
            continue
        bar.set_postfix_str(f"{name} {task} {length}")
        own = shared if name not in alone else None
        mnt = _generation_length(s, config)
        try:
            if "questions" in s.metadata:  # shared-context task: one record per question
                records = _ask_questions(work.model, work.tok, name, method, task, length, s, ids, mnt, own, config)
            else:
                records = [_run_sample(work, name, method, task, length, s, ids, own,
                                       shared if REFERENCE not in alone else None, full_logits)]
        except Exception as exc:  # noqa: BLE001 - any method's failure is reported, not fatal to the run
            if name == REFERENCE:
                raise  # without full attention there is nothing to compare with
            work.failed[name] = f"{type(exc).__name__}: {exc} (on {task} {length} {s.id})"
            print(f"omnikv eval: method {name} failed on {task} {length} {s.id}: {type(exc).__name__}: {exc}\n"
                  f"  its remaining samples are skipped; the other methods go on (the traceback follows)",
                  file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            continue
        yield from records


def _run_sample(work: _Work, name: str, method: Any, task: str, length: int, s: Sample, ids: list[int],
                own: Any, full_shared: Any, full_logits: list[Any]) -> dict[str, Any]:
    """One method's record on one sample: greedy output and score, plus fidelity against full
    attention and the reference answer's perplexity when asked."""
    from omnikv.decoding.generation import SamplingParams, generate, teacher_forced_logits

    config, model, tok = work.config, work.model, work.tok
    chunk = config.prefill_chunk_size
    res = generate(model, tok, ids, method, SamplingParams(max_new_tokens=_generation_length(s, config),
                                                          temperature=0.0), prefill_chunk_size=chunk, shared=own)
    rec: dict[str, Any] = {
        "method": name, "task": task, "length": length, "sample_id": s.id,
        "question_position": s.metadata.get("question_position"),
        "prediction": res.text, "answers": s.answers, "metric": s.metric,
        "score": score_sample(s.metric, res.text, s.answers, s.metadata),
        **_result_fields(res, method, model, len(ids), own),
        "metadata": {k: v for k, v in s.metadata.items() if k not in _META_DROP},
    }
    unit_key = (task, length, s.id)
    if name == REFERENCE:
        work.full_tokens[unit_key] = list(res.token_ids)
    ref = work.full_tokens.get(unit_key)
    if config.fidelity and name != REFERENCE and ref:
        if not full_logits:
            full_logits.append(teacher_forced_logits(model, ids, ref, work.methods[REFERENCE], shared=full_shared,
                                                     prefill_chunk_size=chunk))
        method_logits = teacher_forced_logits(model, ids, ref, method, shared=own, prefill_chunk_size=chunk)
        rec["fidelity"] = fidelity_report(full_logits[0], method_logits, ref, res.token_ids)
    if config.perplexity:
        gold = list(tok(" " + ", ".join(s.answers), add_special_tokens=False)["input_ids"])
        if gold:
            logits = teacher_forced_logits(model, ids, gold, method, shared=own, prefill_chunk_size=chunk)
            rec["perplexity"] = perplexity(logits, gold)
    return rec


def record_ids(sample: Any) -> list[str]:
    """The sample ids of the records a sample produces: one, or one per question ("<id>/q<i>")."""
    questions = sample.metadata.get("questions")
    return [f"{sample.id}/q{i}" for i in range(len(questions))] if questions else [sample.id]


def _result_fields(res: Any, method: Any, model: Any, prompt_len: int, shared: Any) -> dict[str, Any]:
    """The part of a prediction record that comes from one GenerationResult. `shared`: the
    SharedPrefill the method's cache was forked from, or None for its own prefill."""
    return {
        "prompt_tokens": res.prompt_tokens, "generated_tokens": res.generated_tokens,
        "token_ids": list(res.token_ids), "finish_reason": res.finish_reason,
        "prefill_seconds": res.prefill_seconds, "decode_seconds": res.decode_seconds,
        "decode_tokens_per_second": res.decode_tokens_per_second,
        # prefill_seconds is the method's own part: the whole prompt, or with a shared prefill
        # only its tail; shared_prefill_seconds is the unit's shared part.
        "prefill_mode": "shared" if shared is not None else "own",
        "shared_prefill_seconds": shared.seconds if shared is not None else None,
        "budget": method.budget,
        "budget_report": budget_report(res.stats, model, prompt_len),
        "stats": res.stats, "config": res.config or method.describe(),
    }


def _ask_questions(model: Any, tok: Any, name: str, method: Any, task: str, length: int, s: Any,
                   ids: list[int], mnt: int, shared: Any, config: EvalConfig) -> list[dict[str, Any]]:
    """The shared-context task: the document once, then each question in turn (see
    omnikv.eval.multiturn); one record per question, scored on its own answer."""
    from omnikv.eval.multiturn import ask_in_turn, encode_question
    from omnikv.decoding.generation import SamplingParams

    questions = s.metadata["questions"]
    params = SamplingParams(max_new_tokens=mnt, temperature=0.0, stop=("\n",))
    results = ask_in_turn(model, tok, method, ids, [encode_question(tok, q["text"]) for q in questions], params,
                          shared=shared, prefill_chunk_size=config.prefill_chunk_size)
    recs = []
    for i, (q, res) in enumerate(zip(questions, results)):
        recs.append({
            "method": name, "task": task, "length": length, "sample_id": f"{s.id}/q{i}", "question_index": i,
            "prediction": res.text, "answers": q["answers"], "metric": s.metric,
            "score": score_sample(s.metric, res.text, q["answers"], s.metadata),
            **_result_fields(res, method, model, len(ids), shared),
            "metadata": {"depth": q["depth"], "needle": q["needle"], "document_tokens": len(ids),
                         **{k: v for k, v in s.metadata.items() if k not in _META_DROP + ("questions",)}},
        })
    return recs


def write_reports(out_dir: Path, records: list[dict[str, Any]], title: str = "omnikv eval",
                  meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """metrics.json, summary.md and scores.png from the records; returns the metrics. `meta` (the
    run.json contents; read from `out_dir` when not given) names the model and the seed."""
    if meta is None and (out_dir / RUN).is_file():
        meta = json.loads((out_dir / RUN).read_text())
    metrics = report.aggregate(records)
    (out_dir / METRICS).write_text(json.dumps(metrics, indent=2))
    (out_dir / SUMMARY).write_text(report.summary_markdown(metrics, title, meta))
    if records:
        report.plot_scores(metrics, out_dir / PLOT, meta)
    return metrics


def merged_failures(runs: list[tuple[Path, dict[str, Any]]]) -> dict[str, str]:
    """The methods that failed in any of the merged directories' runs ((directory, run.json)
    pairs): method -> "DIR: reason" (reasons of several directories joined by "; ")."""
    failed: dict[str, list[str]] = {}
    for d, run in runs:
        for name, why in (run.get("failed_methods") or {}).items():
            failed.setdefault(name, []).append(f"{d}: {why}")
    return {name: "; ".join(whys) for name, whys in failed.items()}


def merge_outputs(dirs: list[Path], output: Path) -> dict[str, Any]:
    """Merge shard output directories into `output` (predictions de-duplicated by (method, task,
    length, sample)), recompute metrics and reports, and record the shards' run metadata."""
    if not dirs:
        raise ConfigError("merge needs at least one shard output directory")
    output = Path(output)
    merged: dict[tuple, dict[str, Any]] = {}
    runs: list[tuple[Path, dict[str, Any]]] = []  # (directory, its run.json)
    for d in map(Path, dirs):
        pred = d / PREDICTIONS
        if not pred.is_file():
            raise InputError(f"{d} has no {PREDICTIONS}; is it an `omnikv eval` output directory?")
        for rec in read_predictions(pred):
            merged.setdefault(record_key(rec), rec)
        if (d / RUN).is_file():
            runs.append((d, json.loads((d / RUN).read_text())))
    output.mkdir(parents=True, exist_ok=True)
    records = list(merged.values())
    _rewrite(output / PREDICTIONS, records)
    meta = run_metadata()
    meta.update(merged_from=[str(d) for d in dirs], shards=[run for _, run in runs])
    if runs:  # the model and the arguments the shards ran with (they differ only in --shard)
        first = runs[0][1]
        meta.update(model=first.get("model"), args=first.get("args"), budgets=first.get("budgets"))
    failed = merged_failures(runs)
    if failed:  # a shard's failed method has no records past its error there: the merge says so
        meta["failed_methods"] = failed
    (output / RUN).write_text(json.dumps(meta, indent=2, default=str))
    return write_reports(output, records, meta=meta)
