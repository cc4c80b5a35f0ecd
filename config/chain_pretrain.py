# The chain's pretraining (run.sh), given after config/quickstart.py: the quickstart's model and
# recipe on the standard library in 2,048 BPE tokens (config/data_pystdlib_bpe.py) with a 256-token
# context, so that a request and the function answering it fit in one row for SFT. The same
# 2,048 tokens per step; the larger vocabulary makes the model 1.31M parameters (0.85M with bytes).
#   python train.py config/quickstart.py config/chain_pretrain.py
out_dir = "out/chain/pretrain"
dataset = "pystdlib_bpe"
block_size = 256
batch_size = 8
