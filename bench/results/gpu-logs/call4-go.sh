#!/usr/bin/env bash
# One device call: the Trainer-gap bisection, then the 5k/50k training ratios (current code).
T0=$(date +%s); BUDGET=${BUDGET:-530}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
mkdir -p /tmp/site && xz -dc .devsite/site.tar.xz | tar xf - -C /tmp/site || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv > $OUT/gpu.txt 2>&1
echo "unpacked after $(( $(date +%s) - T0 )) s" | tee $OUT/times.txt
timeout $(( $(left) < 170 ? $(left) : 170 )) python bench/profile_gpu.py --configs 50k --precision fp16 \
  --variants trainer,trainer-quiet,trainer-nogc,raytr-compiled,bare-compiled --steps 5 > $OUT/profile.log 2>&1
echo "profile rc=$? at $(( $(date +%s) - T0 )) s" | tee -a $OUT/times.txt
cp bench/results/profile-cuda.json $OUT/ 2>/dev/null
for cp_ in "50k fp16" "50k bf16" "5k fp16" "5k bf16"; do
  set -- $cp_
  l=$(left); [ "$l" -lt 75 ] && { echo "skip $cp_ ($l s left)" | tee -a $OUT/times.txt; continue; }
  timeout $(( l < 140 ? l : 140 )) python bench/train.py --device cuda --configs $1 --precision $2 \
    --impls bare-compiled,raytr-local-compiled --warmup 10 --steps 40 --merge >> $OUT/train.log 2>&1
  echo "train $cp_ rc=$? at $(( $(date +%s) - T0 )) s" | tee -a $OUT/times.txt
  cp bench/results/train-cuda.json $OUT/ 2>/dev/null
done
grep -h "bench.train:" $OUT/train.log | tail -8
grep -h "ms/step\|steps between" $OUT/profile.log
