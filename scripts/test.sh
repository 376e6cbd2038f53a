#!/usr/bin/env bash
# Set up the .venv (quietly, a no-op when up to date), then run the whole test suite, including the
# slow tests on the embedded models (converted once per machine into ~/.cache/omnikv).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh --quiet

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
