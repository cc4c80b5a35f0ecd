# nanoGPT's baby GPT at its README's CPU settings (4 layers, 128 wide, 64 characters of context, 12 sequences,
# 2,000 steps, no dropout), trained with this repository's default recipe: a few minutes on a laptop CPU.
#   python prepare.py config/data_shakespeare_char.py
#   python train.py config/train_shakespeare_char_cpu.py
#   python sample.py --out_dir=out/shakespeare_char_cpu
# bench/nanogpt_race.py races it against nanoGPT's own train.py (docs/train.md: "nanoGPT's CPU run").
# The learning rates and the batch below were tuned for this size, on loss per step; each says why.
out_dir = "out/shakespeare_char_cpu"
dataset = "shakespeare_char"
device = "cpu"
compile = False  # compiling takes longer than it saves on a run this short
eval_interval = 50  # an evaluation costs 40 forward passes, about 4% of the steps between two
eval_iters = 20
log_interval = 10

batch_size = 12
block_size = 64  # characters of context
# Two micro-steps of 12 x 64 per optimizer step. Muon orthogonalises every matrix once per step, which at
# this size costs about half a forward and backward pass of 768 tokens: 1,536 tokens share it, and the
# loss per token was no worse (docs/train.md).
total_batch_tokens = 1536
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0  # the model is small: nothing to regularise yet

muon_lr = 0.015  # below the default 0.02: with few tokens per step a lower rate reached a lower loss sooner
learning_rate = 8e-3  # AdamW's, for the embeddings, the output layer and the gains: a small model takes a high rate
warmup_iters = 30
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
beta2 = 0.99  # few tokens per step: a longer second-moment average steadies the updates (nanoGPT's choice)
