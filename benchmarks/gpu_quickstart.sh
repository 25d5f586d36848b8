#!/usr/bin/env bash
# The quickstart recipe and the DALI-fed train.py loop on one GPU, in one prepared device call (issue 14's
# seed spread; the GPU paths: mixed decoding, AMP, throughput). About 5 minutes on an H200 (figures of
# 2026-11-30 in benchmarks/results/quickstart.md and performance.md).
#
# The device machine has torch, torchvision, Lightning and torchmetrics but no DALI, Hydra or network. Once, on
# the development machine (the repo root; .whl ignored through .git/info/exclude):
#   wheels (7 MB): python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
#       --platform manylinux_2_28_x86_64 ... -d .whl hydra-core==1.3.8 omegaconf==2.3.1 faster-coco-eval==1.8.0
#       pycocotools==2.0.11 orjson==3.13.0 libcst==1.9.0 optree==0.20.0 nvtx==0.2.17 makefun==1.16.0
#       gast==0.7.0 astunparse==1.6.3; python -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3
#   DALI (the installed tree of nvidia-dali-cuda120 2.4.0 and its nvimgcodec/nvjpeg/nvcomp packages, 1 GB, as
#   an xz tarball of 252 MiB in five parts of at most 60 MiB, one call's worth each, each in its own ignored
#   folder .p0 ... .p4 listed in .git/info/exclude):
#       tar -C .venv/lib/python3.11/site-packages --exclude=__pycache__ --exclude=nvidia/__init__.py -cf - \
#           nvidia/dali nvidia/nvimgcodec nvidia/nvjpeg nvidia/nvjpeg2k nvidia/nvtiff nvidia/libnvcomp \
#           nvidia_dali_cuda120-2.4.0.dist-info nvidia_nvimgcodec_cu12-*.dist-info ... | xz -T2 -8 > dali.tar.xz
#       split -b 60M -d dali.tar.xz dali.tar.xz.part; mkdir .p0; mv dali.tar.xz.part00 .p0/ ...
# Then device calls back to back (the machine goes back after 30 s idle). Each call's working tree replaces
# the last one's, carried folders included, so each call copies its part out of the tree:
#   carry=[".p0"], command="mkdir -p /tmp/parts && cp .p0/* /tmp/parts/"   ... likewise .p1 to .p3, then
#   carry=[".p4", ".whl"], command="bash benchmarks/gpu_quickstart.sh", timeout_s=560.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_quickstart}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
RUNS=$(mktemp -d)
START=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - START )) s] $*"; }

stamp "install"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl || exit 1
fi
SITE=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
PARTS=${PARTS:-/tmp/parts}  # earlier calls copied their parts here (the tree's ignored paths don't stay)
mkdir -p "$PARTS" && cp .p*/dali.tar.xz.part* "$PARTS"/ 2>/dev/null
if ls "$PARTS"/dali.tar.xz.part* >/dev/null 2>&1 && ! python3 -c "import nvidia.dali" 2>/dev/null; then
    cat "$PARTS"/dali.tar.xz.part* | python3 -c "import sys, tarfile; \
tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall(sys.argv[1], filter='tar')" "$SITE" || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, pytorch_lightning as pl, nvidia.dali as d; print('torch', torch.__version__, \
'lightning', pl.__version__, 'dali', d.__version__, 'cpus', __import__('os').cpu_count())" || exit 1

# 1. the seed spread (issue 14): the recipe as on the CPU (CPU DALI pipeline, fp32), 3 seeds x 2 sets, the two
# sets side by side (so the wall times are of two runs sharing the GPU)
stamp "quickstart seeds, fp32, CPU data pipeline"
PIDS=()
for set in builtin second; do
    timeout 270 python3 benchmarks/quickstart_seeds.py --out "$RUNS/seeds_$set" --sets $set --seeds 0,1,2 \
        trainer=gpu trainer.precision=32-true > "$RUNS/seeds_$set.txt" 2>&1 &
    PIDS+=($!)
done
wait "${PIDS[@]}"  # not a bare wait: that would also wait for the tee of this script's output
cat "$RUNS"/seeds_*.txt
stamp "done"

# 2. the quickstart as a GPU user runs it, alone: mixed decoding (data.device=gpu), bf16 AMP, built-in set
stamp "quickstart, mixed decoding, bf16-mixed"
T0=$(date +%s)
timeout 150 python3 train.py experiment=quickstart trainer=gpu trainer.precision=bf16-mixed data.device=gpu \
    data.num_threads=4 synthetic.root="$RUNS/data/builtin" hydra.run.dir="$RUNS/gpu_bf16_mixed" 2>&1 \
    | grep -v "^\s*$" | tail -40
stamp "done: $(( $(date +%s) - T0 )) s end to end"

# 3. training throughput of NVIDIA's model (ResNet-50) alone, batches made on the device, bf16, batch 128
stamp "benchmark.py mode=train, synthetic input, bf16-mixed, batch 128"
timeout 100 python3 benchmark.py mode=train benchmark.input=synthetic trainer=gpu trainer.precision=bf16-mixed \
    data.batch_size=128 benchmark.warmup=10 benchmark.repeats=5 benchmark.steps_per_repeat=10 \
    fastpath.channels_last=true fastpath.optimizer=fused fastpath.cudnn_benchmark=true \
    hydra.run.dir="$RUNS/throughput_synthetic" 2>&1 | tail -6

# 4. the train.py loop fed by DALI on the GPU (mixed decoding) over a COCO-like set of 480x480 JPEGs, bf16
if [ $(( $(date +%s) - START )) -lt 340 ]; then
    stamp "COCO-like set, 4000 images of 480x480"
    python3 benchmarks/coco_scale.py "$RUNS/coco" --train 4000 --val 100 --size 480 | tail -1
    stamp "benchmark.py mode=train on it, mixed decoding, bf16-mixed, batch 128, 8 threads"
    timeout 120 python3 benchmark.py mode=train data.root="$RUNS/coco" trainer=gpu trainer.precision=bf16-mixed \
        data.device=gpu data.batch_size=128 data.num_threads=8 benchmark.warmup=5 benchmark.repeats=5 \
        benchmark.steps_per_repeat=5 fastpath.channels_last=true fastpath.optimizer=fused \
        benchmark.count_syncs=true hydra.run.dir="$RUNS/loop_dali" 2>&1 | tail -8
fi

stamp "collect"
( cd "$RUNS" && find . -name "*.csv" -o -name "*.yaml" -o -name "*.log" -o -name "*.json" -o -name "seeds_*.txt" \
    | grep -v "/data/\|/coco/" | tar -cf "$OUT/runs.tar" -T - )
grep -h -A8 "^####" "$RUNS"/seeds_*.txt > "$OUT/summary.md"
rm -rf "$RUNS"
stamp "end"
