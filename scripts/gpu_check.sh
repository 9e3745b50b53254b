#!/bin/bash
# The checks that need a GPU, in one script (a lent GPU machine is billed per call):
#   1. training on the GPU: jobs.train --use-gpu --amp bf16 (NCCL) on BUSI at 256 px; the log's
#      per-epoch lines show images/s and the share of time the worker waited for data;
#   2. bulk inference on the GPU (fp16 autocast) against the same job on the CPU, same archive:
#      the same ids come back and the masks agree pixel for pixel (up to fp16 rounding);
#   3. the benchmarks' --gpu modes while time remains (train_throughput, infer_efficiency,
#      infer_vs_naive), results under $OUT/bench.
# DRY=1 runs the same steps tiny on the CPU, to catch script errors before device time is spent.
# Inputs: .gpu/busi_small (python -m jobs.prepare ... --max-side 288, train/val of BUSI) and, on a
# machine without Ray, .gpu/site.tar.xz (the missing packages unpacked into one tarball); see
# docs/operations.md, "Running the GPU checks".
# SWEEP=1 runs only the inference sweep of #16 (under 8 minutes): bench.infer_efficiency --gpu over
# 20,000 phantom images of 256x256 for several model actors per GPU and batch sizes, one table.
set -u  # the results of one run (2026-11-29) are in README.md, "Measured on a GPU"
export PYTHONUNBUFFERED=1 RAY_DEDUP_LOGS=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p $OUT
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
if [ "${SWEEP:-0}" = 1 ]; then
  if [ "${DRY:-0}" = 1 ]; then PY=.venv/bin/python; N=48; GPU=""; SIDE=48; ISZ=32; CPW=0.5; SETTINGS="1:1:8 2:0.5:8"
  else
    mkdir -p /tmp/site && tar -xJf .gpu/site.tar.xz -C /tmp/site || exit 3
    export PYTHONPATH=/tmp/site:$PWD
    PY=python3; N=${N:-20000}; GPU="--gpu"; SIDE=256; ISZ=256; CPW=1
    SETTINGS=${SETTINGS:-"1:1:64 1:1:256 2:0.5:128 4:0.25:128 4:0.25:256"}  # actors:GPU each:batch
  fi
  export UNET_BENCH_RESULTS=$OUT/sweep; mkdir -p $OUT/sweep
  printf "%-8s %-10s %-6s %-14s %-12s %-12s %s\n" actors gpu_each batch "job images/s" "model-only" ratio "bytes/image handed on" | tee $OUT/sweep.txt
  for s in $SETTINGS; do
    IFS=: read W G B <<< "$s"
    $PY -m bench.infer_efficiency $GPU --n $N --size $SIDE --input-size $ISZ --workers $W --gpus-per-worker $G \
      --cpus-per-worker $CPW --batch-size $B > $OUT/sweep/log-$W-$G-$B.txt 2>&1 || { echo "$s failed:"; tail -3 $OUT/sweep/log-$W-$G-$B.txt; continue; }
    $PY - "$OUT/sweep/infer_efficiency.json" "$W" "$G" "$B" <<'PY' | tee -a $OUT/sweep.txt
import json, sys
r = json.load(open(sys.argv[1])); j = r["job"]
print(f"{sys.argv[2]:<8} {sys.argv[3]:<10} {sys.argv[4]:<6} {j['pipeline_images_per_s']:<14.0f} "
      f"{r['model_only_in_process']['mean_images_per_s']:<12.0f} {r['ratio']:<12.2f} {r['bytes_per_image']}")
PY
    mv $OUT/sweep/infer_efficiency.json $OUT/sweep/infer_efficiency-$W-$G-$B.json 2>/dev/null
  done
  echo "[t=$(el)s] sweep done" | tee -a $OUT/sweep.txt
  exit 0
fi
if [ "${DRY:-0}" = 1 ]; then
  PY=.venv/bin/python; G=""; GI="--gpus-per-worker 0"; EP=2; WU=0; BS=4; SZ=64; NB=16; BUDGET=99999; TRAIN_T=600
else
  mkdir -p /tmp/site && tar -xJf .gpu/site.tar.xz -C /tmp/site || exit 3
  export PYTHONPATH=/tmp/site:$PWD
  PY=python3; G="--use-gpu --amp bf16 --workers 1"; GI="--gpus-per-worker 1"; EP=${EP:-80}; WU=3; BS=16; SZ=256; NB=2000
  BUDGET=${BUDGET:-480}; TRAIN_T=${TRAIN_T:-330}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee $OUT/env.log
  nproc | tee -a $OUT/env.log
fi
$PY -c "import torch, ray, albumentations, numpy, pyarrow; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'ray', ray.__version__, 'numpy', numpy.__version__, 'pyarrow', pyarrow.__version__)" 2>&1 | tee -a $OUT/env.log
echo "[t=$(el)s] unpacked" | tee -a $OUT/env.log

# 1. BUSI at 256 px on the GPU (shards prepared with --max-side 288)
echo "[t=$(el)s] train" | tee -a $OUT/env.log
TRAIN="$PY -m jobs.train --config configs/busi.yaml --data .gpu/busi_small --storage /tmp/runs --name busi-unet-256 --image-size $SZ --batch-size $BS --epochs $EP --warmup-epochs $WU $G"
timeout -s INT $TRAIN_T $TRAIN > $OUT/train.log 2>&1; rc=$?
echo "[t=$(el)s] train rc=$rc" | tee -a $OUT/env.log
if [ $rc != 0 ]; then  # ran out of time: export the best checkpoint so far (a rerun of a finished run only exports)
  done=$(grep -o "epoch [0-9]*/" $OUT/train.log | tail -1 | tr -dc 0-9)
  $TRAIN --epochs ${done:-1} >> $OUT/train.log 2>&1; echo "[t=$(el)s] export rc=$?" | tee -a $OUT/env.log
fi
tar -cf $OUT/busi-unet-256.tar -C /tmp/runs/busi-unet-256 model 2>/dev/null
grep -a -E "\[unet.train\]|^run |rror" $OUT/train.log | tail -12

# 2. bulk inference with that model on the GPU vs on the CPU, same archive: masks should agree
echo "[t=$(el)s] infer" | tee -a $OUT/env.log
$PY - <<'PY'
from pathlib import Path
from jobs.demo import write_archive
write_archive(Path("/tmp/archive"), 64)
PY
M=/tmp/runs/busi-unet-256/model
$PY -m jobs.infer --model $M --input /tmp/archive --output /tmp/masks_gpu $GI --batch-size 16 > $OUT/infer.log 2>&1; echo "gpu infer rc=$?" | tee -a $OUT/env.log
$PY -m jobs.infer --model $M --input /tmp/archive --output /tmp/masks_cpu --gpus-per-worker 0 --batch-size 16 >> $OUT/infer.log 2>&1; echo "cpu infer rc=$?" | tee -a $OUT/env.log
$PY - <<'PY' 2>&1 | tee -a $OUT/env.log
import io, numpy as np, pyarrow.dataset as ds
from PIL import Image
def load(p):
    t = ds.dataset(p, format="parquet").to_table().to_pylist()
    return {r["image_id"]: r for r in t}
g, c = load("/tmp/masks_gpu"), load("/tmp/masks_cpu")
ok = sum(r["status"] == "ok" for r in g.values())
agree, px = [], 0
for k in g:
    a = np.asarray(Image.open(io.BytesIO(g[k]["mask_png"]))) > 0
    b = np.asarray(Image.open(io.BytesIO(c[k]["mask_png"]))) > 0
    agree.append((a == b).mean()); px += (a != b).sum()
print(f"infer: {len(g)} rows gpu ({ok} ok), {len(c)} cpu; same ids {set(g) == set(c)}; "
      f"pixel agreement gpu vs cpu: min {min(agree):.5f} mean {np.mean(agree):.6f}; differing pixels {px}")
PY
echo "[t=$(el)s] benches" | tee -a $OUT/env.log
# 3. benches with --gpu while time remains
export UNET_BENCH_RESULTS=$OUT/bench; mkdir -p $OUT/bench
run_bench() { if [ $(el) -lt $BUDGET ]; then echo "[t=$(el)s] $*" | tee -a $OUT/env.log; timeout -s INT $(( BUDGET + 60 - $(el) )) $PY -m "$@" >> $OUT/bench.log 2>&1; echo "rc=$?" >> $OUT/bench.log; tail -1 $OUT/bench.log; fi; }
if [ "${DRY:-0}" = 1 ]; then
  run_bench bench.train_throughput --num 16 --image-size 64 --epochs 1 --batch-size 4
  run_bench bench.infer_efficiency --n 32 --batch-size 8
else
  run_bench bench.train_throughput --gpu --amp bf16 --image-size 256 --num 400 --batch-size 32 --augment-on gpu
  run_bench bench.train_throughput --gpu --amp bf16 --image-size 256 --num 400 --batch-size 32 --augment-on cpu
  run_bench bench.infer_efficiency --gpu --n $NB --batch-size 64 --input-size 256
  run_bench bench.infer_vs_naive --gpu --n $NB --batch-size 64 --sizes square --size 256 --model random --input-size 256 --rounds 1
fi
grep -h -E "ratio|images/s|img/s" $OUT/bench.log | tail -20
(cd $OUT && tar -cf bench.tar bench && rm -rf bench)
echo "[t=$(el)s] done" | tee -a $OUT/env.log
