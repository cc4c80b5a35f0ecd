# FineWeb-Edu (Lozhkov, Ben Allal et al. 2024, HuggingFaceFW/fineweb-edu): Common Crawl pages that a
# classifier rated educational (int_score >= 3), already deduplicated. Its sample-10BT subset is about
# 9.7M pages, 10B GPT-2 tokens, in 14 Parquet shards of about 2 GB, read from the Hugging Face hub
# (cached in HF_HOME; set HF_TOKEN if you have one, for higher rate limits). Builds data/fineweb_edu/:
#   python prepare.py config/data_fineweb_edu.py
# The first 1B tokens only (a deterministic prefix; about 2 shards are downloaded):
#   python prepare.py config/data_fineweb_edu.py --max_tokens=1_000_000_000 --dataset=fineweb_edu_1b
# then train GPT-2 124M on it: python train.py config/train_gpt2_fineweb.py
# Disk: the shards (~28 GB in the hub cache), the token bins (2 bytes a token: ~20 GB), and while
# prepare.py runs, a scratch copy of the text (~45 GB).

dataset = "fineweb_edu"
input = "hf://datasets/HuggingFaceFW/fineweb-edu/sample/10BT/*.parquet"
text_field = "text"
# its other columns can filter pages, e.g. {"score": (3.5, None)} for the more educational ones,
# or {"language_score": (0.95, None)}; all of sample-10BT is kept here
row_filters = {}
tokenizer = "gpt2"
val_fraction = 0.0005  # about 5M tokens to evaluate on, as the GPT-2 reproductions use
