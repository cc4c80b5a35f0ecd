# GPT-2 124M on FineWeb-Edu's sample-10BT: the canonical GPT-2 reproduction, one epoch of 10B tokens
# (19,073 steps of 524,288 tokens) with the architecture and recipe of config/train_gpt2.py.
#   python prepare.py config/data_fineweb_edu.py
#   python train.py config/train_gpt2_fineweb.py                                   # 1 GPU
#   torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_fineweb.py  # 8 GPUs
# About 7.5e18 FLOPs (6 x 124M parameters x 10B tokens); python plan.py estimates the time on your GPUs.

# config/train_gpt2.py first, so the two share one definition of GPT-2 124M (a config file runs in
# train.py's globals, where __file__ is train.py and os is imported)
exec(open(os.path.join(os.path.dirname(__file__), "config", "train_gpt2.py")).read())

out_dir = "out/gpt2_fineweb"
dataset = "fineweb_edu"
init_from = "auto"  # a stopped run resumes from its newest checkpoint
warmup_iters = 715  # 375M tokens, as GPT-3 warmed up
max_iters = 19073  # 10B tokens / 524,288 per step: one epoch
eval_interval = 250
eval_iters = 20
