# GPT-2 124M, the classic architecture and recipe (Radford et al. 2019; the GPT-3 paper's
# hyperparameters for this size), on one GPU with about 0.5M tokens per optimizer step.
#   python prepare.py config/data_sitepackages.py     # or --input=/your/corpus --tokenizer=gpt2 --dataset=NAME
#   python train.py config/train_gpt2.py
# The architecture is GPT-2's (model.py's docstring): learned positions, LayerNorm with bias,
# GELU MLP, tied embeddings, 12 layers, 12 heads, 768 wide, 1024 tokens of context.
out_dir = "out/gpt2"
dataset = "sitepackages"  # any GPT-2-tokenized dataset prepared by prepare.py

n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
norm = "layernorm"
mlp = "gelu"
pos = "learned"
tie_embeddings = True
bias = True
qk_norm = False  # and none of the newer recipe (train.py's defaults):
zero_init_proj = False
logit_softcap = 0.0
optimizer = "adamw"
lr_schedule = "cosine"

# 16 sequences x 1024 tokens x 32 micro-steps = 524,288 tokens per step
batch_size = 16
total_batch_tokens = 524288  # 16 x 1024 x 32 micro-steps on 1 GPU, x 4 on 8 GPUs
learning_rate = 6e-4
min_lr = 6e-5
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
warmup_iters = 700
max_iters = 2000  # about 1B tokens: set it from your corpus size (tokens per step x steps)
eval_interval = 500
eval_iters = 100
