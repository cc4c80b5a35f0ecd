# German->English on Multi30K on one GPU: the target is 38 sacreBLEU on test_2016_flickr within
# 5 minutes of training on one H200. NOT RUN YET: no GPU was lent when it was written, so its
# numbers are a plan (docs/translation.md), not a measurement.
#   python translate.py config/multi30k_de_en_gpu.py --multi30k_dir=../shared/data/translation/multi30k
#   torchrun --standalone --nproc_per_node=8 translate.py config/multi30k_de_en_gpu.py   # the same, split 8 ways
# The base Transformer's width at 4+4 layers: Multi30K's 29,000 pairs overfit a deeper one. At
# ~20 ms a step (bf16, 128 pairs) 5 minutes are ~60 epochs; dropout and label smoothing carry them.
out_dir = "out/multi30k_de_en_gpu"
data = "multi30k"
source_lang = "de"
target_lang = "en"
tokenizer = "bpe"
vocab_size = 10000
block_size = 64

n_layer = 4
n_encoder_layer = 4
n_head = 8
n_embd = 512
mlp = "relu2"
pos = "learned"
tie_embeddings = True
dropout = 0.3
label_smoothing = 0.1

optimizer = "adamw"
learning_rate = 1e-3
beta2 = 0.98
weight_decay = 0.0
batch_size = 128
total_batch_size = 128
max_iters = 15000  # the schedule's length; max_seconds ends the run on the clock
max_seconds = 300.0
warmup_iters = 800
lr_schedule = "cosine"
min_lr = 5e-5
eval_interval = 1000000000  # evaluations by time instead
eval_seconds = 60.0
log_interval = 100
beam_size = 5
dtype = "bfloat16"
