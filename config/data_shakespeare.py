# Tiny Shakespeare (1.1 MB, one file) with the GPT-2 tokenizer, for fine-tuning GPT-2 weights.
# Builds data/shakespeare/:
#   python prepare.py config/data_shakespeare.py
# Offline, from a local copy of the file (tiktoken also needs its files: see tokenizer.py):
#   python prepare.py config/data_shakespeare.py --input=path/to/input.txt

dataset = "shakespeare"
url = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
url_sha256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
tokenizer = "gpt2"
