#!/usr/bin/env bash
# lm-evaluation-harness against `omnikv serve`, on loopback only, with a small local task file:
# one generate_until task (greedy generation + stop strings) and one multiple_choice task
# (loglikelihood: echo + logprobs on token-id prompts), both with lm-eval's default settings for
# `local-completions` (tokenizer_backend=auto: the server's /tokenizer_info and /tokenize, no hub;
# tokenized_requests=True, batch_size 1, one request at a time).
#
#   benchmarks/server/lm_eval_smoke.sh [OUTPUT_DIR]
#   MODEL=smollm2 (embedded; default) METHOD=omnikv PORT=8765 PYTHON=<omnikv env python>
#   LMEVAL_VENV=<dir>: where lm-eval is installed (default benchmarks/server/.venv, made by
#   benchmarks/server/lm_eval_setup.sh on first use, reused after).
#
# lm-eval is not a dependency of omnikv (datasets, evaluate, scikit-learn, ...: minutes to install);
# tests/test_server_lm_eval.py runs it from the same venv. Results: docs/server.md.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="${1:-$root/benchmarks/results/server-lm-eval}"
model="${MODEL:-smollm2}"
method="${METHOD:-omnikv}"
port="${PORT:-8765}"
py="${PYTHON:-$root/.venv/bin/python}"
export LMEVAL_VENV="${LMEVAL_VENV:-$root/benchmarks/server/.venv}"
venv="$LMEVAL_VENV"

# -- lm-eval in its own venv (idempotent) -------------------------------------------------------
bash "$root/benchmarks/server/lm_eval_setup.sh" --quiet

# -- the local tasks ------------------------------------------------------------------------------
tasks="$out/tasks"
mkdir -p "$tasks"
cat > "$tasks/gen.jsonl" <<'JSONL'
{"text": "The capital of France is", "answer": "Paris"}
{"text": "The capital of Italy is", "answer": "Rome"}
{"text": "The capital of Japan is", "answer": "Tokyo"}
{"text": "The capital of Germany is", "answer": "Berlin"}
{"text": "The capital of Spain is", "answer": "Madrid"}
{"text": "On a clear day the colour of the sky is", "answer": "blue"}
JSONL
cat > "$tasks/mc.jsonl" <<'JSONL'
{"question": "What is the capital of France?", "choices": ["Paris", "London", "Madrid", "Berlin"], "label": 0}
{"question": "How many legs does a spider have?", "choices": ["Six", "Eight", "Ten", "Four"], "label": 1}
{"question": "Which planet is closest to the Sun?", "choices": ["Venus", "Earth", "Mercury", "Mars"], "label": 2}
{"question": "What do bees make?", "choices": ["Milk", "Silk", "Wax paper", "Honey"], "label": 3}
{"question": "What is frozen water called?", "choices": ["Ice", "Steam", "Sand", "Glass"], "label": 0}
{"question": "Which animal barks?", "choices": ["Cat", "Dog", "Fish", "Bird"], "label": 1}
JSONL
cat > "$tasks/omnikv_smoke_gen.yaml" <<YAML
task: omnikv_smoke_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: $tasks/gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{text}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\n", "Question:", "Answer:", "###", "</s>"]
  do_sample: false
  temperature: 0
  max_gen_toks: 16
filter_list:
  - name: strip
    filter:
      - function: regex
        regex_pattern: "^[^A-Za-z]*([A-Za-z]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
YAML
cat > "$tasks/omnikv_smoke_mc.yaml" <<YAML
task: omnikv_smoke_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: $tasks/mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{question}}\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
YAML

# -- the server, on loopback only -----------------------------------------------------------------
"$py" -m omnikv serve --model "$model" --method "$method" --host 127.0.0.1 --port "$port" --log-level warning \
  > "$out/serve.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT
for _ in $(seq 1 240); do
  "$py" -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:$port/health', timeout=1).status_code != 200)" 2>/dev/null && break
  kill -0 "$server" 2>/dev/null || { cat "$out/serve.log" >&2; exit 1; }
  sleep 0.5
done

# -- lm-eval, default settings ----------------------------------------------------------------------
HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  "$venv/bin/lm_eval" --model local-completions \
  --model_args "model=$model,base_url=http://127.0.0.1:$port/v1/completions" \
  --tasks omnikv_smoke_gen,omnikv_smoke_mc --include_path "$tasks" \
  --output_path "$out/results" --log_samples 2>&1 | tee "$out/lm_eval.log"
