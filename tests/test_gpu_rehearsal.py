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


def test_the_gpu_run_rehearsed_end_to_end(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run.sh"), "--tiny", "--device", "cpu", "--compile-backend", "eager"],
                          cwd=ROOT, env=rehearsal_env(tmp_path), capture_output=True, text=True, timeout=400)
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
        fc.install(scenario)
        return fc

    forget_probes()
    yield install
    gc.collect()  # the banks' finalizers unregister through the fake
    fc.uninstall()
    forget_probes()


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
