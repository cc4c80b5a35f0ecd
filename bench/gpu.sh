#!/usr/bin/env bash
# The README's GPU measurements (issue 18) in one device run of about 6-8 minutes on one H100/H200:
#   1. the CUDA-only tests of tests/test_model.py and tests/test_decoding.py (FlexAttention, the compiled
#      decoding step as CUDA graphs)
#   2. training throughput at GPT-2 124M's shape (12x768, 12 heads, context 1024, vocabulary 50304), bf16,
#      compiled, with bench.py: the 'gpt2' architecture and the default modern one at each micro-batch of
#      BATCHES: tokens/s, MFU, peak memory
#   3. plan.py's predicted peak memory beside the measured one, and one run with activation checkpointing
#   4. decoding at batch 1 and 8 (gpt2 architecture): our compiled bucketed cache beside HF generate
#   5. one training step each of DDP (1 process, NCCL), FSDP2 and FSDP2 + CPU offload, on a byte-level
#      dataset that prepare.py makes from the Python standard library's source (no network needed)
# and prints a table last. PART=recipe runs bench/recipe.py at 124M scale instead (~2 min per recipe).
#
# On the GPU machine (the device tool's `run`; it has no zstandard, which prepare.py imports), first here:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d .whl zstandard==0.25.0        # .whl is git-ignored
# then run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=540), and PART=recipe in a second call.
# A dry run on a CPU, tiny sizes and no CUDA-only parts, in a minute or two:
#   SMOKE=1 OUT=/tmp/gpu bash bench/gpu.sh
#
# Each step runs under `timeout`, cut so that the whole run ends within BUDGET seconds (460; 560 for the
# recipes); a failed step is logged and the run goes on. $OUT gets gpu.log (every step's output),
# results.json (every JSON the steps wrote) and, with PART=recipe, recipe.png.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder for logs and JSON}
SMOKE=${SMOKE:-0}
PART=${PART:-main}
BUDGET=${BUDGET:-$([ "$PART" = recipe ] && echo 560 || echo 460)}  # seconds; a device command may run 600
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT  # the prepared data and checkpoints; what matters is copied to $OUT
mkdir -p "$OUT" "$WORK/json"
export PYTHONUNBUFFERED=1
LOG="$OUT/gpu.log"
: >"$LOG"
PY=${PY:-python3}  # the GPU machine's Python is python3
# That machine's image lacks zstandard, which prepare.py imports: install the wheel carried in .whl (above)
if ! $PY -c 'import zstandard' 2>/dev/null && ls .whl/zstandard-*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/zstandard-*.whl \
        && export PYTHONPATH=/tmp/site || echo "zstandard did not install: prepare.py and the train.py steps will fail"
fi

# the two architectures, as train.py keys (config/train_gpt2.py's 'gpt2' block; train.py's defaults)
GPT2="--norm=layernorm --mlp=gelu --pos=learned --tie_embeddings=True --bias=True"
GPT2+=" --qk_norm=False --zero_init_proj=False --logit_softcap=0"
MODERN=""
if [ "$SMOKE" = 1 ]; then
    SHAPE="--n_layer=2 --n_head=2 --n_embd=64 --block_size=128"
    VOCAB=257  # the byte tokenizer's, so that plan.py reads the same from the prepared data's meta.json
    DEVICE="--device=cpu --dtype=float32"
    BENCH="$DEVICE --compile=False --warmup=1 --repeats=2 --new_tokens=8 --prompt_tokens=8"
    BATCHES="4 2"
    DATA_FILES="a*.py"  # 0.2 MB
    TRAIN_STEP="--n_layer=2 --n_head=2 --n_embd=64 --block_size=64 --batch_size=2 --total_batch_tokens=128 --device=cpu"
    GPU=H200  # plan.py's memory table needs a name
else
    SHAPE="--n_layer=12 --n_head=12 --n_embd=768 --block_size=1024"
    VOCAB=50304  # GPT-2's, padded: plan.py's assumption where no data is named
    DEVICE="--device=cuda --dtype=bfloat16"
    BENCH="$DEVICE --compile=True --eager=False --warmup=3 --repeats=10"
    BATCHES=${BATCHES:-"32 16"}  # sequences per micro-batch, the likeliest best first
    DATA_FILES="*.py"  # 5 MB; PART=recipe reads every .py below (~100 MB)
    [ "$PART" = recipe ] && DATA_FILES="**/*.py"
    TRAIN_STEP="--n_layer=4 --n_head=4 --n_embd=256 --block_size=256 --batch_size=8 --total_batch_tokens=4096
                --device=cuda --dtype=bfloat16"
    GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | sed 's/NVIDIA //') || GPU=unknown
fi

step() {  # step NAME SECONDS COMMAND...: run it under a timeout within the budget, log it, never stop the run
    local name=$1 limit=$2 left=$((BUDGET - SECONDS)) started=$SECONDS rc=0
    shift 2
    if ((left < 15)); then echo "=== $name: skipped, the budget of ${BUDGET}s is spent" | tee -a "$LOG"; return; fi
    ((limit > left)) && limit=$left
    echo "=== $name (at ${SECONDS}s, timeout ${limit}s): $*" | tee -a "$LOG"
    timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1 || rc=$?
    echo "=== $name: exit $rc after $((SECONDS - started))s" | tee -a "$LOG"
    echo "{\"step\": \"$name\", \"exit\": $rc, \"seconds\": $((SECONDS - started))}" >"$WORK/json/step_$name.json"
}

step environment 30 bash -c "$PY -c 'import torch, transformers; print(torch.__version__, torch.version.cuda,
    transformers.__version__)'; nvidia-smi || true; nproc"

# a byte-level dataset from the standard library's source, for the train.py steps. Chosen by glob, not
# --max_tokens: prepare.py stopping early at that limit hung once here, in the worker pool's shutdown.
STDLIB=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
step prepare 120 $PY prepare.py --input="$STDLIB" --glob="$DATA_FILES" --tokenizer=byte --dataset=gpubench \
    --data_root="$WORK/data"
PLAN_DATA="--data_root=$WORK/none"  # GPT-2's vocabulary
[ "$SMOKE" = 1 ] && PLAN_DATA="--data_root=$WORK/data --dataset=gpubench"
TRAIN="--dataset=gpubench --data_root=$WORK/data --max_iters=1 --eval_iters=1 --eval_interval=1 --log_interval=1
       --compile=False --warmup_iters=0"

if [ "$PART" = recipe ]; then
    # train.py's defaults (an empty base config) are the default recipe at GPT-2 124M's shape; byte tokens, as
    # the GPT-2 vocabulary needs a download. common replaces the classic rows' quickstart-sized batch.
    : >"$WORK/defaults.py"
    RECIPE="--base_config=$WORK/defaults.py --budget_seconds=120 --eval_seconds=20"
    COMMON="--device=cuda --compile=True --batch_size=16 --total_batch_tokens=65536"
    if [ "$SMOKE" = 1 ]; then
        RECIPE="--base_config=$WORK/defaults.py --budget_seconds=10 --eval_seconds=5"
        COMMON="--device=cpu --compile=False --n_layer=2 --n_embd=64 --n_head=2 --block_size=64 --batch_size=4
                --total_batch_tokens=256"
    fi
    step recipe $BUDGET $PY bench/recipe.py $RECIPE --out_dir="$WORK/recipe" \
        --common="--dataset=gpubench --data_root=$WORK/data $COMMON --eval_iters=8 --log_interval=5"
    cp "$WORK/recipe/summary.json" "$WORK/json/recipe.json" 2>/dev/null || true
    cp "$WORK/recipe/recipe.png" "$OUT/" 2>/dev/null || true
else
    if [ "$SMOKE" != 1 ]; then
        step cuda_tests 240 $PY -m pytest -q tests/test_model.py tests/test_decoding.py -k cuda  # FlexAttention, CUDA graphs
    fi
    throughput() {  # throughput ARCH BATCH [bench.py keys...]: compiled training speed, and plan.py's memory beside it
        local arch=$1 batch=$2 keys=$GPT2
        shift 2
        [ "$arch" = modern ] && keys=$MODERN
        step "train_${arch}_b$batch" 180 $PY bench.py $SHAPE --vocab_size=$VOCAB $keys $BENCH --batch_size=$batch \
            --decode_batch_sizes=[] --hf=False "$@" --out="$WORK/json/bench_${arch}_b$batch.json"
        step "plan_${arch}_b$batch" 30 bash -c "$PY plan.py $SHAPE $keys --batch_size=$batch --optimizer=adamw \
            ${DEVICE#--device=* } --gpu='$GPU' $PLAN_DATA --json >$WORK/json/plan_${arch}_b$batch.json"
    }
    # the likeliest best batch first, so that a spent budget cuts the others; decoding once, on the gpt2
    # architecture, as transformers has no equivalent of the modern block
    first=${BATCHES%% *}
    throughput gpt2 "$first" --decode_batch_sizes=[1,8] --hf=True
    throughput modern "$first"
    # activation checkpointing's memory, eager (the compiled run's recompilation is not worth the budget)
    step "train_gpt2_b${first}_ckpt" 120 $PY bench.py $SHAPE --vocab_size=$VOCAB $GPT2 ${BENCH/--eager=False/} \
        --compile=False --batch_size=$first --activation_checkpointing=True --decode_batch_sizes=[] --hf=False \
        --warmup=1 --repeats=3 --out="$WORK/json/bench_gpt2_b${first}_ckpt.json"
    # one step each of the distributed paths (NCCL on a GPU, gloo in SMOKE), on a small model: it is their start
    # and their collectives that are checked
    TORCHRUN="$PY -m torch.distributed.run --standalone --nproc_per_node=1"
    step ddp 120 $TORCHRUN train.py $TRAIN $TRAIN_STEP --out_dir="$WORK/ddp"
    step fsdp 120 $TORCHRUN train.py $TRAIN $TRAIN_STEP --parallelism=fsdp --out_dir="$WORK/fsdp"
    if [ "$SMOKE" != 1 ]; then  # offloading pairs a GPU with the CPU
        step fsdp_offload 180 $TORCHRUN train.py $TRAIN $TRAIN_STEP --parallelism=fsdp --cpu_offload=True \
            --out_dir="$WORK/fsdp_offload"
    fi
    for batch in ${BATCHES#"$first"}; do
        throughput gpt2 "$batch"
        throughput modern "$batch"
    done
fi

# every JSON in one file, then the table
$PY - "$WORK/json" "$OUT/results.json" "$GPU" <<'EOF' | tee -a "$LOG"
import glob, json, os, sys
folder, out, gpu = sys.argv[1:]
results = {}
for path in sorted(glob.glob(os.path.join(folder, "*.json")), key=os.path.getmtime):
    try:
        with open(path) as f:
            results[os.path.basename(path)[:-5]] = json.load(f)
    except ValueError as e:
        results[os.path.basename(path)[:-5]] = {"error": str(e)}
with open(out + ".tmp", "w") as f:
    json.dump(results, f, indent=1)
os.replace(out + ".tmp", out)
print(f"\n{gpu}: steps")
for name, r in results.items():
    if name.startswith("step_"):
        print(f"  {name[5:]:<28} {'ok' if r['exit'] == 0 else 'FAILED exit %d' % r['exit']:>14} {r['seconds']:>5} s")
if any(name.startswith("bench_") for name in results):
    print(f"{'training':<26}{'tokens/s':>10}{'MFU':>7}{'peak MiB':>10}{'plan MiB':>10}{'plan/meas':>10}")
for name, r in results.items():
    if not name.startswith("bench_"):
        continue
    run = name[6:]
    plan = results.get("plan_" + run.removesuffix("_ckpt"), {}).get("memory", {}).get(
        "ddp+ckpt" if run.endswith("_ckpt") else "ddp", {}).get("total")
    planned = plan * 1024 if plan else None
    for variant, t in r["train"].items():
        mfu = f"{100 * t['mfu']:.1f}%" if t["mfu"] else "n/a"
        ratio = f"{planned / r['peak_memory_mb']:.2f}" if planned else "-"
        print(f"{run + ' ' + variant:<26}{t['tokens_per_s']:>10.0f}{mfu:>7}{r['peak_memory_mb']:>10.0f}"
              f"{planned or 0:>10.0f}{ratio:>10}")
    for batch, rows in r["decode"].items():
        for decoder, d in rows.items():
            print(f"  decode {batch} {decoder:<16}{d['tokens_per_s']:>10.1f} tok/s  first {d['first_token_ms']:.1f} ms"
                  f"  same {d['same_tokens_as_ours']}")
if "recipe" in results:
    for name, c in results["recipe"]["recipes"].items():
        reached = f"{c['seconds_to_target']:.1f} s" if c["seconds_to_target"] else "never"
        print(f"recipe {name:<12} val loss {c['val_loss'][-1]:.4f}, {c['steps']} steps, "
              f"{reached} to the first's final loss")
EOF
echo "total ${SECONDS}s; logs and JSON in $OUT"
