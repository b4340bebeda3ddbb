#!/usr/bin/env bash
# One prepared run on a lent GPU machine (device tool), well under 8 minutes:
#   the reference bundle's table (network ms per 96^3 patch: torch fp32, torch AMP,
#   TensorRT fp32/fp16 where TensorRT is installed) and end to end per volume, bundle
#   inference.json against spleen-seg segment --device cuda, as whole processes; then the
#   batch throughput in CTs per second (issue 9: target >= 2 CT/s) over 24 copies of the CT,
#   the local batch and, where Ray is installed on the image, --ray.
# Needs, prepared on the CPU machine (ignored by git, carried with `carry`):
#   .whl/     monai, nibabel, pytorch-ignite, fire, termcolor wheels for the GPU image's Python (cp312)
#   .device/  yardstick.pt and msd_ct.nii.gz (MSD-geometry CT from benchmarks/bench_inference.py)
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 SPLEEN_SEG_CACHE=/tmp/cache
W=.device/yardstick.pt
V=.device/msd_ct.nii.gz
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, monai, importlib.util as u; print('torch', torch.__version__, 'monai', monai.__version__, 'tensorrt', u.find_spec('tensorrt') is not None, 'torch_tensorrt', u.find_spec('torch_tensorrt') is not None)"

echo "== network and end to end in one process, per backend (spleen-seg benchmark) =="
python3 -m spleen_seg.cli -q benchmark --weights $W --device cuda --volume $V --repeats 20

echo "== TensorRT export (fp32, fp16) =="
for p in fp32 fp16; do python3 -m spleen_seg.cli -q export --weights $W --format tensorrt --precision $p -o /tmp/trt_$p.engine 2>&1 | tail -1; done

echo "== whole process, alternating: bundle inference.json vs spleen-seg segment --device cuda =="
mkdir -p /tmp/ds/imagesTs /tmp/br/models && cp $V /tmp/ds/imagesTs/ && cp $W /tmp/br/models/model.pt
for run in 1 2; do
  s=$(date +%s%N); python3 -m monai.bundle run --config_file configs/inference.json --bundle_root /tmp/br --dataset_dir /tmp/ds --output_dir /tmp/bo > /tmp/bundle.log 2>&1 || tail -5 /tmp/bundle.log
  echo "run $run bundle     $(( ($(date +%s%N) - s) / 1000000 )) ms"
  s=$(date +%s%N); python3 -m spleen_seg.cli -q segment $V -o /tmp/so --weights $W --device cuda --backend torch > /tmp/ours.log 2>&1 || tail -5 /tmp/ours.log
  echo "run $run spleen-seg $(( ($(date +%s%N) - s) / 1000000 )) ms"
done
python3 - <<'PY'
import nibabel as nib, numpy as np
a = np.asarray(nib.load("/tmp/bo/msd_ct/msd_ct_trans.nii.gz").dataobj) > 0
b = np.asarray(nib.load("/tmp/so/msd_ct/spleen.nii.gz").dataobj) > 0
print(f"mask Dice spleen-seg (cuda) vs bundle (cuda, AMP): {2 * (a & b).sum() / (a.sum() + b.sum()):.4f}")
PY

echo "== batch throughput on one GPU: 24 CTs of MSD geometry (copies of one) in one process =="
mkdir -p /tmp/b24 && for i in $(seq -w 0 23); do ln -sf "$PWD/$V" /tmp/b24/msd_ct_$i.nii.gz; done
ray_flag=--no-ray
if python3 -c "import ray" 2>/dev/null; then ray_flag=; else echo "ray is not installed on this image: --ray not measured"; fi
timeout 300 python3 benchmarks/bench_batch.py --device cuda --no-bundle --volumes /tmp/b24 --runs 2 --parts 0 $ray_flag
