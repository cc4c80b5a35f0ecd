# DPO with LoRA adapters on the chain's SFT model (run.sh), with preference pairs of the same
# functions (prepare_chat.py): chosen the real code; rejected another function's body under the
# same def line, the same body under another function's def line, or the body cut in half. The
# reference is the SFT model: the policy with its adapters off. A gentle run, 60 steps of 16 pairs
# (a third of the pairs); see docs/post-training.md for what it changes.
#   python dpo.py config/chain_dpo.py && python sample.py --out_dir=out/chain/dpo --chat=True
init_from = "out/chain/sft/ckpt.pt"
out_dir = "out/chain/dpo"
data = "data/pystdlib_bpe_chat/dpo_train.jsonl"
eval_interval = 20
log_interval = 10

batch_size = 8
total_batch_size = 16
max_iters = 60

beta = 0.1
lora_rank = 8
lora_alpha = 16.0
learning_rate = 3e-4  # adapters start at zero: they take a larger rate than full fine-tuning
warmup_iters = 5
min_lr = 3e-5
