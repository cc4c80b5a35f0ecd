# The GPU chain's pretraining (SCALE=gpt2 bash run.sh), given after config/train_gpt2.py: GPT-2 124M
# on this Python's site-packages (config/data_sitepackages.py; with torch installed, around 60M GPT-2
# tokens). 500 steps of 524,288 tokens are about 4 passes over it: more passes over the same code
# buy little, and the functions SFT trains on would be learnt by heart. Not yet run on a GPU; its
# commands were run on a CPU at toy sizes (TINY=1).
#   python train.py config/train_gpt2.py config/chain_gpt2_pretrain.py
out_dir = "out/chain/pretrain"
dataset = "sitepackages"
max_iters = 500
warmup_iters = 100
eval_interval = 100
