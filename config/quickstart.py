# The offline quickstart: a small byte-level model on the Python standard library's
# own source, trained on a 2-core CPU in about three minutes.
#   python prepare.py && python train.py config/quickstart.py && python sample.py --out_dir=out/quickstart
out_dir = "out/quickstart"
dataset = "pystdlib"
compile = False  # compiling takes longer than it saves on such a short CPU run

batch_size = 32
block_size = 128
total_batch_tokens = 4096  # 32 x 128: one micro-step per optimizer step
n_layer = 4
n_head = 4
n_embd = 128
mlp = "relu2"
qk_norm = True
zero_init_proj = True
logit_softcap = 15.0

optimizer = "muon"
muon_lr = 0.02
learning_rate = 4e-3  # AdamW's, for the embeddings, output layer and gains
max_iters = 600
lr_schedule = "wsd"
lr_decay_fraction = 0.3
warmup_iters = 30
min_lr = 2e-4
eval_interval = 200
eval_iters = 20
log_interval = 25
