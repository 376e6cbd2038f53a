"""`python -m omnikv_vllm generate --json` keeps stdout for the JSON alone (no engine started here;
test_engine.py runs the real command)."""

import json
import os
import subprocess
import sys

# What vLLM does around the result: log lines from this process (print and logging both reach the
# descriptor) and from a process it starts, before and after the result is written.
SCRIPT = r"""
import logging, subprocess, sys
from omnikv_vllm.cli import claim_stdout
logging.basicConfig(stream=sys.stdout, level=logging.INFO)
result = claim_stdout()
logging.info("INFO engine starting")
print("INFO a plain print")
subprocess.run([sys.executable, "-c", "print('INFO from the engine process')"], check=True)
print('{"token_ids": [1, 2]}', file=result, flush=True)
logging.info("INFO shutting down")
"""


def test_the_result_alone_on_stdout_and_every_log_line_on_stderr():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"token_ids": [1, 2]}
    for line in ("engine starting", "a plain print", "from the engine process", "shutting down"):
        assert line in proc.stderr


def test_tensor_parallel_workers_get_one_core_group_each():
    from omnikv_vllm.cli import cpu_env_defaults

    cores = {str(c) for c in os.sched_getaffinity(0)}
    groups = cpu_env_defaults({}, tensor_parallel=3)["VLLM_CPU_OMP_THREADS_BIND"].split("|")
    assert len(groups) == 3 and all(g and set(g.split(",")) <= cores for g in groups)
    assert "|" not in cpu_env_defaults({})["VLLM_CPU_OMP_THREADS_BIND"]
