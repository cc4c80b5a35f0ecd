# SFT of the GPU chain's GPT-2 124M (SCALE=gpt2 bash run.sh) on the documented functions of
# site-packages (prepare_chat.py --dataset=sitepackages --block_size=1024): a request made of a
# function's name, arguments and docstring, answered with its code. Packed 1024-token rows. Not yet
# run on a GPU; its commands were run on a CPU at toy sizes (TINY=1).
#   python sft.py config/chain_gpt2_sft.py && python sample.py --out_dir=out/chain/sft --chat=True
init_from = "out/chain/pretrain/ckpt.pt"
out_dir = "out/chain/sft"
data = "data/sitepackages_chat/sft_train.jsonl"
eval_interval = 100
log_interval = 10

packing = True
batch_size = 16
total_batch_size = 32
epochs = 2

learning_rate = 1e-4  # a tenth of the pretraining peak: all weights trained
warmup_iters = 20
min_lr = 1e-5
