# SFT of the quickstart model (config/quickstart.py) on verifiers.py's 3-digit additions, the base
# that config/rl_quickstart.py improves with RL. A 2-core CPU, minutes. Short on purpose: the base
# should get some held-out sums right, not all of them, so that RL has groups with signal to learn from.
#   python verifiers.py --digits=3 && python sft.py config/sft_addition.py
init_from = "out/quickstart/ckpt.pt"
out_dir = "out/sft_addition"
data = "data/addition/sft.jsonl"  # written by verifiers.py, disjoint from the RL and held-out prompts
val_fraction = 0.01
eval_interval = 50
log_interval = 10
keep_checkpoints = 10

packing = True  # about five additions per 128-token row
batch_size = 16
total_batch_size = 16
max_iters = 300

learning_rate = 1e-3  # a small model, all weights trained
warmup_iters = 20
min_lr = 1e-4
