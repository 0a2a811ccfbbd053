#!/usr/bin/env bash
# One GPU session's CUDA checks and measurements as a single command (BENCHMARKS.md,
# "GPU session"). Each part has its own time limit and the script goes on when one
# fails; the fine-tune gets what is left of BUDGET seconds. Results land in $OUT:
#   logs.tar.gz       every part's log, the JSON / Markdown reports, the fine-tune's loss log
#   ft.pt.partNN      the exported fine-tuned checkpoint, split in 15 MiB pieces (cat them)
#
#   OUT=out/gpu BUDGET=555 PARTS="pytest data train" bash bench/gpu_session.sh          # session 31, call 1
#   OUT=out/gpu BUDGET=190 PARTS="data train" FT_CFG=configs/cgins_gpu_ft3_t10.yaml FT_BATCH=32 FT_STEP_S=1.21 \
#       DATA_CFGS="configs/data_train.yaml configs/data_train_shell4096j.yaml" bash bench/gpu_session.sh  # call 2
#   OUT=out/gpu BUDGET=450 bash bench/gpu_session.sh    # session 30, run 1, with the script of 229db3b
#   OUT=out/gpu BUDGET=300 PARTS="pytest mg cgins eval mg256" bash bench/gpu_session.sh # session 30, run 2 (3a3489e)
#
# PARTS (default all): pytest, mg (64^3 and 128^3), cgins (64^3 and 128^3 cells from the
# network), eval (held-out deltas and the solver comparison), mg256, data (generate the
# sets of DATA_CFGS there that are missing, one in-process hpc.make_dataset per core over
# disjoint shards: the GPU machine has no dask), train (the step time at each batch of
# BATCHES, then the fine-tune FT_CFG at the batch with the most cells a second).
#
# Needs a CUDA device, python3 with torch, h5py, scipy and yaml; eval needs data/heldout32
# (configs/data_heldout.yaml), train the data sets of FT_CFG (the data part makes them).
set -u
OUT=${OUT:-out/gpu}
BUDGET=${BUDGET:-450}
PARTS=${PARTS:-all}
DEVICE=${DEVICE:-cuda}    # cpu: a smoke run of the script itself (tiny BUDGET and BATCHES)
PY=${PYTHON:-python3}
MIX11=models/cgins_wide32_deep28_mix11_t10/cgins_wide32_deep28_mix11_t10.pt
FT_CFG=${FT_CFG:-configs/cgins_gpu_ft2_mix11_t10.yaml}
DATA_CFGS=${DATA_CFGS:-configs/data_train.yaml configs/data_train_shell4096i.yaml}
BATCHES=${BATCHES:-8 16 32}
W=$OUT/work
mkdir -p "$W"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
START=$(date +%s)
want() { [ "$PARTS" = all ] || [[ " $PARTS " == *" $1 "* ]]; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

part() {    # part NAME LIMIT_S CMD...: run CMD with a time limit, log to $W/NAME.log
    local name=$1 lim=$2 s rc
    shift 2
    if [ "$lim" -gt "$(left)" ]; then lim=$(left); fi
    if [ "$lim" -le 5 ]; then echo "== $name: skipped, budget spent"; return 1; fi
    echo "== $name (limit ${lim} s) $(date -u +%T)"
    s=$(date +%s)
    timeout "$lim" "$@" > "$W/$name.log" 2>&1
    rc=$?
    echo "   rc=$rc, $(( $(date +%s) - s )) s"
    tail -n 6 "$W/$name.log" | sed 's/^/   /'
    return $rc
}

part env 30 bash -c "nvidia-smi; $PY -c 'import torch, sys, platform; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0)); print(platform.processor(), \"cpus\", __import__(\"os\").cpu_count())'"

# 1. the CUDA path against the CPU path
want pytest && part pytest_cuda 150 $PY -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_model_sparse_conv.py

# 2. multigrid-PCG on the GPU at growing n (float32, rtol 1e-6, six load cases)
want mg && part mg_64_128 60 $PY bench/bench_multigrid.py --n 64 128 --cells gyroid octet --dtype float32 --device "$DEVICE"

# 3. the warm start on the GPU: held-out cells, delta at t = 0 and 10, and the solver
#    comparison (zero start vs network start, inference included) on the same cells
want eval && part eval_gpu 120 $PY -m hpc.evaluate data/heldout32 --per-family 20 --solve-per-family 20 --t 0 10 \
    --device "$DEVICE" --models "mix11=$MIX11" --refs "$W/refs.h5" -o "$W/eval_gpu.json" --markdown "$W/eval_gpu.md"

# 4. the 32^3-trained model as the start of bigger cells (the answer is the solver's either way)
cells() {
    for n in 64 128; do
        $PY -m microstructures tpms G --form sheet --vf 0.2 -n $n -o "$W/G$n.h5" || return 1
        $PY -m hpc.homogenize "$W/G$n.h5" --device "$DEVICE" --precision float32 --solver cgins --model "$MIX11" \
            --baseline --json -o "$W/G$n.result.h5" || return 1
    done
}
export -f cells
export W PY MIX11 DEVICE
want cgins && part cgins_big 90 bash -c cells

# 5. multigrid-PCG at 256^3 (what is left of the budget, at most 120 s)
want mg256 && part mg_256 120 $PY bench/bench_multigrid.py --n 256 --cells gyroid --dtype float32 --device "$DEVICE"

# 6. data for the fine-tune, made there: every shard of every set in DATA_CFGS, spread over the cores
gen() {
    local cfg n np k i pids=()
    np=$(nproc)
    for cfg in $DATA_CFGS; do
        n=$($PY -c "from model.data import DataConfig; print(DataConfig.from_yaml('$cfg').n_shards)") || return 1
        k=$(( np < n ? np : n ))
        for (( i = 0; i < k; i++ )); do
            $PY -m hpc.make_dataset "$cfg" --workers 0 -q --shards $(seq "$i" "$k" $(( n - 1 ))) &
            pids+=($!)
        done
        for i in "${pids[@]}"; do wait "$i" || return 1; done
        pids=()
    done
}
export -f gen
export DATA_CFGS
want data && part data 120 bash -c gen

# 7. training: the step time of the fine-tune's model at each batch, then the fine-tune at the
#    batch with the most cells a second, with what is left
#    (FT_BATCH and FT_STEP_S, both given: that batch and step time, no sweep)
BATCH=${FT_BATCH:-}
STEP_S=${FT_STEP_S:-}
if want train && { [ -z "$BATCH" ] || [ -z "$STEP_S" ]; }; then
    # shellcheck disable=SC2086
    part train_step 90 $PY bench/bench_train_step.py --device "$DEVICE" --config "$FT_CFG" --t 10 \
        --batch $BATCHES --forms symmetric --rounds 2
    read -r BATCH STEP_S < <(sed -n 's/.*batch *\([0-9]*\) symmetric.*step \([0-9.]*\) s (\([0-9.]*\) s a cell).*/\3 \1 \2/p' \
        "$W/train_step.log" 2>/dev/null | sort -g | head -n 1 | cut -d' ' -f2-)
fi
TRAIN_S=$(( $(left) - 45 ))
if want train && [ -n "${STEP_S:-}" ] && [ "$TRAIN_S" -gt 30 ]; then
    # ~20% over the bench's step for data loading, operator set-up and checkpoints
    STEPS=$($PY -c "print(max(20, int($TRAIN_S / ($STEP_S * 1.2)) // 10 * 10))")
    echo "== fine-tune: $STEPS steps of $BATCH cells at ~$STEP_S s a step in ${TRAIN_S} s"
    part finetune $(( TRAIN_S + 30 )) $PY -m hpc.train "$FT_CFG" --device "$DEVICE" --steps "$STEPS" \
        --batch-size "$BATCH" --checkpoint-every 50 --out "$W/ft" --no-progress
    CK=$(ls "$W"/ft/*.pt 2>/dev/null | head -n 1)
    if [ -n "$CK" ]; then
        $PY -m hpc.export_model "$CK" "$W/ft.pt" && split -b 15M -d "$W/ft.pt" "$OUT/ft.pt.part"
        cp "$W/ft/"*.csv "$W/ft/config.yaml" "$W/" 2>/dev/null
    fi
fi
echo "== done after $(( $(date +%s) - START )) s"
tar czf "$OUT/logs.tar.gz" -C "$W" --exclude=ft --exclude=ft.pt --exclude='*.h5' .
rm -rf "$W"
