# The offline quickstart: a small byte-level model on the Python standard library's
# own source, trained on a 2-core CPU in about three and a half minutes.
#   python prepare.py && python train.py config/quickstart.py && python sample.py --out_dir=out/quickstart
# Its recipe reaches the classic recipe's loss in a fraction of the time (README: "A faster recipe");
# each setting below says why it is there.
out_dir = "out/quickstart"
dataset = "pystdlib"
compile = False  # compiling takes longer than it saves on such a short CPU run

batch_size = 16  # half the classic batch, twice the steps: on a time budget more, noisier steps won
block_size = 128
total_batch_tokens = 2048  # 16 x 128: one micro-step per optimizer step
n_layer = 4
n_head = 4
n_embd = 128
mlp = "relu2"  # ReLU squared: as good as SwiGLU here at less compute per parameter
qk_norm = True  # normalised queries and keys keep attention logits bounded at high learning rates
zero_init_proj = True  # every block starts as the identity, so the high early rates do not scramble the stream
logit_softcap = 15.0  # tanh-capped logits: no early runaway of a few tokens' logits

optimizer = "muon"  # orthogonalised updates for the blocks' matrices: the largest single gain
muon_lr = 0.04
learning_rate = 8e-3  # AdamW's, for the embeddings, output layer and gains; small models tolerate a high rate
max_iters = 1200
lr_schedule = "wsd"  # full rate for 70% of the run, then a linear decay: beat cosine at equal time
lr_decay_fraction = 0.3
warmup_iters = 60
min_lr = 2e-4
eval_interval = 400
eval_iters = 20
log_interval = 50
