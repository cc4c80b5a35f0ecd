# SFT of the quickstart model (config/quickstart.py) on verifiers.py's 2-digit additions, the base
# that config/rl_quickstart.py improves with RL. A 2-core CPU, under 2 minutes. Short on purpose: the
# base gets about a quarter of the held-out sums right (24.5% measured, docs/rl.md), so that most RL
# groups have signal; 3-digit sums need far longer (1.5% after 450 steps).
#   python verifiers.py --digits=2 --prompts=3000 --sft=6000 && python sft.py config/sft_addition.py
init_from = "out/quickstart/ckpt.pt"
out_dir = "out/sft_addition"
data = "data/addition/sft.jsonl"  # written by verifiers.py, disjoint from the RL and held-out prompts
val_fraction = 0.01
eval_interval = 50
log_interval = 10
keep_checkpoints = 10
benchmark = "data/addition/held_out.jsonl"  # the held-out pass@1 (greedy) at each eval: the base RL starts from
benchmark_limit = 200

packing = True  # about five additions per 128-token row
batch_size = 16
total_batch_size = 16
max_iters = 400

learning_rate = 3e-3  # a small model, all weights trained; 1e-3 learned too slowly to reach 20% in minutes
warmup_iters = 20
min_lr = 3e-4
