#!/usr/bin/env bash
# Time the whole reproduction on one GPU: every notebook, notebook 06 with its sensitivity sweeps, all
# training stages side by side on the GPU (one process each).
#
#   JOBS=12 LIMIT=3600 bash benchmarks/gpu_reproduce.sh        # from the repository root, deme importable
#
# Writes to $OUT (default gpu_reproduce_out/): gpu.txt (device, versions), reproduce.log (stage times, the
# wall clock), dmon.txt (GPU utilisation every 5 s) and results.tgz (stage records, tables, executed
# notebooks). Stage records land in runs/<profile>/stages/*.json as with any reproduce. The run starts from
# scratch (--force) and does not touch notebooks/; it stops after LIMIT seconds, keeping what finished.
set -u
PROFILE=${PROFILE:-fmnist}
JOBS=${JOBS:-12}
LIMIT=${LIMIT:-3600}
OUT=${OUT:-gpu_reproduce_out}
PY=${PY:-python3}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg PYTHONUNBUFFERED=1

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  nproc
  $PY -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"; } > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
dmon=
if command -v nvidia-smi >/dev/null; then nvidia-smi dmon -s um -d 5 > "$OUT/dmon.txt" 2>&1 & dmon=$!; fi

start=$(date +%s)
timeout "$LIMIT" $PY -m deme reproduce --profile "$PROFILE" --full --sweeps --jobs "$JOBS" --force --no-update-notebooks \
  --keep-going 2>&1 | tee "$OUT/reproduce.log"
rc=${PIPESTATUS[0]}
echo "exit $rc, wall clock $(( $(date +%s) - start )) s (limit $LIMIT s, $JOBS jobs)" | tee -a "$OUT/reproduce.log"
[ -n "$dmon" ] && kill "$dmon" 2>/dev/null

figs=$($PY -c "from deme.config import get_profile, figures_dir; print(figures_dir(get_profile('$PROFILE')))")
tar czf "$OUT/results.tgz" runs/"$PROFILE"/stages runs/"$PROFILE"/notebooks \
  $(ls "$figs"/*.csv "$figs"/ablation_runs_"$PROFILE".jsonl 2>/dev/null | sed "s|^$PWD/||") 2>/dev/null
exit "$rc"
