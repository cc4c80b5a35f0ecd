# The standard library's own source (prepare.py's offline default) with a byte-level BPE of 2,048
# tokens trained on it, for the chain of run.sh. Measured against bytes on the same model and
# steps (docs/post-training.md): a token holds 3 bytes, so the model reads 3x the code per step,
# and a name is a few tokens, which the chat model must copy from a request into its def line.
# Builds data/pystdlib_bpe/, with no network:
#   python prepare.py config/data_pystdlib_bpe.py
dataset = "pystdlib_bpe"
tokenizer = "bpe"
bpe_vocab_size = 2048
