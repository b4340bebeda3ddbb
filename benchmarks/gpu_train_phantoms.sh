#!/usr/bin/env bash
# Train the packaged demo weights on the lent GPU machine: `spleen-seg train` on 24 phantoms
# (15 train / 9 validation, the bundle's split), the bundle's recipe unchanged.
# Usage there: bash benchmarks/gpu_train_phantoms.sh EPOCHS SECONDS_BUDGET
# Wheels for packages the GPU image lacks travel in .whl/ (see the device tool's README).
set -uo pipefail
EPOCHS=${1:-200}
BUDGET=${2:-400}
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__, 'cuda', torch.cuda.is_available())"
time python3 -m spleen_seg.cli -q data phantom --out /tmp/ph24 -n 24 --seed 1
start=$(date +%s)
# The budget kill keeps whatever best models/model.pt was saved (atomic saves).
timeout "$BUDGET" python3 -m spleen_seg.cli train --dataset-dir /tmp/ph24 --bundle-root /tmp/run \
    --epochs "$EPOCHS" --num-workers 8 2>&1 | grep -E "val_mean_dice|Epoch\[[0-9]*0\] Complete|best|Error" | tee "$OUT/train_log.txt"
echo "train wall $(( $(date +%s) - start )) s (budget $BUDGET s)" | tee -a "$OUT/train_log.txt"
cp /tmp/run/models/model.pt "$OUT/model.pt"
python3 - <<'PY' | tee -a "$OUT/train_log.txt"
import time, torch
from spleen_seg.pipeline.network import build
net = build().cuda().eval()
x = torch.rand(4, 1, 96, 96, 96, device="cuda")
for name, amp in (("torch fp32", False), ("torch AMP fp16", True)):
    with torch.inference_mode(), torch.autocast("cuda", enabled=amp):
        for _ in range(5): net(x)
        torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(20): net(x)
        torch.cuda.synchronize()
    print(f"{name}: {(time.perf_counter() - t) / 20 / 4 * 1000:.2f} ms per 96^3 patch (batch 4)")
PY
