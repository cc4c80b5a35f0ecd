# nanoGPT's "baby GPT" on Tiny Shakespeare, character level: a few minutes on one GPU.
#   python prepare.py config/data_shakespeare_char.py
#   python train.py config/train_shakespeare_char.py
#   python sample.py --out_dir=out/shakespeare_char
# On a CPU, add --device=cpu --compile=False --max_iters=2000 --n_layer=4 --n_embd=128 --block_size=64.
out_dir = "out/shakespeare_char"
dataset = "shakespeare_char"
eval_interval = 250
eval_iters = 200
log_interval = 10

batch_size = 64
block_size = 256  # characters of context
total_batch_tokens = 16384  # 64 x 256: one micro-step per optimizer step on one GPU
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2  # the corpus is small (1 MB): regularise

learning_rate = 1e-3
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
beta2 = 0.99  # few tokens per step: a longer second-moment average steadies the updates
warmup_iters = 100
