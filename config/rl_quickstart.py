# RL on the addition task (verifiers.py) from the SFT model of config/sft_addition.py, on a 2-core
# CPU: the held-out pass@1 (greedy, 1,000 sums) rises as the model learns from its own sampled sums
# that the verifier accepts, and so unlearns the carries its careless teacher forgot (docs/rl.md).
#   python verifiers.py --digits=2 --careless=0.5 --held_out=1000 --prompts=3000 --sft=6000
#   python sft.py config/sft_addition.py
#   python rl.py config/rl_quickstart.py      # a few minutes on one core (docs/rl.md)
init_from = "out/sft_addition/ckpt.pt"
out_dir = "out/rl_quickstart"
data = "data/addition/prompts.jsonl"
held_out = "data/addition/held_out.jsonl"
max_new_tokens = 8  # a sum has at most digits + 1 characters, then <|end|>; evaluate.py needs --max_new_tokens=8
eval_interval = 25

batch_size = 64  # 64 prompts x 8 answers = 512 sequences decoded together
prompts_per_step = 64  # 16 prompts gave too noisy a gradient: pass@1 fell at 3e-4 and stood still at 3e-5 to 1e-4
group_size = 8
max_iters = 150  # the held-out pass@1 stops rising after 75 to 100 steps

learning_rate = 1e-4  # a small model, all weights trained; at 3e-4 (and 1e-3) the reward and pass@1 fell
min_lr = 1e-4
warmup_iters = 3
