#!/bin/bash
# The decode step (step_overhead.py PARTS=steps: fp16 and int8 engines at budgets 2 and 4) for several config sets,
# alternating twice, on the GPU host, from the repository root. SETS (JSON) names each set: {} = this tree's
# kernels/configs/h100.json, {"entry": {"KEY": value, ...}, ...} = those entries updated, "path" = that configs file
# instead (e.g. `git show 59ec372:kernels/configs/h100.json` saved somewhere):
#     SETS='{"A": {}, "C": "/tmp/h100_59ec372.json"}' OUT=/tmp bash benchmarks/experiments/config_ab.sh
# Writes $OUT/cfg_<set>_<round>.json (results/ring_engine_ab_h100.json, config_ab2_h100.json merge them). Each set
# runs from a copy of the tree in /tmp/mq_<set> with kernels/ installed as mobiquant.kernels, as the package has it.
set -e
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
export PYTHONUNBUFFERED=1
NAMES=$(python3 -c 'import json, os; print(" ".join(json.loads(os.environ["SETS"])))')
for t in $NAMES; do
  rm -rf /tmp/mq_$t && mkdir -p /tmp/mq_$t && cp -r mobiquant /tmp/mq_$t/ && rm -rf /tmp/mq_$t/mobiquant/kernels
  cp -r kernels /tmp/mq_$t/mobiquant/kernels
  SET=$t python3 - <<'PY'
import json, os, shutil
spec = json.loads(os.environ["SETS"])[os.environ["SET"]]
p = f"/tmp/mq_{os.environ['SET']}/mobiquant/kernels/configs/h100.json"
if isinstance(spec, str):
    shutil.copy(spec, p)
else:
    d = json.load(open(p))
    for key, upd in spec.items():
        d[key].update(upd)
    json.dump(d, open(p, "w"), indent=1)
PY
done
for r in 0 1; do for t in $NAMES; do
  echo "set $t round $r"
  PYTHONPATH=/tmp/mq_$t PARTS=steps OUT_NAME=cfg_${t}_$r.json python3 -P benchmarks/experiments/step_overhead.py 2>&1 \
    | grep "ms/step"
done; done
