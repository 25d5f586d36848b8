#!/usr/bin/env bash
# The GPU measurements of benchmarks/results/performance.md in one prepared run (about 6-8 minutes on an
# H100), for a session that is lent a GPU machine. That machine has torch, torchvision and Lightning but no
# DALI, Hydra or network, so it measures the model alone on batches made on the device
# (`benchmark.input=synthetic`) and inference end to end with NMS on random images.
#
# Once, on the development machine (pure-Python wheels, 0.3 MB; verified 2026-11-25):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl hydra-core==1.3.8 omegaconf==2.3.1
#   python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3     # sdist only: build the wheel
# Then the device call:  command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=580.
# $OUT gets results.tar (the JSON of every run), train_profile.txt, postprocess.md and gpu.txt. Without a GPU, `SMOKE=1 bash benchmarks/gpu_session.sh`
# runs the same commands on the CPU with tiny sizes (checks that they compose and run).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
OUT=${OUT:-outputs/gpu_session}
mkdir -p "$OUT"
RUNS=$(mktemp -d)
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore

if [ "${SMOKE:-0}" = 1 ]; then
    DEVICE="trainer.accelerator=cpu trainer.devices=1 trainer.precision=bf16-mixed model.backbone=resnet18"
    TRAIN_BATCH=2 INFER_BATCH=2 SCALING="[1,2]" STEPS="benchmark.warmup=2 benchmark.repeats=1 benchmark.steps_per_repeat=1"
    PP_ARGS="--device cpu --batch 2 --repeats 1 --nvidia-repeats 1 --case realistic"
else
    DEVICE="trainer=gpu trainer.precision=bf16-mixed"
    TRAIN_BATCH=128 INFER_BATCH=64 SCALING="[8,32,64,128,256]" STEPS="benchmark.warmup=10 benchmark.repeats=5 benchmark.steps_per_repeat=10"
    PP_ARGS="--device cuda --batch 64 --repeats 5 --nvidia-repeats 1 --case realistic"
fi

mkdir -p "$RUNS/json"
bench() {  # bench NAME OVERRIDES...: one benchmark.py run; its JSON goes into $OUT/results.tar as NAME.json
    local name=$1
    shift
    echo "=== $name: python benchmark.py $*"
    timeout 240 python3 benchmark.py "$@" "hydra.run.dir=$RUNS/$name" 2>&1 | grep -v "^\[rank\|LOCAL_RANK" | tail -8
    cp "$RUNS/$name/benchmark.json" "$RUNS/json/$name.json" 2>/dev/null || echo "=== $name: no benchmark.json"
    tar -C "$RUNS/json" -cf "$OUT/results.tar" .
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee "$OUT/gpu.txt"
python3 -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'lightning', pl.__version__)"

# training step, model alone (device-made batches), bf16, batch 128: fast path off, then on
TRAIN="mode=train benchmark.input=synthetic $DEVICE data.batch_size=$TRAIN_BATCH $STEPS"
bench train_off $TRAIN fastpath.channels_last=false fastpath.optimizer=auto fastpath.cudnn_benchmark=false
bench train_on $TRAIN fastpath.channels_last=true fastpath.optimizer=fused fastpath.cudnn_benchmark=true
bench train_on_compile $TRAIN fastpath.channels_last=true fastpath.optimizer=fused fastpath.compile=true
# where the time of a step goes: torch.profiler's operator and kernel table of the fast-path step
bench train_profile $TRAIN fastpath.channels_last=true fastpath.optimizer=fused benchmark.profiler=pytorch \
    benchmark.repeats=1
cp "$RUNS"/train_profile/fit-profile_b*.txt "$OUT/train_profile.txt" 2>/dev/null
# inference end to end with NMS, batch 64 (random weights: denser NMS than a trained network)
INFER="mode=inference $DEVICE $STEPS"
bench infer_on $INFER "benchmark.batch_sizes=[$INFER_BATCH]" fastpath.channels_last=true
bench infer_per_group_nms $INFER "benchmark.batch_sizes=[$INFER_BATCH]" fastpath.channels_last=true \
    fastpath.nms_method=kernel
bench infer_scaling $INFER "benchmark.batch_sizes=$SCALING" fastpath.channels_last=true benchmark.breakdown=false
# post-processing: NVIDIA's loop vs ours on the same device
echo "=== postprocess_vs_nvidia $PP_ARGS"
timeout 240 python3 benchmarks/postprocess_vs_nvidia.py $PP_ARGS 2>&1 | tee "$OUT/postprocess.md"
rm -rf "$RUNS"
