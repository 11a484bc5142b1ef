#!/usr/bin/env bash
# Second device call (stop 22): does the Triton kernel also pay at 50k (fp16) and in bf16 at 1M?
T0=$(date +%s); BUDGET=${BUDGET:-300}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
cap() { l=$(left); echo $(( l < $1 ? l : $1 )); }
mark() { echo "$1 rc=$2 at $(( $(date +%s) - T0 )) s" | tee -a $OUT/times.txt; }
mkdir -p /tmp/site && xz -dc .devsite/site.tar.xz | tar xf - -C /tmp/site || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
mark unpacked 0
timeout $(cap 150) python bench/train.py --device cuda --configs 1M --precision bf16 \
  --impls bare-compiled,raytr-local-cudagraphs-triton --merge > $OUT/train.log 2>&1
mark train-1M-bf16 $?
cp bench/results/train-cuda.json $OUT/ 2>/dev/null
l=$(left); if [ "$l" -gt 90 ]; then
  timeout $(cap 150) python bench/train.py --device cuda --configs 50k --precision fp16 \
    --impls bare-compiled,raytr-local-cudagraphs,raytr-local-cudagraphs-triton --merge >> $OUT/train.log 2>&1
  mark train-50k-fp16 $?
  cp bench/results/train-cuda.json $OUT/ 2>/dev/null
fi
grep -h "bench.train:" $OUT/train.log | tail -6
cat $OUT/times.txt
