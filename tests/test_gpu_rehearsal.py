"""The rehearsal of the GPU run in CI (issue #24): `benchmarks/gpu/run.sh` end to end on a CPU, at
tiny shapes, through the real `CudaTransfer`, with a fake `torch.cuda` (tests/fake_cuda) and with
the packages the GPU image lacks (matplotlib, gguf, fastapi) unimportable. An AttributeError,
ImportError or TypeError the GPU would hit fails here, and so do the machine's refusals that
must not kill the run: a refused host registration, a mapped-memory probe that kills its CUDA
context.

The fake is installed only in the rehearsal's own processes (through tests/fake_cuda/
sitecustomize.py and the environment) or, for the in-process checks, by the `fake_cuda` fixture,
which takes it out again.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FAKE = ROOT / "tests" / "fake_cuda"
BLOCKED = "matplotlib,gguf,fastapi"  # not on the GPU image
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
sys.path.insert(0, str(FAKE))


def rehearsal_env(out: Path, scenario: str = "on") -> dict[str, str]:
    return dict(os.environ, OUT=str(out), PYTHON=sys.executable, PYTHONPATH=f"{FAKE}{os.pathsep}{ROOT}",
                OMNIKV_FAKE_CUDA=scenario, OMNIKV_BLOCK_MODULES=BLOCKED, CUDA_VISIBLE_DEVICES="")


@pytest.mark.parametrize("kernel", [False, True], ids=["full-gather", "reload-kernel"])
def test_the_gpu_run_rehearsed_end_to_end(tmp_path, kernel):
    """`kernel`: with Triton on the path and its interpreter on, the partial reload runs the Triton
    kernel (eager and as the custom op inside the compiled step) through every stage, as it
    will on the GPU; without, the run falls back to the full gather and says why."""
    env = rehearsal_env(tmp_path)
    if kernel:
        from _side_venv import TRITON_SITE

        if not (TRITON_SITE / "triton").is_dir():
            pytest.skip(f"Triton is not installed in {TRITON_SITE} (bash scripts/setup_triton.sh; scripts/test.sh does it)")
        env.update(PYTHONPATH=env["PYTHONPATH"] + os.pathsep + str(TRITON_SITE), TRITON_INTERPRET="1")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run.sh"), "--tiny", "--device", "cpu", "--compile-backend", "eager"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout[-6000:] + proc.stderr[-6000:]
    assert proc.returncode == 0, output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["simulated"] is True
    # every stage of the plan ran: none skipped for time, none failed
    assert {name.split()[0] for name in summary["stages"]} == {"bandwidths", "correctness", "timing", "trace",
                                                               "throughput", "prefill", "limits"}
    assert {name: st["status"] for name, st in summary["stages"].items() if st["status"] != "done"} == {}, output
    # the real CudaTransfer ran: a registered bank, the device gather chosen by the child probe
    corr = summary["correctness"]
    assert corr["full_budget_equivalence"]["passed"] and corr["offload_on_equals_off"]["passed"], corr
    on = corr["offload_on_equals_off"]
    assert on["transfer"] == "cuda/device_gather" and on["host_memory"] == "registered" and on["bank_pinned"]
    assert "child process" in on["gather_reason"]
    partial = corr["partial_reload_equals_off"]
    assert partial["passed"], partial
    # the kernel, or the full gather with the reason it could not run
    assert partial["reload"] == "triton kernel" if kernel else partial["reload"].startswith("full gather ("), partial
    assert summary["bandwidths"]["mapped_memory"]["usable"] is True
    labels = summary["labels"]
    # every row timed, captured ones included; each record names the strategy that ran
    rows = summary["timing"]
    assert {(r["group"], r["method"]) for r in rows} >= {("eager", labels["on"]), ("eager", labels["host"]),
                                                         ("captured", labels["on_captured"]), ("captured", labels["pre_captured"]),
                                                         ("offload_off", labels["off"])}
    assert all(r["ms_per_token"] for r in rows), [r["note"] for r in rows if not r["ms_per_token"]]
    assert all(r["compile_seconds"] > 0 for r in rows if r["group"] == "captured" and r["method"] != "full")
    transfers = {r["method"]: r["transfer"] for r in rows}
    if kernel:  # the offload rows refreshed only the changed rows, eager and captured
        assert {r["reload"] for r in rows if r["method"] in (labels["on"], labels["on_captured"])} == {"triton kernel"}
    assert transfers[labels["on"]] == transfers[labels["on_captured"]] == "cuda/device_gather"
    assert transfers[labels["host"]] == "cuda/host_gather"
    assert all(e["batch"] >= 1 and e["tokens_per_second"] for e in summary["throughput"]["methods"].values())
    assert summary["prefill"]["transfer"] == "cuda/device_gather" and summary["prefill"]["d2h_bytes_prefill"] >= 0
    assert all(m["max_context"] for m in summary["limits"]["methods"].values())
    # every target measurable: the run would judge each of them on the GPU
    assert {t["name"]: t["status"] for t in summary["targets"] if t["status"] not in ("simulated", "met")} == {}
    # the table: printed last, "simulated" in place of numbers; matplotlib missing is a note, not a crash
    table = (tmp_path / "table.txt").read_text()
    assert "SUMMARY" in table and "REHEARSAL" in table and table.strip() in proc.stdout
    assert "correctness partial_reload_equals_off: PASS" in table and "reload of changed rows:" in table
    timing_rows = [line for line in table.splitlines() if line.strip().startswith("256 ")]
    assert timing_rows and all("simulated" in line for line in timing_rows)
    assert any("bench.png not written" in n for n in summary["notes"]) and not (tmp_path / "bench.png").exists()
    assert (tmp_path / "trace_omnikv_offload.json.gz").exists() and (tmp_path / "log.txt").read_text()


# -- the machine's refusals, in process, through the GPU run's own stages -------------------------------------
@pytest.fixture
def fake_cuda(monkeypatch):
    """The fake torch.cuda in this process (scenario set by the test), and in the children it
    starts (the mapped-memory probe), taken out again afterwards."""
    import fake_cuda as fc

    from omnikv.offload.mapped import forget_probes

    monkeypatch.setenv("PYTHONPATH", f"{FAKE}{os.pathsep}{ROOT}")
    monkeypatch.setenv("OMNIKV_BLOCK_MODULES", BLOCKED)

    def install(scenario: str):
        monkeypatch.setenv("OMNIKV_FAKE_CUDA", scenario)
        if _PROBED.get("scenario") != scenario:  # the probe's answer depends on the scenario
            forget_probes()
            _PROBED["scenario"] = scenario
        fc.install(scenario)
        return fc

    yield install
    gc.collect()  # the banks' finalizers unregister through the fake
    fc.uninstall()


_PROBED: dict[str, str] = {}  # the scenario the cached mapped-memory answers were probed under


def _rig(tmp_path):
    import stages

    return stages.Rig(torch.device("cpu"), cuda=True, tiny=True, clock=stages.Clock(600), out=tmp_path)


@pytest.mark.parametrize("scenario, host_memory, reason", [
    ("register=refuse", "pinned", "could not register"),
    ("register=refuse,pin=refuse", "pageable", "could not register"),
    ("mapped=fault", "registered", "probe failed"),
])
def test_a_machine_that_refuses_mapped_memory_falls_back_to_the_host_gather(tmp_path, fake_cuda, scenario, host_memory, reason):
    """A refused cudaHostRegister (its stale error consumed, not raised by the next kernel) and a
    mapped-memory probe that kills its CUDA context (in a child: this process goes on) both end in
    the host gather, exact, with the reason recorded."""
    import stages

    fc = fake_cuda(scenario)
    rig = _rig(tmp_path)
    with pytest.warns(RuntimeWarning, match="pageable") if "pin=refuse" in scenario else _no_warning():
        res = stages.correctness(rig)
    assert res["full_budget_equivalence"]["passed"] and res["offload_on_equals_off"]["passed"], res
    on = res["offload_on_equals_off"]
    assert on["transfer"] == "cuda/host_gather" and on["host_memory"] == host_memory and reason in on["gather_reason"]
    assert on["bank_pinned"] == (host_memory != "pageable")
    assert fc.STATE.dead is None and fc.STATE.last_error == 0  # this process's context is healthy


def _no_warning():
    import contextlib

    return contextlib.nullcontext()


def test_a_bank_that_dies_while_a_view_lives_stays_registered(fake_cuda):
    """The registration belongs to the memory, not to the first tensor over it: it is undone when
    the last view (here the mapped view the gather reads) is gone, after the device is synced."""
    from omnikv.offload.transfer import CudaTransfer

    fc = fake_cuda("on")
    t = CudaTransfer()
    t.side_stream(torch.device("cpu"))  # as a segment does: the device whose work may touch the bank
    bank = t.host_empty((64, 1, 2, 2, 2, 4), torch.float32, torch.device("cpu"))
    bank.copy_(torch.arange(bank.numel(), dtype=torch.float32).view(bank.shape))
    view = t.gather_source(bank, torch.device("cpu"))
    assert t.gather == "device_gather" and len(fc.STATE.registered) == 1
    expected = bank[5].clone()
    del bank
    gc.collect()
    assert len(fc.STATE.registered) == 1 and torch.equal(view[5], expected)  # still readable, still registered
    syncs = fc.STATE.calls.get("synchronize", 0)
    assert fc.STATE.calls.get("cudaHostUnregister", 0) == 0
    del view
    gc.collect()
    assert fc.STATE.registered == {} and fc.STATE.calls["synchronize"] > syncs and t.counters.pinned_bytes == 0


def test_the_device_gather_is_chosen_without_reading_the_bank(fake_cuda):
    """Rows still arriving on the side stream (NaN here) do not switch the strategy: whether the
    device may read mapped memory was asked of a child, not of the bank."""
    from omnikv.offload.transfer import CudaTransfer

    fake_cuda("on")
    t = CudaTransfer()
    bank = t.host_empty((8, 1, 1, 2, 1, 4), torch.float32, torch.device("cpu"))
    bank.fill_(float("nan"))
    t.gather_source(bank, torch.device("cpu"))
    assert t.gather == "device_gather", t.gather_reason


def test_asked_for_device_gather_where_it_cannot_run_is_a_clear_error(fake_cuda):
    from omnikv.errors import ConfigError
    from omnikv.offload.transfer import CudaTransfer

    fake_cuda("mapped=fault")
    t = CudaTransfer("device_gather")
    bank = t.host_empty((8, 1, 1, 2, 1, 4), torch.float32, torch.device("cpu"))
    with pytest.raises(ConfigError, match="cuda_host_gather"):
        t.gather_source(bank, torch.device("cpu"))


def test_the_fake_is_strict_where_cuda_is():
    """The rehearsal's fake fails the mistakes the GPU would fail: an API torch.cuda lacks, a
    cudaError compared as an int, a stale error left for the next launch."""
    import fake_cuda as fc

    with pytest.raises(AttributeError, match="would add names"):
        orig = fc._replacements
        fc._replacements = lambda: {**orig(), "cudaHostRegisterNoSuchThing": None}
        try:
            fc.install("on")
        finally:
            fc._replacements = orig
    fc.install("register=refuse")
    try:
        err = torch.cuda.cudart().cudaHostRegister(1 << 20, 4096, 3)
        assert int(err) != 0 and err != 0 and err != torch.cuda.cudart().cudaError.success
        with pytest.raises(TypeError):
            bool(err)
        with pytest.raises(RuntimeError, match="stale"):
            with torch.cuda.stream(torch.cuda.Stream()):
                pass
    finally:
        fc.uninstall()
    assert not torch.cuda.is_available()


# -- run.sh: transformers from pyproject's range, or a loud stop ---------------------------------------------
def _run_sh(tmp_path, wheels: Path, pretend: str):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable, OMNIKV_GPU_WHEELS=str(wheels),
               OMNIKV_GPU_TRANSFORMERS_VERSION=pretend, CUDA_VISIBLE_DEVICES="")
    return subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run.sh"), "--tiny"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


# A version below pyproject's floor (5.2.0). The GPU image's 5.17 is inside the range since it was
# widened, so run.sh uses it and carries no wheel (test_the_transformers_range_is_read_from_pyproject).
OUTSIDE = "4.57.1"


def test_run_sh_stops_when_transformers_is_outside_the_range_and_no_wheel_was_carried(tmp_path):
    proc = _run_sh(tmp_path, tmp_path / "no-wheels", OUTSIDE)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "outside omnikv's range" in proc.stderr and "no wheel was carried" in proc.stderr
    assert not (tmp_path / "out" / "summary.json").exists()  # the benchmark never ran outside the range


def test_run_sh_stops_when_the_carried_wheel_does_not_install(tmp_path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    (wheels / "transformers-9.9.9-py3-none-any.whl").write_bytes(b"not a zip")
    proc = _run_sh(tmp_path, wheels, OUTSIDE)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "not falling back to the machine's transformers" in proc.stderr


def test_the_transformers_range_is_read_from_pyproject(tmp_path, monkeypatch):
    import transformers_range as tr

    declared = tr.declared_range(ROOT / "pyproject.toml")
    assert declared and declared in (ROOT / "pyproject.toml").read_text()
    monkeypatch.setenv("OMNIKV_GPU_TRANSFORMERS_VERSION", "5.17.0")  # the GPU image's: inside, no wheel
    assert tr.main([str(ROOT / "pyproject.toml")]) == 0
    monkeypatch.setenv("OMNIKV_GPU_TRANSFORMERS_VERSION", OUTSIDE)
    assert tr.main([str(ROOT / "pyproject.toml")]) == 1
    monkeypatch.delenv("OMNIKV_GPU_TRANSFORMERS_VERSION")
    assert tr.main([str(ROOT / "pyproject.toml")]) == 0  # this venv's is inside (the suite runs on it)
    other = tmp_path / "pyproject.toml"
    other.write_text('[project]\nname = "x"\ndependencies = ["torch", "transformers[torch]>=99.0 ; python_version >= \'3.8\'"]\n')
    assert tr.declared_range(other) == ">=99.0" and tr.main([str(other)]) == 1
    other.write_text('[project]\nname = "x"\ndependencies = ["torch"]\n')
    assert tr.main([str(other)]) == 2


def test_mapped_memory_modes(monkeypatch):
    from omnikv.errors import ConfigError
    from omnikv.offload.mapped import forget_probes, mapped_memory

    forget_probes()
    monkeypatch.setenv("OMNIKV_MAPPED_MEMORY", "off")
    assert mapped_memory(torch.device("cpu")).usable is False
    monkeypatch.setenv("OMNIKV_MAPPED_MEMORY", "on")
    assert mapped_memory(torch.device("cpu")).usable is True
    monkeypatch.setenv("OMNIKV_MAPPED_MEMORY", "maybe")
    with pytest.raises(ConfigError, match="probe, off or on"):
        mapped_memory(torch.device("cpu"))
    monkeypatch.delenv("OMNIKV_MAPPED_MEMORY")
    answer = mapped_memory(torch.device("cpu"))  # a real child on a CPU-only torch: no CUDA, no mapping
    assert answer.usable is False and "exit 12" in answer.reason
    forget_probes()
    _PROBED.clear()


# -- the judgement: bounds and targets from what a run saved ---------------------------------------------------
def test_bounds_add_the_serial_parts_and_skip_the_embedding_table():
    import table

    bw = {"hbm_read_gbps": 1000.0, "h2d_copy_gbps": 50.0, "mapped_gather_gbps": 10.0, "host_copy_gbps": 20.0}
    model = {"weight_bytes": 10 * 10**9, "embedding_bytes": 2 * 10**9}
    rec = dict(context=131072, method="m", ms_per_token=40.0, kv_read_bytes_per_step=10**9, h2d_bytes_per_step=10**8)
    dev, host = table.bounds([dict(rec, transfer="cuda/device_gather"), dict(rec, transfer="cuda/host_gather")], bw, model)
    assert dev["hbm_ms"] == 9.0 and dev["link_ms"] == 10.0 and dev["bound_ms"] == 19.0  # 8 GB + 1 GB at 1 TB/s, + 0.1 GB at 10 GB/s
    assert host["link_ms"] == 2.0 and host["host_gather_ms"] == 5.0 and host["bound_ms"] == 16.0
    assert dev["over_bound_x"] == round(40 / 19, 2)


def test_the_table_from_a_run_cut_short_says_why_each_target_is_not_measurable(tmp_path, capsys):
    import table

    labels = {"on": "omnikv:on", "host": "omnikv:host", "off": "omnikv:off", "full": "full", "pre": "full_prealloc",
              "on_captured": "omnikv:on:compile", "pre_captured": "full_prealloc:compile"}
    rec = dict(context=131072, group="eager", ms_per_token=None, note=None)
    summary = {
        "simulated": False, "contexts": [32768, 131072], "labels": labels, "notes": [],
        "stages": {"correctness": {"status": "done"}, "timing 131072 eager": {"status": "done"},
                   "timing 131072 captured": {"status": "skipped", "reason": "80 s of the budget left, needs ~120 s"},
                   "trace 32768": {"status": "failed", "reason": "RuntimeError: CUDA error: an illegal memory access"}},
        "correctness": {"a": {"passed": True}},
        "timing": [dict(rec, method="full", ms_per_token=30.0),
                   dict(rec, method="omnikv:on", note="out of memory at fill: CUDA out of memory"),
                   dict(rec, method="full_prealloc", ms_per_token=15.0)],
    }
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    assert table.main([str(path)]) == 0
    text = capsys.readouterr().out
    got = {t["key"]: t for t in table.targets(summary)}
    assert got["correctness"]["status"] == "met"
    assert got["decode_vs_full_eager"]["status"] == "not measurable"
    assert "out of memory at fill" in got["decode_vs_full_eager"]["reason"]
    assert "skipped: 80 s of the budget left" in got["decode_vs_full_captured"]["reason"]
    assert "illegal memory access" in got["h2d_overlap"]["reason"]
    assert got["throughput"]["status"] == "not measurable" and "did not run" in got["throughput"]["reason"]
    assert "NOT MEASURABLE: omnikv offload: out of memory at fill" in text and "stage trace 32768: failed" in text


def test_a_stage_that_overruns_the_budget_is_cut():
    """A compile slower than its estimate must not run past the budget (run.sh's hard limit would
    then kill the run before its table): the stage is cut by an exception the per-method error
    handling does not swallow."""
    import time

    import gpu_bench

    assert not issubclass(gpu_bench.StageTimeout, Exception)
    t0 = time.perf_counter()
    with pytest.raises(gpu_bench.StageTimeout, match="cut at the end of the time budget"):
        with gpu_bench._deadline(1.0):
            while time.perf_counter() - t0 < 10:
                time.sleep(0.05)
    assert time.perf_counter() - t0 < 5


# -- the same, on the GPU image's Python stack ---------------------------------------------------------------
GPU_IMAGE_PY = ROOT / ".venv-gpu-image" / "bin" / "python"
# What the GPU run executes, beside the rehearsal: the seams, the partial-reload kernel (under the
# interpreter, compiled into a fullgraph step, built for sm_90), the static / captured step, the
# transfers and gathers, the offload prefill, equivalence to the reference and the memory meter.
GPU_IMAGE_SUBSET = ["tests/test_gpu_rehearsal.py", "tests/test_contract.py", "tests/test_reload.py", "tests/test_static.py",
                    "tests/test_transfer.py", "tests/test_gathers.py", "tests/test_offload_prefill.py",
                    "tests/test_omnikv_equivalence.py", "tests/test_memory.py",
                    # the CLI and the server: fastapi is not on the image, and the GPU run uses neither
                    "--deselect", "tests/test_static.py::test_eval_and_serve_compile_flags",
                    "-k", "not on_the_gpu_images_stack"]


@pytest.mark.slow
def test_the_rehearsal_and_the_code_it_runs_pass_on_the_gpu_images_stack():
    """scripts/setup_gpu_image.sh makes the lent machines' stack here (Python 3.12, torch 2.11.0
    +cu130, transformers 5.17.0, triton 3.6.0, tokenizers 0.23; no matplotlib, gguf, fastapi): the
    rehearsal and the code the GPU run executes pass on those versions, not only on this venv's.
    (Run once by hand before it was a test, it found a fake-CUDA gap only a CUDA build of torch
    shows: dynamo asks `torch.accelerator` for the current stream.)"""
    from _side_venv import side_venv_python

    python = side_venv_python(ROOT / "scripts" / "setup_gpu_image.sh", GPU_IMAGE_PY, "OMNIKV_GPU_IMAGE",
                              "GPU-image-stack tests")
    site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMNIKV_TRITON_SITE": site}  # the image's own triton
    env.pop("PYTEST_XDIST_WORKER", None)
    proc = subprocess.run([str(python), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-rs", *GPU_IMAGE_SUBSET],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=2400)
    versions = subprocess.run([str(python), "-c", "import sys, torch, transformers; print(sys.version.split()[0], "
                               "torch.__version__, transformers.__version__)"], capture_output=True, text=True).stdout.strip()
    assert proc.returncode == 0, f"on the GPU image's stack ({versions}):\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, proc.stdout[-3000:]  # the kernel's tests ran too
