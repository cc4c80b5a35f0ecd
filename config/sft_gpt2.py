# SFT of GPT-2 124M on the 1,100 Alpaca-style records of instruction-data.json, on one GPU.
# Not yet run: no GPU was available when this was written. The settings are those of the book the
# data comes from (chapter 7: AdamW at 5e-5, batches of 8, 2 epochs), with padding: an example is
# 33 GPT-2 tokens on average (70 at most), so 1024-token rows would hold the whole set in 35 rows.
#   python sft.py config/sft_gpt2.py && python sample.py --out_dir=out/sft_gpt2 --chat=True
# The base is train.py's config/train_gpt2.py run, or OpenAI's weights as a Hugging Face folder
# (--init_from=hf:path/to/gpt2). With LoRA: --lora_rank=16 --learning_rate=2e-4.
init_from = "out/gpt2/ckpt.pt"
out_dir = "out/sft_gpt2"
data = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/28c65cdfbc3338e2e040016eea4b7fdf556e4d57/ch07/01_main-chapter-code/instruction-data.json"
data_sha256 = "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"  # downloaded once into data/downloads/
eval_interval = 50
log_interval = 10

packing = False
batch_size = 8
total_batch_size = 8
epochs = 2

learning_rate = 5e-5
weight_decay = 0.1
warmup_iters = 10
min_lr = 5e-6
