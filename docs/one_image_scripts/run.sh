#!/usr/bin/env bash
# usage: run.sh NAME "pretrain args" | run.sh NAME random "trunk args"
set -u
cd /work/main
name=$1; shift
R=/work/sweep/runs/$name
if [ "$1" = random ]; then
  shift
  t0=$(date +%s); monossl probe --random $1 --out $R/probe --data cifar10:/work/val --subset 10000 --quiet --seed ${SEED:-0} > /work/sweep/logs/$name.log 2>&1
else
  t0=$(date +%s)
  monossl pretrain $1 --out $R --quiet > /work/sweep/logs/$name.log 2>&1 && \
  monossl probe $R --data cifar10:/work/val --subset 10000 --quiet >> /work/sweep/logs/$name.log 2>&1
fi
t1=$(date +%s)
python3 - "$name" "$R/probe/results.json" "$R/probe-cifar/results.json" $((t1-t0)) <<'PY'
import json,sys,os
name,a,b,sec=sys.argv[1:]
p=a if os.path.exists(a) else b
try:
    r=json.load(open(p)); t=r["taps"]
    line=f"{name:40s} "+" ".join(f"{t[k]['top1']:5.1f}" for k in t)+f"  ({sec}s)"
except Exception as e:
    line=f"{name:40s} FAILED {e}"
print(line); open("/work/sweep/results.txt","a").write(line+"\n")
PY
