# SFT of the quickstart model (config/quickstart.py) on the 1,100 Alpaca-style records of
# instruction-data.json, on a 2-core CPU in a few minutes. The base knows Python source, not
# English: this run shows the pipeline working (answers in the chat format, ending at <|end|>),
# not a useful assistant.
#   python sft.py config/sft_quickstart.py && python sample.py --out_dir=out/sft_quickstart --chat=True
init_from = "out/quickstart/ckpt.pt"
out_dir = "out/sft_quickstart"
data = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/28c65cdfbc3338e2e040016eea4b7fdf556e4d57/ch07/01_main-chapter-code/instruction-data.json"
data_sha256 = "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"  # downloaded once into data/downloads/
eval_interval = 100
log_interval = 20

packing = True  # the model's 128-token rows, filled with whole examples
batch_size = 16
total_batch_size = 16
epochs = 4

learning_rate = 1e-3  # a small model, all weights trained
warmup_iters = 20
min_lr = 1e-4
