#!/usr/bin/env bash
# Set up the .venv (quietly, a no-op when up to date), then run the whole test suite, including the
# slow tests on the embedded models (converted once per machine into ~/.cache/omnikv).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
# Under CI=true (or OMNIKV_FLOOR=1 / OMNIKV_VLLM_SETUP=1) the suite also sets up and uses two more
# venvs: .venv-floor (transformers 5.2.0 + kvpress, scripts/setup_floor.sh; tests/test_floor.py runs
# a subset there) and the vLLM one; otherwise those tests are skipped and -rs prints why.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh --quiet
# Triton (the GPU machines' 3.6) in its own directory, so that tests/test_reload.py checks the
# partial-reload kernel's logic on CPU under Triton's interpreter before any GPU runs it. Once per
# machine (cached in ~/.cache/omnikv-triton); OMNIKV_TRITON_SETUP=0 skips it (the test then says why).
if [[ "${OMNIKV_TRITON_SETUP:-1}" != "0" ]]; then
    bash scripts/setup_triton.sh --quiet || echo "test.sh: Triton could not be installed; its kernel test will be skipped" >&2
fi

set +e
# Two workers (one per core); a file's tests stay on one worker (module fixtures, shared models).
# -rs prints why tests were skipped (e.g. the vLLM integration without its venv).
.venv/bin/python -m pytest -q -x -n 2 --dist loadfile --durations=15 -rs tests "$@"
rc=$?
set -e
if (( rc == 5 )); then
    echo "test.sh: pytest collected no tests; that is a failure" >&2
    exit 1
fi
exit "$rc"
