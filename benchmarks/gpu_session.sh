#!/usr/bin/env bash
# The GPU measurements of benchmarks/results/performance.md in one prepared run (about 8-10 minutes on an
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
# $OUT gets results.tar (the JSON of every run), train_profile.txt, postprocess.md, gpu.txt and
# nvidia_smi_ddp.csv (the compute processes sampled during the DDP run: one per GPU expected).
# The train.py loop (issue 16): `mode=train` builds train.py's loop (its callbacks, checkpoints each epoch);
# `benchmark.steps_per_epoch` makes it cross epoch boundaries; each run's JSON has `epoch_boundary_gap_s`,
# `data_wait_share`, `blocking_host_syncs_per_step` (0 expected) and `epoch_memory` (peak per epoch). With
# DALI on the machine (`import nvidia.dali`), the data pipeline is measured at 4 and 8 threads and train.py runs
# on a generated COCO-like set (benchmarks/coco_scale.py); without it those runs are skipped and the loop runs
# on device-made batches. DDP uses min(2, GPUs) processes.
# Without a GPU, `SMOKE=1 bash benchmarks/gpu_session.sh` runs the same commands on the CPU with tiny sizes
# (checks that they compose and run).
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
    DDP="trainer=ddp trainer.accelerator=cpu trainer.precision=32-true model.backbone=resnet18" NGPU=2
    LOOP="benchmark.warmup=1 benchmark.repeats=2 benchmark.steps_per_repeat=2 benchmark.steps_per_epoch=3"
    SET_SIZE="--train 64 --val 8" LOOP_BATCH=4
else
    DEVICE="trainer=gpu trainer.precision=bf16-mixed"
    TRAIN_BATCH=128 INFER_BATCH=64 SCALING="[8,32,64,128,256]" STEPS="benchmark.warmup=10 benchmark.repeats=5 benchmark.steps_per_repeat=10"
    PP_ARGS="--device cuda --batch 64 --repeats 5 --nvidia-repeats 1 --case realistic"
    NGPU=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU")
    DDP="trainer=ddp trainer.precision=bf16-mixed"
    # 2 epochs of 20 steps (+ warm-up): the epoch boundary falls inside the timed part
    LOOP="benchmark.warmup=5 benchmark.repeats=7 benchmark.steps_per_repeat=5 benchmark.steps_per_epoch=20"
    SET_SIZE="--train 6000 --val 500" LOOP_BATCH=128
fi
RANKS=$(( NGPU >= 2 ? 2 : 1 ))

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
# the train.py loop across epoch boundaries (issue 16): gap, data wait, host syncs, memory per epoch
if python3 -c "import nvidia.dali" 2>/dev/null; then
    echo "=== COCO-like set: python benchmarks/coco_scale.py $RUNS/coco $SET_SIZE"
    timeout 120 python3 benchmarks/coco_scale.py "$RUNS/coco" $SET_SIZE | tail -2
    DATA="data.root=$RUNS/coco"
    # the data pipeline alone, 4 and 8 threads
    for threads in 4 8; do
        bench "data_${threads}threads" mode=data $DEVICE "benchmark.batch_sizes=[$LOOP_BATCH]" $DATA \
            data.num_threads=$threads $STEPS
    done
else
    echo "=== no DALI here: the data pipeline is not measured; the train.py loop runs on device-made batches"
    DATA="benchmark.input=synthetic"
fi
LOOP_RUN="mode=train $DATA data.batch_size=$LOOP_BATCH data.num_threads=8 $LOOP benchmark.count_syncs=true"
bench loop_1gpu $LOOP_RUN $DEVICE
# DDP on RANKS GPUs, with one compute process per GPU sampled from nvidia-smi meanwhile
( while sleep 3; do nvidia-smi --query-compute-apps=gpu_uuid,pid,used_memory --format=csv,noheader 2>/dev/null; \
    echo "--"; done ) > "$OUT/nvidia_smi_ddp.csv" &
SMI=$!
bench "loop_ddp${RANKS}" $LOOP_RUN $DDP trainer.devices=$RANKS
kill "$SMI" 2>/dev/null
python3 - "$RUNS/json" <<'PY'
import json, sys
from pathlib import Path
for path in sorted(Path(sys.argv[1]).glob("loop_*.json")):
    for run in json.loads(path.read_text())["runs"]:
        mem = [m.get("device_max_allocated_bytes", m.get("peak_rss_bytes")) for m in run.get("epoch_memory", [])]
        print(path.stem, "x%d" % run["world_size"], "images/s %.1f" % run["images_per_s"]["median"],
              "gap_s", run.get("epoch_boundary_gap_s"), "data_wait_share", run.get("data_wait_share"),
              "blocking_syncs", run.get("blocking_host_syncs_per_step"), "peak_bytes_per_epoch", mem)
PY
# post-processing: NVIDIA's loop vs ours on the same device
echo "=== postprocess_vs_nvidia $PP_ARGS"
timeout 240 python3 benchmarks/postprocess_vs_nvidia.py $PP_ARGS 2>&1 | tee "$OUT/postprocess.md"
rm -rf "$RUNS"
