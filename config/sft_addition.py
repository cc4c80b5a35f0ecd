# SFT of the quickstart model (config/quickstart.py) on verifiers.py's 2-digit additions, the base
# that config/rl_quickstart.py improves with RL; a few minutes on a 2-core CPU. The examples come from
# a careless teacher who forgets every carry in half the sums that need one (--careless=0.5): the
# model imitates the slip, and RL, rewarded by a verifier that knows the sums, unlearns it (docs/rl.md).
#   python verifiers.py --digits=2 --careless=0.5 --held_out=1000 --prompts=3000 --sft=6000
#   python sft.py config/sft_addition.py
init_from = "out/quickstart/ckpt.pt"
out_dir = "out/sft_addition"
data = "data/addition/sft.jsonl"  # written by verifiers.py, disjoint from the RL and held-out prompts
val_fraction = 0.01
eval_interval = 100
log_interval = 10
keep_checkpoints = 10
benchmark = "data/addition/held_out.jsonl"  # the held-out pass@1 (greedy) at each eval: the base RL starts from
benchmark_limit = 1000

packing = True  # about five additions per 128-token row
batch_size = 16
total_batch_size = 16
max_iters = 600  # right answers learned by 500-700 steps; later steps only copy the teacher better

learning_rate = 3e-3  # a small model, all weights trained; 1e-3 learned too slowly to reach 20% in minutes
warmup_iters = 20
min_lr = 3e-4
