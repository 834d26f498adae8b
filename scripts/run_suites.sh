#!/usr/bin/env bash
# The ablation suites and the training-budget curve, each one `train.py -m experiment=<suite>` sweep into
# OUT/<suite>, all started at once (each suite runs hydra.launcher.n_jobs runs at a time):
#
#   bash scripts/run_suites.sh OUT [SUITE ...]      # default: the six ablation suites and budget_curve
#   SEEDS=0,1,2,3,4 JOBS=2 EXTRA="trainer.device=cuda" bash scripts/run_suites.sh multirun/gpu
#
# Environment: SEEDS (default: each suite's own seeds; SEEDS_<suite> for one suite), JOBS (runs at a time per suite; JOBS_<suite> for one
# suite; default: the suite's own), EXTRA (more overrides for every run), DEADLINE (seconds: the sweeps still
# going then are stopped), PYTHON. A run that did not finish (stopped by the deadline, or failed) has its folder
# moved to OUT/<suite>.unfinished/, so that `python scripts/ablation_table.py OUT/<suite> --out docs/results/<suite>`
# reads finished runs only. Each suite's log is OUT/<suite>.log; the exit code is 1 if any run did not finish.
set -u
out=${1:?usage: run_suites.sh OUT [SUITE ...]}
shift
suites=${*:-ablation_involution ablation_ddf ablation_dcd ablation_dk ablation_tvconv ablation_grid budget_curve}
py=${PYTHON:-python}
cd "$(dirname "$0")/.."
mkdir -p "$out"

pids=()
for suite in $suites; do
    jobs_var="JOBS_$suite"
    jobs=${!jobs_var:-${JOBS:-}}
    args=(train.py -m "experiment=$suite" "hydra.sweep.dir=$out/$suite")
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
    end=$((SECONDS + DEADLINE))
    while [ $SECONDS -lt $end ] && kill -0 "${pids[@]}" 2>/dev/null; do sleep 2; done
    for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null; done
    sleep 3
    for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null; done
fi
wait

"$py" - "$out" $suites <<'EOF'
import json, sys
from pathlib import Path

out, suites, unfinished = Path(sys.argv[1]), sys.argv[2:], 0
for suite in suites:
    done = 0
    for run in sorted(p for p in (out / suite).glob("*") if p.is_dir() and p.name.isdigit()):
        summary = run / "summary.json"
        s = json.loads(summary.read_text()) if summary.is_file() else {}
        if s and s["epochs_done"] == s["total_epochs"]:
            done += 1
        else:
            (out / f"{suite}.unfinished").mkdir(exist_ok=True)
            run.rename(out / f"{suite}.unfinished" / run.name)
            unfinished += 1
    print(f"{suite}: {done} runs finished")
sys.exit(1 if unfinished else 0)
EOF
