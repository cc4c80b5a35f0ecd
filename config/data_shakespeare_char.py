# Tiny Shakespeare (1.1 MB, one file) as characters: the classic first dataset.
# Builds data/shakespeare_char/ for config/train_shakespeare_char.py:
#   python prepare.py config/data_shakespeare_char.py
# Offline, from a local copy of the file:
#   python prepare.py config/data_shakespeare_char.py --input=path/to/input.txt

dataset = "shakespeare_char"
url = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
url_sha256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
tokenizer = "char"
