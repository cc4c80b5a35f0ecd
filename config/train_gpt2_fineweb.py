# GPT-2 124M on FineWeb-Edu's sample-10BT: the canonical GPT-2 reproduction, one epoch of 10B tokens
# (19,073 steps of 524,288 tokens), the architecture and recipe of config/train_gpt2.py.
#   python prepare.py config/data_fineweb_edu.py
#   python train.py config/train_gpt2_fineweb.py                                   # 1 GPU
#   torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_fineweb.py  # 8 GPUs
# About 7.5e18 FLOPs (6 x 124M parameters x 10B tokens); python plan.py estimates the time on your GPUs.
out_dir = "out/gpt2_fineweb"
dataset = "fineweb_edu"
init_from = "auto"  # a stopped run resumes from its newest checkpoint

n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
norm = "layernorm"
mlp = "gelu"
pos = "learned"
tie_embeddings = True
bias = True

batch_size = 16  # per GPU; 64 fits an 80 GB GPU and needs fewer micro-steps
total_batch_tokens = 524288  # 2**19, about 0.5M tokens per step, as GPT-3 used for this size
learning_rate = 6e-4
min_lr = 6e-5
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
warmup_iters = 715  # 375M tokens, as in GPT-3
max_iters = 19073  # 10B tokens / 524,288 per step: one epoch
eval_interval = 250
eval_iters = 20
