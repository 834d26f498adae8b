#!/usr/bin/env bash
# The ablation suites and the training-budget curve, each one `train.py -m experiment=<suite>` sweep into
# OUT/<suite> (the budget curve's two, budget_curve and budget_curve_dk_local, into OUT/budget_curve/{main,dk_local}),
# all started at once (each suite runs hydra.launcher.n_jobs runs at a time):
#
#   bash scripts/run_suites.sh OUT [SUITE ...]      # default: the six ablation suites and the budget curve
#   SEEDS=0,1,2,3,4 JOBS=2 EXTRA="trainer.device=cuda" bash scripts/run_suites.sh multirun/gpu
#
# Environment: SEEDS (default: each suite's own seeds; SEEDS_<suite> for one suite), JOBS (runs at a time per suite; JOBS_<suite> for one
# suite; default: the suite's own), EXTRA (more overrides for every run), DEADLINE (seconds: the sweeps still
# going then are stopped), PYTHON. `python scripts/ablation_table.py OUT/<suite> --out docs/results/<suite>` then
# reads the finished runs and names the ones it skips (stopped by the deadline, or failed). Each suite's log is
# OUT/<suite>.log; the exit code is 1 if any sweep did not end cleanly.
set -u
case ${1:-} in -h | --help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac  # the comment above
out=${1:?usage: run_suites.sh OUT [SUITE ...]}
shift
suites=${*:-ablation_involution ablation_ddf ablation_dcd ablation_dk ablation_tvconv ablation_grid budget_curve budget_curve_dk_local}
py=${PYTHON:-python}
cd "$(dirname "$0")/.."
mkdir -p "$out"

pids=()
for suite in $suites; do
    jobs_var="JOBS_$suite"
    jobs=${!jobs_var:-${JOBS:-}}
    dir=$out/$suite
    # the budget curve's two sweeps side by side, so OUT/budget_curve is tabulated as one curve
    case $suite in budget_curve) dir=$out/budget_curve/main ;; budget_curve_*) dir=$out/budget_curve/${suite#budget_curve_} ;; esac
    mkdir -p "$(dirname "$dir")"
    args=(train.py -m "experiment=$suite" "hydra.sweep.dir=$dir")
    seeds_var="SEEDS_$suite"
    seeds=${!seeds_var:-${SEEDS:-}}
    [ -n "$seeds" ] && args+=("seed=$seeds")
    [ -n "$jobs" ] && args+=("hydra.launcher.n_jobs=$jobs")
    # shellcheck disable=SC2206  # EXTRA is a list of overrides, split on spaces
    args+=(${EXTRA:-})
    echo "$suite: $py ${args[*]}"
    setsid "$py" "${args[@]}" >"$out/$suite.log" 2>&1 &  # own process group: the deadline stops its workers too
    pids+=($!)
done

if [ -n "${DEADLINE:-}" ]; then
    alive() { for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && return 0; done; return 1; }
    end=$((SECONDS + DEADLINE))
    while [ $SECONDS -lt $end ] && alive; do sleep 2; done
    for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null; done
    sleep 3
    for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null; done
fi
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
exit "$failed"
