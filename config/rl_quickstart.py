# RL on the addition task (verifiers.py) from the SFT model of config/sft_addition.py, on a 2-core
# CPU: the held-out pass@1 (greedy, 200 prompts) rises as the model learns from its own sampled sums.
#   python verifiers.py --digits=3 && python sft.py config/sft_addition.py && python rl.py config/rl_quickstart.py
init_from = "out/sft_addition/ckpt.pt"
out_dir = "out/rl_quickstart"
data = "data/addition/prompts.jsonl"
held_out = "data/addition/held_out.jsonl"
max_new_tokens = 8  # a sum has at most digits + 1 characters, then <|end|>; evaluate.py needs --max_new_tokens=8
eval_interval = 10

batch_size = 16  # 16 prompts x 8 answers = 128 sequences decoded together
prompts_per_step = 16
group_size = 8
max_iters = 60

learning_rate = 3e-4  # a small model, all weights trained; RL's gradients are noisier than SFT's
min_lr = 3e-4
warmup_iters = 3
