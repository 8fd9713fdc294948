#!/bin/bash
# The decode step (step_overhead.py PARTS=steps: fp16 and int8 engines at budgets 2 and 4) for three config sets,
# alternating twice, on the GPU host, from the repository root:
#   A: this tree;  B: this tree with the fp16 batch-1 entries on the shared-memory ring (RING 15, REARLY 1, MMA 15,
#   gate/up 2 splits);  C: this tree with the configs file $CONFIG_C (e.g. `git show 59ec372:kernels/configs/h100.json`
#   saved somewhere, the configs before the ring).
#     CONFIG_C=/path/h100_before.json OUT=/tmp bash benchmarks/experiments/config_ab.sh
# Writes $OUT/cfg_{A,B,C}_{0,1}.json (results/ring_engine_ab_h100.json merges them). Each tree is copied to /tmp/mq*
# with kernels/ installed as mobiquant.kernels, as the package installs it.
set -e
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
export PYTHONUNBUFFERED=1
for t in A B C; do
  rm -rf /tmp/mq$t && mkdir -p /tmp/mq$t && cp -r mobiquant /tmp/mq$t/ && rm -rf /tmp/mq$t/mobiquant/kernels
  cp -r kernels /tmp/mq$t/mobiquant/kernels
done
cp "${CONFIG_C:?path to the configs file of set C}" /tmp/mqC/mobiquant/kernels/configs/h100.json
python3 - <<'PY'
import json
p = "/tmp/mqB/mobiquant/kernels/configs/h100.json"
d = json.load(open(p))
for shape in ("6144:4096", "4096:4096", "28672:4096", "4096:14336"):
    d[f"sliced_gemv_cc:1:{shape}"].update(RING=15, REARLY=1, MMA=15)
d["sliced_gemv_cc:1:28672:4096"].update(SPLIT_K=2, SPLIT_K12=2)
json.dump(d, open(p, "w"), indent=1)
PY
for r in 0 1; do for t in A B C; do
  echo "tree $t round $r"
  PYTHONPATH=/tmp/mq$t PARTS=steps OUT_NAME=cfg_${t}_$r.json python3 -P benchmarks/experiments/step_overhead.py 2>&1 \
    | grep "ms/step"
done; done
