# DPO of the GPU chain's SFT model (SCALE=gpt2 bash run.sh) on preference pairs of site-packages'
# functions (prepare_chat.py): chosen the real code, rejected another function's body under the same
# def line, or the code cut in half. All weights, with a frozen copy as the reference. Not yet run on
# a GPU; its commands were run on a CPU at toy sizes (TINY=1).
#   python dpo.py config/chain_gpt2_dpo.py && python sample.py --out_dir=out/chain/dpo --chat=True
init_from = "out/chain/sft/ckpt.pt"
out_dir = "out/chain/dpo"
data = "data/sitepackages_chat/dpo_train.jsonl"
eval_interval = 50
log_interval = 10

batch_size = 8
total_batch_size = 32
epochs = 1

beta = 0.1
learning_rate = 1e-6  # full DPO moves far at small rates
warmup_iters = 10
min_lr = 1e-7
