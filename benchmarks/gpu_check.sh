#!/usr/bin/env bash
# Every CUDA path of nnunet-lk on one lent GPU, in under 10 minutes (run from the repository root, after README's
# set-up). Results go to ${OUT:-benchmarks/results/gpu_check}/ (logs, bench JSON/markdown, a summary).
#
#   1. nnU-Net's plans for Hippocampus (2d, 3d_fullres), preprocessed on this machine's cores;
#   2. `nnunet-lk bench --device cuda` at nnU-Net's own plans (2d, 3d_fullres): latency, train step with AMP,
#      torch.cuda.max_memory_allocated of a training step beside the shape-only estimate (AMP dtypes);
#   3. `nnunet-lk plans --backbone B --gpu-memory 2` for every backbone, then bench on those plans: the measured
#      peak must be at or under 2 GB;
#   4. a few training iterations of every trainer through `nnUNetv2_train` (AMP and torch.compile, nnU-Net's CUDA
#      defaults), 2d and 3d_fullres, and one `nnUNetv2_predict`.
# Without a GPU it says so and exits 3.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
BIN=$(dirname "$PY")
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA GPU is visible to torch (torch.cuda.is_available() is False): run this on a machine" \
         "with an NVIDIA GPU and its driver" >&2
    exit 3
fi
DATA=${NNUNET_LK_SHARED_DATA:-$(realpath ../shared/data 2>/dev/null || true)}
if [ ! -d "$DATA/Dataset004_Hippocampus" ]; then
    echo "gpu_check: Dataset004_Hippocampus not found under '$DATA': set NNUNET_LK_SHARED_DATA to the shared data folder" >&2
    exit 2
fi
OUT=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$OUT"
WORK=$(mktemp -d)
export nnUNet_raw=$DATA nnUNet_preprocessed=$WORK/preprocessed nnUNet_results=$WORK/results
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
note "device: $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0), torch.__version__)')"

# 1. plans and preprocessing (uses all cores)
timeout 240 "$BIN/nnUNetv2_plan_and_preprocess" -d 4 -c 2d 3d_fullres -np 8 > "$OUT/preprocess.log" 2>&1 \
    || { note "FAIL preprocessing (see preprocess.log)"; exit 1; }

# 2. bench at nnU-Net's own plans
for c in 2d 3d_fullres; do
    timeout 150 "$BIN/nnunet-lk" bench -d 4 -c $c --device cuda --warmup 2 --repeats 3 -o "$OUT" \
        > "$OUT/bench_$c.log" 2>&1 && note "ok   bench $c" || note "FAIL bench $c (see bench_$c.log)"
done

# 3. plans for 2 GB per backbone, measured there
for b in dlkunet_m lgmsnet lmnet mslkseg; do
    "$BIN/nnunet-lk" plans -d 4 -c 3d_fullres --backbone $b --gpu-memory 2 --force > "$OUT/plans_$b.log" 2>&1 \
        || { note "FAIL plans $b (see plans_$b.log)"; continue; }
    trainer=$("$PY" -c "from nnunet_lk.nnunet_io import default_trainers, resolve_trainer as r; print([t for t in default_trainers() if r(t).backbone == '$b'][0])")
    timeout 90 "$BIN/nnunet-lk" bench -d 4 -c 3d_fullres -p nnUNetPlans_${b}_2GB --trainers "$trainer" --device cuda \
        --warmup 1 --repeats 1 -o "$OUT" > "$OUT/bench_plans_$b.log" 2>&1
    "$PY" - "$OUT/bench_Dataset004_Hippocampus_3d_fullres_nnUNetPlans_${b}_2GB_cuda.json" <<'EOF' | tee -a "$SUMMARY"
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["results"] if r["status"] == "ok"][1:]
for r in rows:
    print(f"{'ok  ' if r['train_peak_mib'] <= 2048 else 'FAIL'} {r['trainer']} on its 2 GB plans: measured "
          f"{r['train_peak_mib']:.0f} MiB, estimate {r['train_estimate_mib']:.0f} MiB")
EOF
done

# 4. a few iterations of every trainer through the stock CLI (AMP, torch.compile), then one prediction
export NNUNET_LK_EPOCHS=1 NNUNET_LK_ITERATIONS=3 NNUNET_LK_VAL_ITERATIONS=1 NNUNET_LK_VAL_MIRRORING=0
for c in 2d 3d_fullres; do
    for t in nnUNetTrainerStockBudget nnUNetTrainerDLKUNetS nnUNetTrainerDLKUNetM nnUNetTrainerLGMSNet \
             nnUNetTrainerLMNet nnUNetTrainerMSLKSeg; do
        timeout 120 "$BIN/nnUNetv2_train" 4 $c 0 -tr $t > "$OUT/train_${t}_$c.log" 2>&1 \
            && note "ok   nnUNetv2_train $t $c" || note "FAIL nnUNetv2_train $t $c (see train_${t}_$c.log)"
    done
done
mkdir -p "$WORK/in" && ls "$DATA/Dataset004_Hippocampus/imagesTr" | head -2 | while read -r f; do
    ln -s "$DATA/Dataset004_Hippocampus/imagesTr/$f" "$WORK/in/$f"; done
timeout 120 "$BIN/nnUNetv2_predict" -i "$WORK/in" -o "$WORK/pred" -d 4 -c 3d_fullres -f 0 -tr nnUNetTrainerLMNet \
    > "$OUT/predict.log" 2>&1 && [ "$(ls "$WORK/pred"/*.nii.gz | wc -l)" = 2 ] \
    && note "ok   nnUNetv2_predict LM-Net 3d_fullres" || note "FAIL nnUNetv2_predict (see predict.log)"
! grep -q FAIL "$SUMMARY"
