# What the measurement scripts of studies/ share, sourced with the output folder as its argument: strict bash, one
# thread (pinned to core $CORE when set), the python to run ($PYTHON, default python), and OUT/provenance.txt with
# the date, commit, torch version and CPU (a figure is reproducible only from the commit it was measured at).
set -euo pipefail
out=$1
mkdir -p "$out"
pin=()
if [[ -n "${CORE:-}" ]]; then pin=(taskset -c "$CORE"); fi
export OMP_NUM_THREADS=1
py=${PYTHON:-python}
{ date -u; git rev-parse --short=10 HEAD; "$py" -c "import torch, hardware; print('torch', torch.__version__)
print(hardware.cpu_model(), sorted(hardware.cpu_flags() & {'avx512_vnni', 'avx_vnni', 'amx_int8', 'avx512_bf16'}))"
} > "$out/provenance.txt"
