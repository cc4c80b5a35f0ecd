# SFT of the chain's pretrained model (run.sh) on the standard library's documented functions
# (prepare_chat.py): a request made of a function's name, arguments and the first paragraph of its
# docstring, answered with its code. All weights, 4 epochs: the held-out loss still falls a little
# in the fourth (docs/post-training.md).
#   python sft.py config/chain_sft.py && python sample.py --out_dir=out/chain/sft --chat=True
init_from = "out/chain/pretrain/ckpt.pt"
out_dir = "out/chain/sft"
data = "data/pystdlib_bpe_chat/sft_train.jsonl"
eval_interval = 200
log_interval = 50

packing = True  # the model's 256-token rows, filled with whole examples (1.7 a row)
batch_size = 8
total_batch_size = 8
epochs = 4

learning_rate = 3e-3  # a small model, all weights trained: 2e-3 left the held-out loss higher
warmup_iters = 20
min_lr = 3e-4
