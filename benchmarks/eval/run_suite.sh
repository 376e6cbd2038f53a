#!/usr/bin/env bash
# The quality suite behind docs/results.md: every method at one budget on the calibrated tasks,
# plus fidelity / perplexity. Two queues run in parallel, one torch thread each (2-core machine);
# every stage is resumable (--resume), so re-running this script continues where it stopped.
#
#   benchmarks/eval/run_suite.sh            # run (or finish) everything, then build the tables
#   benchmarks/eval/run_suite.sh report     # only rebuild tables/plots from what has finished
#   benchmarks/eval/run_suite.sh queue1|queue2   # one of the two queues, then the tables
#   benchmarks/eval/run_suite.sh more            # only the second pass (more tasks), then the tables
#   benchmarks/eval/run_suite.sh pass3           # only the third pass (20 samples per cell), then the tables
#   benchmarks/eval/run_suite.sh pass3c          # only the third pass's third queue (SmolLM2, fidelity)
#   benchmarks/eval/run_suite.sh pass3long       # only the third pass's 8K and 16K stages, on two queues
#
# Raw outputs: runs/suite/<stage>/ (predictions.jsonl etc.); tables: benchmarks/eval/results/.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/suite}
METHODS=full,omnikv,streaming_llm,h2o,snapkv,quest
BUDGET=${BUDGET:-0.1}            # tokens per budgeted layer = 10% of the prompt, every method
G_TASKS=${G_TASKS:-passkey,niah_multikey_1}
S_TASKS=${S_TASKS:-passkey,niah_multikey_1}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
common=(--budget "$BUDGET" --haystack narrative --max-new-tokens 16 --prefill-chunk-size 1024
        --method-opt omnikv.offload=true --resume --no-progress)
mkdir -p "$OUT"
# Raw outputs lost (a fresh machine)? Start the stages from the committed merged tables instead of
# from zero: missing stage directories get their group's predictions, which --resume then skips.
$PY benchmarks/eval/results.py --seed "$OUT" benchmarks/eval/results

ev() {  # ev STAGE ARGS...: one resumable `omnikv eval` stage, logged to $OUT/STAGE.log
  local stage=$1; shift
  echo "[$(date -u +%H:%M:%S)] start $stage" >> "$OUT/progress.log"
  $PY -m omnikv eval --output "$OUT/$stage" "${common[@]}" "$@" >> "$OUT/$stage.log" 2>&1
  echo "[$(date -u +%H:%M:%S)] end $stage rc=$?" >> "$OUT/progress.log"
}

g3() {  # g3 STAGE LENGTH [ARGS]: one length of the main Gemma 3 270M table
  local stage=$1 L=$2; shift 2
  ev "$stage" --model gemma3 --methods $METHODS --tasks "$G_TASKS" --lengths $L --samples 3 "$@"
}

queue_gemma3() {  # main accuracy table, shortest length first; 8K is split over both queues
  g3 gemma3-2k 2k
  g3 gemma3-4k 4k
  g3 gemma3-8k-s0 8k --shard 0/2
}

queue_other() {
  ev smollm2-1k --model smollm2 --methods $METHODS --tasks "$S_TASKS" --lengths 1k --samples 3
  # --shard 0/2: only the first of the 2 samples (needle depth 0); both samples did not fit the time
  ev fid-smollm2-4k --model smollm2 --methods $METHODS --tasks niah_multikey_1 --lengths 4k --samples 2 --shard 0/2 \
     --fidelity --perplexity
  ev fid-gemma3-4k --model gemma3 --methods $METHODS --tasks niah_multikey_1 --lengths 4k --samples 1 \
     --fidelity --perplexity
  g3 gemma3-8k-s1 8k --shard 1/2
  ev gemma3-16k --model gemma3 --methods full,omnikv --tasks passkey --lengths 16k --samples 1
  if [[ ${WITH_FID8K:-1} == 1 ]]; then  # the slowest stage; WITH_FID8K=0 skips it
    ev fid-gemma3-8k --model gemma3 --methods $METHODS --tasks niah_multikey_1 --lengths 8k --samples 1 \
       --fidelity --perplexity
  fi
  fid_smollm2_8k
}
fid_smollm2_8k() {  # SmolLM2 at its trained limit: agreement with full attention, not retrieval
  # 8176 prompt + 16 generated tokens = its 8192-token context
  ev fid-smollm2-8k --model smollm2 --methods $METHODS --tasks niah_multikey_1 --lengths 8176 --samples 1 \
     --fidelity --perplexity
}

# Second pass (after the calibration of the remaining tasks, benchmarks/eval/calibrate.sh
# gemma3-rest): the tasks Gemma 3 turned out to solve - number_string (3/3 at 2K), niah_multivalue
# (3 of 4 values) - and niah_multikey_1 again, now with room for a distractor *and* the gold value
# (48 tokens; the first pass capped generation at 16 and cut the second value).
M_TASKS=${M_TASKS:-number_string,niah_multivalue,niah_multikey_1}
gm() {  # gm STAGE LENGTH [ARGS]
  local stage=$1 L=$2; shift 2
  ev "$stage" --model gemma3 --methods $METHODS --tasks "$M_TASKS" --lengths $L --samples 3 --max-new-tokens 48 "$@"
}
# OmniKV with the observation-window selector (`uniform`, 16 queries) beside the paper's `last`:
# at the first decode step its window still holds the question's queries (see docs/results.md).
gu() {  # gu STAGE LENGTH
  ev "$1" --model gemma3 --methods omnikv:selector=uniform --tasks "$M_TASKS" --lengths $2 --samples 3 --max-new-tokens 48
}
# 16K: full attention and OmniKV on the three tasks; the other methods on number_string only (CPU time)
g16() {  # g16 STAGE SHARD
  ev "$1" --model gemma3 --methods full,omnikv --tasks "$M_TASKS" --lengths 16k --samples 3 --max-new-tokens 48 --shard "$2"
  ev "${1/16k/16k-lossy}" --model gemma3 --methods streaming_llm,h2o,snapkv,quest --tasks number_string --lengths 16k \
     --samples 3 --max-new-tokens 48 --shard "$2"
}
queue_more_a() { gm gemma3-more-2k 2k; gm gemma3-more-8k-s0 8k --shard 0/2; gu gemma3-more-uniform-8k 8k; g16 gemma3-more-16k-s0 0/2; }
queue_more_b() { gm gemma3-more-4k 4k; gm gemma3-more-8k-s1 8k --shard 1/2; gu gemma3-more-uniform-2k 2k; gu gemma3-more-uniform-4k 4k
                 g16 gemma3-more-16k-s1 1/2; }

# Third pass (issue 14): 20 samples per cell, one shared prefill per sample (the default), the four
# tasks Gemma 3 is competent on, every method plus OmniKV with the `uniform` and `union` selectors
# beside the paper's `last`. Seed 0 / narrative haystack is the set the `union` design was chosen
# on (its first samples include the second pass's failure cases); seed 1 / pydoc haystack is held
# out. Stages run in quarter shards (--shard i/4: every 4th work unit, i.e. 5 samples of every task
# spread over the depths), so a run stopped early is still balanced; results.py merges them.
P3_TASKS=${P3_TASKS:-passkey,number_string,niah_multivalue,niah_multikey_1}
P3_METHODS=$METHODS,omnikv:selector=uniform,omnikv:selector=union
p3() {  # p3 STAGE LENGTH QUARTER: the main table
  ev "$1-q$3" --model gemma3 --methods $P3_METHODS --tasks "$P3_TASKS" --lengths $2 --samples 20 \
     --max-new-tokens 48 --shard $3/4
}
p3_heldout() {  # p3_heldout STAGE LENGTH QUARTER: full attention and the three selectors on unseen seeds/haystack
  ev "$1-q$3" --model gemma3 --methods full,omnikv,omnikv:selector=uniform,omnikv:selector=union --tasks "$P3_TASKS" \
     --lengths $2 --samples 20 --max-new-tokens 48 --seed 1 --haystack pydoc --shard $3/4
}
p3_shared_context() {  # every method on the shared-context task (4 questions per document)
  ev p3-shared-context-2k --model gemma3 --methods $P3_METHODS --tasks shared_context --lengths 2k --samples ${SC_SAMPLES:-4} \
     --max-new-tokens 16
}
p3_speed() {  # prefill and wall seconds per sample of a six-method cell, shared vs separate, back to back
  PYTHONPATH=. $PY benchmarks/eval/shared_prefill_speed.py --model gemma3 --length 2k --samples 3 \
     --out benchmarks/eval/results/pass3/shared_prefill_speed.json
}
p3_16k() {  # p3_16k QUARTER: full attention, OmniKV and the two best baselines at 2K-4K (quest, snapkv), 3 tasks
  ev "p3-gemma3-16k-q$1" --model gemma3 --methods full,omnikv,quest,snapkv --tasks passkey,number_string,niah_multivalue \
     --lengths 16k --samples ${P3_16K_SAMPLES:-10} --max-new-tokens 48 --shard $1/4
}
p3_smollm2() {  # SmolLM2 at its competent length, every method and the three selectors
  ev p3-smollm2-1k --model smollm2 --methods $P3_METHODS --tasks passkey,niah_multikey_1 --lengths 1k --samples 20 \
     --max-new-tokens 16
}
p3_fidelity() {  # p3_fidelity LENGTH SAMPLES: agreement / KL with full attention and gold-answer perplexity
  ev "p3-fid-gemma3-$1" --model gemma3 --methods $METHODS,omnikv:selector=union --tasks niah_multikey_1 --lengths $1 \
     --samples $2 --max-new-tokens 16 --fidelity --perplexity
}
queue_p3_c() { p3_smollm2; p3_fidelity 4k 10; p3_fidelity 8k 6; }
queue_p3_a() { for q in 0 1 2 3; do p3 p3-gemma3-2k 2k $q; done; for q in 0 1 2 3; do p3 p3-gemma3-4k 4k $q; done
               for q in 0 1 2 3; do p3 p3-gemma3-8k 8k $q; done; }
queue_p3_b() { [[ ${P3_SPEED:-1} == 1 ]] && p3_speed  # P3_SPEED=0: keep the speed measurement on record
               for q in 0 1 2 3; do p3_heldout p3-heldout-2k 2k $q; done; p3_shared_context
               for q in 0 1 2 3; do p3_heldout p3-heldout-4k 4k $q; done; for q in 0 1 2 3; do p3_16k $q; done; }

# The long stages alone (8K every method, then 16K), split over two queues so both cores work on them.
queue_p3_long_a() { p3 p3-gemma3-8k 8k 0; p3 p3-gemma3-8k 8k 1; p3_16k 0; p3_16k 1; }
queue_p3_long_b() { p3 p3-gemma3-8k 8k 2; p3 p3-gemma3-8k 8k 3; p3_16k 2; p3_16k 3; }

case ${1:-run} in
  run) queue_gemma3 & q1=$!; queue_other & q2=$!; wait $q1 $q2
       queue_more_a & q1=$!; queue_more_b & q2=$!; wait $q1 $q2 ;;
  more) queue_more_a & q1=$!; queue_more_b & q2=$!; fid_smollm2_8k & q3=$!; wait $q1 $q2 $q3 ;;  # second pass alone
  pass3) queue_p3_a & q1=$!; queue_p3_b & q2=$!; queue_p3_c & q3=$!; wait $q1 $q2 $q3 ;;  # third pass alone
  pass3c) queue_p3_c ;;  # its third queue alone (SmolLM2 1K, fidelity at 4K / 8K)
  pass3long) queue_p3_long_a & q1=$!; queue_p3_long_b & q2=$!; wait $q1 $q2 ;;  # the 8K and 16K stages alone
  queue1) queue_gemma3 ;;     # one queue alone (e.g. to restart it)
  queue2) queue_other ;;
  report) ;;
  *) echo "usage: $0 [run|queue1|queue2|more|pass3|pass3c|pass3long|report]" >&2; exit 2 ;;
esac
$PY benchmarks/eval/results.py "$OUT" benchmarks/eval/results
for g in gemma3 smollm2 gemma3-more; do  # the plots docs/results.md shows
  [[ -f benchmarks/eval/results/$g/scores.png ]] && cp benchmarks/eval/results/$g/scores.png docs/img/results_$g.png
done
