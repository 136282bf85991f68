#!/usr/bin/env bash
# Every GPU check in one run, for a session that is lent a GPU (the device tool):
#   1. CUDA vs CPU parity and no host sync in assign/loss        (tests/test_cuda.py)
#   2. the vocabulary kernels' and capture's compiled CUDA paths  (tests/test_functional_vocab.py, connectivity)
#   3. the GPU benchmark table against its floors                 (python -m benchmarks --device cuda)
# Results go to $OUT (the device tool's output folder) or ./gpu-checks. Each step's log is kept even
# if a later one fails; the exit code is the first failure's.
#
#   scripts/gpu_checks.sh            # everything (about 6 minutes on an H200)
#   QUICK=1 scripts/gpu_checks.sh    # the benchmark table at --quick sizes (a smoke run)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-checks}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python3}"
rc=0

step() {  # name, command...
    local name="$1"; shift
    echo "== $name"
    "$@" > "$OUT/$name.log" 2>&1
    local r=$?
    tail -n 25 "$OUT/$name.log"
    [ "$r" -ne 0 ] && [ "$rc" -eq 0 ] && rc=$r
    return 0
}

"$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name(0))" \
    | tee "$OUT/device.txt"
step tests "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_functional_vocab.py \
    tests/test_connectivity.py -x
step benchmarks "$PY" -m benchmarks --device cuda ${QUICK:+--quick} --out "$OUT/benchmarks"
exit "$rc"
