# DPO with LoRA adapters on the SFT model of config/sft_quickstart.py, with the preference pairs
# of instruction-data-with-preference.json (polite "chosen" answers, rude "rejected" ones), on a
# 2-core CPU in a few minutes. The reference model is the SFT model: the policy with its adapters off.
#   python dpo.py config/dpo_quickstart.py && python sample.py --out_dir=out/dpo_quickstart --chat=True
init_from = "out/sft_quickstart/ckpt.pt"
out_dir = "out/dpo_quickstart"
data = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/28c65cdfbc3338e2e040016eea4b7fdf556e4d57/ch07/04_preference-tuning-with-dpo/instruction-data-with-preference.json"
data_sha256 = "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e"  # downloaded once into data/downloads/
eval_interval = 20
log_interval = 5

batch_size = 8
total_batch_size = 16
epochs = 1

beta = 0.1
lora_rank = 8
lora_alpha = 16.0
learning_rate = 1e-3  # adapters start at zero: they take a larger learning rate than full fine-tuning
warmup_iters = 5
min_lr = 1e-4
