#!/usr/bin/env bash
# Raw text to a chat model, offline: prepare the Python standard library's source, pretrain a small
# model on it, turn its documented functions into chat data (prepare_chat.py), fine-tune
# (SFT) and preference-tune (DPO) the model on them, score it on functions it never saw, join every
# stage's report card into one page, and ask it to write a held-out function. Each line below is an
# ordinary stage command with its config: any of them can be rerun alone.
#
#   pip install -r requirements.txt && bash run.sh       # a 2-core CPU; its cost, stage by stage: docs/post-training.md
#   SCALE=gpt2 bash run.sh      # the same chain at GPT-2-small scale on site-packages' code, one GPU
#   TINY=1 bash run.sh          # every step at toy size, in seconds, into out/tiny/ (tests/test_chain.py)
#   DATA=/tmp/data OUT=/tmp/chain bash run.sh    # elsewhere than data/ and out/chain/
#
# Writes DATA/<dataset> (prepare.py), DATA/<dataset>_chat (prepare_chat.py), OUT/pretrain, OUT/sft,
# OUT/dpo (checkpoints, metrics, cards, eval.json) and OUT/report.md, the page of all stages.
set -euo pipefail
cd "$(dirname "$0")"
tiny=${TINY:-0}
case $tiny in 0|1) ;; *) echo "run.sh: TINY=${TINY} is not 0 or 1" >&2; exit 2 ;; esac   # TINY=yes would run full size
if [[ $tiny == 1 ]]; then DATA=${DATA:-out/tiny/data} OUT=${OUT:-out/tiny}; fi   # toy runs leave data/ and out/chain/ alone
DATA=${DATA:-data}
OUT=${OUT:-out/chain}

case ${SCALE:-cpu} in
  cpu)   # 1.3M parameters, 256-token context, the standard library (12 MB of code on every machine), BPE
    dataset=pystdlib_bpe; prepare_args=config/data_pystdlib_bpe.py; context=256
    pretrain_args="config/quickstart.py config/chain_pretrain.py"
    sft_config=config/chain_sft.py; dpo_config=config/chain_dpo.py; answer_tokens=400 ;;
  gpt2)  # GPT-2 124M, 1024-token context, this Python's site-packages (GPT-2 tokens); one GPU
    dataset=sitepackages; prepare_args=config/data_sitepackages.py; context=1024
    pretrain_args="config/train_gpt2.py config/chain_gpt2_pretrain.py"
    sft_config=config/chain_gpt2_sft.py; dpo_config=config/chain_gpt2_dpo.py; answer_tokens=300 ;;
  *) echo "run.sh: SCALE=${SCALE} is not cpu or gpt2" >&2; exit 2 ;;
esac
# toy sizes for every step (TINY=1): a few documents, a 2-layer model, a few steps each
tiny_prepare="" tiny_train="" tiny_post="" tiny_eval="" tiny_sample=""
if [[ $tiny == 1 ]]; then
  context=256
  tiny_prepare="--max_documents=100"
  tiny_train="--n_layer=2 --n_head=2 --n_embd=32 --batch_size=4 --total_batch_tokens=1024 --max_iters=4
              --eval_interval=4 --eval_iters=1 --log_interval=1 --warmup_iters=1 --compile=False --device=cpu"
  tiny_post="--max_iters=2 --eval_interval=2 --log_interval=1 --warmup_iters=1 --batch_size=2 --total_batch_size=2
             --val_fraction=0.01 --compile=False --device=cpu"
  tiny_eval="--limit=4 --max_new_tokens=16 --device=cpu"; tiny_sample="--device=cpu"; answer_tokens=16
fi
chat=$DATA/${dataset}_chat

step() { printf '\n=== %s\n' "$*"; "$@"; }
start=$SECONDS
step python prepare.py $prepare_args --data_root="$DATA" --dataset=$dataset $tiny_prepare
step python train.py $pretrain_args --data_root="$DATA" --dataset=$dataset --block_size=$context \
  --out_dir="$OUT/pretrain" $tiny_train
step python prepare_chat.py --data_root="$DATA" --dataset=$dataset --block_size=$context
step python sft.py $sft_config --init_from="$OUT/pretrain/ckpt.pt" --data="$chat/sft_train.jsonl" \
  --out_dir="$OUT/sft" $tiny_post
step python dpo.py $dpo_config --init_from="$OUT/sft/ckpt.pt" --data="$chat/dpo_train.jsonl" \
  --out_dir="$OUT/dpo" $tiny_post
for model in sft dpo; do  # held-out requests: does the first line the model writes match the function's def line?
  step python evaluate.py --out_dir="$OUT/$model" --tasks="$chat/heldout_def_lines.jsonl" --max_new_tokens=160 $tiny_eval
done
step python report.py "$DATA/$dataset" "$chat" "$OUT/pretrain" "$OUT/sft" "$OUT/dpo" --out="$OUT/report.md"
echo; echo "=== a request for a function the model never saw (held out: $chat/sft_heldout.jsonl)"
step python sample.py --out_dir="$OUT/dpo" --chat=True --temperature=0 --max_new_tokens=$answer_tokens \
  --prompt="$(cat "$chat/example_request.txt")" $tiny_sample
printf '\nThe chain took %d min %d s. Report of every stage: %s\n' $(((SECONDS - start) / 60)) $(((SECONDS - start) % 60)) \
  "$OUT/report.md"
