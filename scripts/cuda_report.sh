#!/usr/bin/env bash
# The GPU checks in one command: the CUDA test cases (Triton kernels, every operator against the float64 CPU
# reference, channels_last, bf16 autocast, opcheck of the Triton custom op, inductor fullgraph compiles),
# the operator table against cuDNN and the unfold reference, the model table in float32 and in bf16
# autocast + channels_last, eager vs torch.compile vs CUDA graphs ("reduce-overhead"), a few training steps
# of train.py on the GPU (TensorBoard events read back), and the ablation suites as GPU sweeps.
#
#   bash scripts/cuda_report.sh [OUT_DIR]          # default: cuda_report/ ; PYTHON=... to pick python
#
# Each step's full log goes to OUT_DIR/<step>.log; its tail and exit code are printed. STEPS picks
# steps (default: "env tests ops profile models models_amp compile train"; also "smoke", a two-run sweep that
# stops the report at once if it fails, and "suites", scripts/run_suites.sh into OUT_DIR/suites with
# SUITES_DEADLINE seconds), STEP_TIMEOUT bounds each (s, default 300; STEP_TIMEOUT_<step> for one step).
# TEST_WORKERS: pytest-xdist workers for the CUDA tests (default 8; one at a time they take over 3.5 min on an H200).
# It stops at once (exit 1) when torch sees no CUDA device, and exits 1 when any step failed.
set -u
out=${1:-cuda_report}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export DYNCONV_NATIVE=${DYNCONV_NATIVE:-0}  # CPU kernel not needed here: skip its build
steps=${STEPS:-env tests ops profile models models_amp compile train}
cd "$(dirname "$0")/.."

if ! "$py" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "cuda_report: torch sees no CUDA device (torch.cuda.is_available() is False): run it on a machine" \
         "with a GPU and a CUDA build of torch, with CUDA_VISIBLE_DEVICES unset or naming a GPU" >&2
    exit 1
fi
failed=0

step() {
    local name=$1
    shift
    case " $steps " in *" $name "*) ;; *) return 0 ;; esac
    echo "== $name: $*"
    local start=$SECONDS limit_var="STEP_TIMEOUT_$name"
    timeout "${!limit_var:-${STEP_TIMEOUT:-300}}" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    [ "$rc" -eq 0 ] || failed=1
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    tail -n "${TAIL:-25}" "$out/$name.log"
    return "$rc"
}

step env bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv;
  $py -c 'import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__, torch.cuda.get_device_name())'"
step smoke "$py" train.py -m experiment=ablation_grid seed=0 "++op={name:involution},{name:dk_local}" \
    policy=deep_only data.train_subset=256 data.workers=0 trainer.epochs=1 trainer.eval_interval=1 \
    trainer.limit_val_batches=2 trainer.precise_bn_batches=1 hydra.launcher.n_jobs=2 hydra.sweep.dir="$out/smoke" \
  || { echo "cuda_report: the smoke sweep failed; stopping"; exit 1; }
step suites env DEADLINE="${SUITES_DEADLINE:-1800}" PYTHON="$py" EXTRA="data.workers=0 ${SUITES_EXTRA:-}" \
    bash scripts/run_suites.sh "$out/suites" ${SUITES:-}
step tests "$py" -m pytest -q -p no:cacheprovider -n "${TEST_WORKERS:-8}" -k cuda tests/dynconv/test_triton_pixel_filter.py \
    tests/dynconv/test_devices.py tests/dynconv/test_sample_conv.py tests/dynconv/test_native.py \
    tests/dynconv/test_compile.py tests/dynconv/test_custom_ops.py
step ops "$py" scripts/bench_ops.py --device cuda --repeat 20
step profile "$py" scripts/profile_pixel_filter.py --device cuda --rows 6
step models "$py" scripts/bench_models.py --device cuda --batch 64 --repeat 10
step models_amp "$py" scripts/bench_models.py --device cuda --batch 64 --repeat 10 --amp --channels-last
step compile "$py" scripts/bench_models.py --device cuda --batch 16 --repeat 10 \
    --models RedNet-26 "face MobileNetV2 + TVConv" --compile default reduce-overhead
step train bash -c "$py train.py model=rednet26 data=synthetic data.img_size=64 data.batch_size=64 \
    trainer.device=cuda trainer.amp=true trainer.channels_last=true trainer.epochs=2 hydra.run.dir=$out/train_run \
  && $py -c 'import glob, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(glob.glob(sys.argv[1] + \"/**/events.out.tfevents.*\", recursive=True)[0]); acc.Reload()
for tag in acc.Tags()[\"scalars\"]: print(tag, len(acc.Scalars(tag)), \"points, last\", acc.Scalars(tag)[-1].value)' $out/train_run"
exit "$failed"
