#!/usr/bin/env bash
# One device call (stop 22): raytr's Triton loss kernel on the GPU: the loss alone (1M head), its
# correctness tests, the 1M fp16 training step with it, against the bare loop in the same run.
T0=$(date +%s); BUDGET=${BUDGET:-450}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
cap() { l=$(left); echo $(( l < $1 ? l : $1 )); }
mark() { echo "$1 rc=$2 at $(( $(date +%s) - T0 )) s" | tee -a $OUT/times.txt; }
mkdir -p /tmp/site && xz -dc .devsite/site.tar.xz | tar xf - -C /tmp/site || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv > $OUT/gpu.txt 2>&1
python -c "import triton, torch; print('triton', triton.__version__, 'torch', torch.__version__)" | tee -a $OUT/times.txt
mark unpacked 0
timeout $(cap 150) python bench/head_kernels.py --variants bare,eager,compiled,triton,triton-2k,triton-8k,triton-32k,compiled-auto > $OUT/head.log 2>&1
mark head-kernels $?
cp bench/results/head-kernels-cuda.json $OUT/ 2>/dev/null
timeout $(cap 75) python -m pytest -q -m gpu tests/test_head.py -p no:cacheprovider > $OUT/tests.log 2>&1
mark tests-head $?
l=$(left); if [ "$l" -gt 120 ]; then
  timeout $(cap 230) python bench/train.py --device cuda --configs 1M --precision fp16 \
    --impls bare-compiled,raytr-local-cudagraphs,raytr-local-cudagraphs-triton --merge > $OUT/train.log 2>&1
  mark train-1M-fp16 $?
  cp bench/results/train-cuda.json $OUT/ 2>/dev/null
else mark "skip train ($l s left)" 0; fi
l=$(left); if [ "$l" -gt 40 ]; then
  timeout $(cap 100) python -m pytest -q -m gpu tests/test_gpu.py -k "mixed_precision and triton" -p no:cacheprovider >> $OUT/tests.log 2>&1
  mark tests-gpu-triton $?
fi
grep -h "bench\.\|ms\b" $OUT/head.log | tail -14
tail -3 $OUT/tests.log
grep -h "bench.train:" $OUT/train.log | tail -4
cat $OUT/times.txt
