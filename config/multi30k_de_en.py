# German->English on Multi30K (image captions: 29,000 training pairs) with the encoder-decoder,
# on a 2-core CPU in 30 minutes of training: sacreBLEU on test_2016_flickr in docs/translation.md.
#   python translate.py config/multi30k_de_en.py --multi30k_dir=../shared/data/translation/multi30k
#   python sample.py --out_dir=out/multi30k_de_en --translate_file=sentences.de
# Without multi30k_dir the files are downloaded (1.9 MB) from the multi30k/dataset repository once,
# sha256-checked; their licence allows non-commercial research and education only.
out_dir = "out/multi30k_de_en"
data = "multi30k"
source_lang = "de"
target_lang = "en"
tokenizer = "bpe"
vocab_size = 8000  # joint German-English BPE: about 16 tokens a sentence
block_size = 64  # the longest caption is 55 tokens: nothing is cut

# the base Transformer's shape at a quarter of its width and half its depth
n_layer = 3
n_encoder_layer = 3
n_head = 4
n_embd = 256
mlp = "relu2"
pos = "learned"
tie_embeddings = True
dropout = 0.1
label_smoothing = 0.1

optimizer = "adamw"
learning_rate = 1e-3  # 2e-3 gave 28.8 BLEU in one run and 17.0 in another (docs/translation.md): too near the edge
beta2 = 0.98
batch_size = 64
total_batch_size = 64
max_iters = 3000  # the schedule's length; max_seconds ends the run on the clock instead
max_seconds = 1800.0
warmup_iters = 200
lr_schedule = "cosine"
min_lr = 1e-4
eval_interval = 1000
eval_seconds = 600.0
log_interval = 50
beam_size = 4
