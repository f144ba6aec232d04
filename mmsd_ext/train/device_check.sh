#!/bin/bash
# Device check for the training layer on a GPU machine: bash mmsd_ext/train/device_check.sh
# (from the repository root; logs and runs under $OUT). Uses the stand-in evaluation of
# tests/test_train.py only where mmsd_ext.localize / mmsd_ext.evaluate are missing. About 6 min.
set -u
export PYTHONPATH=$PWD MMSD_EXT_QUIET=1 MMSD_EXT_NO_PROGRESS=1
log=$OUT/gpu_check.log
{
python - <<'PY'
import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
PY
echo "== 1. default synthetic run on the GPU (stand-in evaluation from tests/test_train.py)"
time timeout 200 python tests/test_train.py --device cuda --threads 0 --output-dir $OUT/run_cuda --no-progress; echo "rc $?"
echo "== 2. torchrun, 1 process, nccl"
timeout 150 python -m torch.distributed.run --standalone --nproc_per_node=1 tests/test_train.py --device cuda --epochs 4 --output-dir $OUT/run_ddp1 --no-progress; echo "rc $?"
echo "== 3. resume on CUDA"
timeout 120 python tests/test_train.py --device cuda --epochs 4 --stop-after 2 --output-dir $OUT/run_stop --no-progress --quiet; echo "rc $?"
timeout 120 python tests/test_train.py --resume $OUT/run_stop/checkpoint.pt --no-progress; echo "rc $?"
echo "== 4. throughput at THUMOS14 sizes, reference ops"
timeout 150 python -m mmsd_ext.train.throughput --device cuda --steps 10 --backends reference auto; echo "rc $?"
} 2>&1 | tee $log
{
echo "== 5. eval-only of the CUDA checkpoint on the CPU"
timeout 100 python tests/test_train.py --eval-only --checkpoint $OUT/run_cuda/checkpoint.pt --device cpu --no-progress; echo "rc $?"
echo "== 6. test_train.py under pytest (CPU paths, on this machine's torch)"
timeout 240 python -m pytest -q -x tests/test_train.py -p no:cacheprovider 2>&1 | tail -5
} 2>&1 | tee -a $log
