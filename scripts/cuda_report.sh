#!/usr/bin/env bash
# The GPU report in one command, sized for 8 minutes of one H100/H200, in this order:
#   env        torch, triton and the device;
#   tests      the CUDA test cases (Triton pixel_filter and involution kernels, every operator against the float64
#              CPU reference, opcheck, inductor compiles) on TEST_WORKERS pytest-xdist workers;
#   models     bench_models.py --device cuda --batch 64 --memory, float32;
#   models_amp the same in bf16 autocast + channels_last;
#   models_csv both tables appended to OUT_DIR/cuda_models.csv (a copy of docs/benchmarks/cuda_models.csv, columns
#              in scripts/dev/models_csv.py) and the run's Markdown table printed from it;
#   floor      the fused involution forward/backward against its memory floor at the RedNet-50 stage shapes;
#   dk         dk_local fwd+bwd against a depthwise 3x3 at the same shapes;
#   tiles_8, tiles_32  if time is left: the floor table again with 8 and 32 planes per program
#              (DYNCONV_TRITON_CPB; 16 in `floor`), bf16.
#
#   bash scripts/cuda_report.sh [OUT_DIR]            # default: cuda_report/ ; PYTHON=... to pick python
#   DRY_RUN=1 bash scripts/cuda_report.sh [OUT_DIR]  # on CPU: each step's command exists, its imports work
#                                                    # and its arguments parse (pytest: --collect-only)
#
# Each step's log goes to OUT_DIR/<step>.log; its tail and exit code are printed. BUDGET (s, default 470) bounds
# the whole run: each step gets min(its own limit, the time left) and a step that would get under 20 s is
# skipped. STEPS picks steps (default: the list above); opt-in steps kept from earlier reports (raise BUDGET for
# them): "ops" (bench_ops.py), "profile", "compile" (eager vs torch.compile vs CUDA graphs), "smoke" (a two-run
# ablation sweep), "suites" (scripts/run_suites.sh into OUT_DIR/suites within SUITES_DEADLINE s) and "train"
# (2 epochs of train.py).
# Exit 1 when torch sees no CUDA device (except in a dry run) or when any step failed.
set -u
case ${1:-} in -h | --help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac  # the comment above
out=${1:-cuda_report}
mkdir -p "$out"
out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
dry=${DRY_RUN:-0}
export PYTHONUNBUFFERED=1
export DYNCONV_NATIVE=${DYNCONV_NATIVE:-0}  # CPU kernel not needed here: skip its build
steps=${STEPS:-env tests models models_amp models_csv floor dk tiles_8 tiles_32}
budget=${BUDGET:-470}
cd "$(dirname "$0")/.."

if [ "$dry" != 1 ] && ! "$py" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "cuda_report: torch sees no CUDA device (torch.cuda.is_available() is False): run it on a machine" \
         "with a GPU and a CUDA build of torch, or check it with DRY_RUN=1" >&2
    exit 1
fi
failed=0

# step NAME LIMIT CMD...: run CMD (log in OUT_DIR/NAME.log) within min(LIMIT, time left). In a dry run,
# `$py script.py args` is checked by scripts/dev/check_command.py, `$py -m pytest ...` collects only (exit 5,
# nothing selected on a machine without CUDA, counts as a pass), `$py -c CODE` runs (it must not need a GPU)
# and any other command must be on PATH.
step() {
    local name=$1 limit=$2
    shift 2
    case " $steps " in *" $name "*) ;; *) return 0 ;; esac
    local left=$((budget - SECONDS))
    [ "$limit" -lt "$left" ] || limit=$left
    if [ "$dry" != 1 ] && [ "$limit" -lt 20 ]; then
        echo "== $name: skipped, $left s left of BUDGET=$budget"
        return 0
    fi
    if [ "$dry" = 1 ]; then
        local vars=(env)
        if [ "$1" = env ]; then
            shift
            while [[ "$1" == *=* ]]; do vars+=("$1"); shift; done
        fi
        if [ "$1" = "$py" ] && [ "${2:-}" = "-m" ] && [ "${3:-}" = pytest ]; then
            set -- "$@" --collect-only
        elif [ "$1" = "$py" ] && [[ "${2:-}" == *.py ]]; then
            set -- "$py" scripts/dev/check_command.py "${@:2}"
        elif [ "$1" != "$py" ] || [ "${2:-}" != "-c" ]; then
            set -- bash -c 'command -v "$1"' command "$1"
        fi
        set -- "${vars[@]}" "$@"
        limit=300
    fi
    echo "== $name: $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    [ "$dry" = 1 ] && [ "$rc" -eq 5 ] && [[ " $* " == *" --collect-only "* ]] && rc=0
    [ "$rc" -eq 0 ] || failed=1
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    tail -n "${TAIL:-25}" "$out/$name.log"
    return "$rc"
}

step env 30 "$py" -c 'import torch, triton
print("torch", torch.__version__, "triton", triton.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "(no CUDA device)")'
step tests 150 "$py" -m pytest -q -p no:cacheprovider -n "${TEST_WORKERS:-12}" -k cuda \
    tests/dynconv/test_triton_pixel_filter.py tests/dynconv/test_triton_involution.py \
    tests/dynconv/test_triton_deform_kernel.py tests/dynconv/test_devices.py \
    tests/dynconv/test_sample_conv.py tests/dynconv/test_native.py tests/dynconv/test_compile.py \
    tests/dynconv/test_custom_ops.py
models=(--models ResNet-50 RedNet-50 "DDF-ResNet-50 (mul)" "face MobileNetV2 (depthwise)" "face MobileNetV2 + TVConv")
step models 110 "$py" scripts/bench_models.py --device cuda --batch 64 --repeat 5 --memory "${models[@]}"
step models_amp 110 "$py" scripts/bench_models.py --device cuda --batch 64 --repeat 5 --memory --amp --channels-last \
    "${models[@]}"
[ -f "$out/cuda_models.csv" ] || [ ! -f docs/benchmarks/cuda_models.csv ] || cp docs/benchmarks/cuda_models.csv "$out/"
step models_csv 30 "$py" scripts/dev/models_csv.py "$out/cuda_models.csv" "fp32=$out/models.log" "bf16=$out/models_amp.log"
step floor 50 "$py" scripts/dev/bench_floor.py --device cuda --table floor --batch 64 --repeat 20
step dk 50 "$py" scripts/dev/bench_floor.py --device cuda --table dk --batch 64 --repeat 10
for cpb in 8 32; do
    step "tiles_$cpb" 60 env "DYNCONV_TRITON_CPB=$cpb" "$py" scripts/dev/bench_floor.py --device cuda --table floor \
        --dtypes bf16 --repeat 20
done
step ops 300 "$py" scripts/bench_ops.py --device cuda --repeat 20
step profile 120 "$py" scripts/dev/profile_pixel_filter.py --device cuda --rows 6
step compile 300 "$py" scripts/bench_models.py --device cuda --batch 16 --repeat 10 \
    --models RedNet-26 "face MobileNetV2 + TVConv" --compile default reduce-overhead
step smoke 300 "$py" train.py -m experiment=ablation_grid seed=0 "++op={name:involution},{name:dk_local}" \
    policy=deep_only data.train_subset=256 data.workers=0 trainer.epochs=1 trainer.eval_interval=1 \
    trainer.limit_val_batches=2 trainer.precise_bn_batches=1 hydra.launcher.n_jobs=2 hydra.sweep.dir="$out/smoke"
step suites "${SUITES_DEADLINE:-1800}" env DEADLINE="${SUITES_DEADLINE:-1800}" PYTHON="$py" \
    EXTRA="data.workers=0 ${SUITES_EXTRA:-}" bash scripts/run_suites.sh "$out/suites" ${SUITES:-}
step train 300 "$py" train.py model=rednet26 data=synthetic data.img_size=64 data.batch_size=64 trainer.device=cuda \
    trainer.amp=true trainer.channels_last=true trainer.epochs=2 "hydra.run.dir=$out/train_run"
exit "$failed"
