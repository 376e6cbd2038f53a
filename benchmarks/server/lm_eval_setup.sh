#!/usr/bin/env bash
# Idempotent setup of the lm-evaluation-harness venv at benchmarks/server/.venv, used by
# tests/test_server_lm_eval.py and benchmarks/server/lm_eval_smoke.sh. lm-eval is not a dependency
# of omnikv (its install pulls datasets, evaluate, scikit-learn, pyarrow, ...: ~0.5 GB and minutes),
# so it lives in its own venv. It needs neither torch nor transformers: with the server's
# /tokenizer_info and /tokenize, lm-eval's default `tokenizer_backend=auto` tokenizes through the
# server. A second run with unchanged inputs installs nothing.
#
#   bash benchmarks/server/lm_eval_setup.sh            # verbose
#   bash benchmarks/server/lm_eval_setup.sh --quiet    # pip output goes to .venv/setup.log, shown on failure
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

LMEVAL_VERSION=0.4.13
# shellcheck source=../../scripts/lib/setup_steps.sh
source "$repo/scripts/lib/setup_steps.sh"
begin_setup lm-eval "${LMEVAL_VENV:-$here/.venv}" "" "$@"

key=$(cat "$here/lm_eval_setup.sh" "$repo/scripts/lib/setup_steps.sh" | sha256sum | cut -d' ' -f1)
has_core='import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ("lm_eval", "aiohttp", "requests")))'

exit_if_current
make_venv
run "$py" -m pip install --disable-pip-version-check "lm-eval[api]==$LMEVAL_VERSION"
finish_setup
