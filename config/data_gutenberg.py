# Project Gutenberg books (plain-text UTF-8 files, one book a file) through the whole data pipeline:
# the Gutenberg header and licence stripped, prose quality filters, exact and near deduplication,
# and a byte-level BPE of 8192 ids trained on the books. Builds data/gutenberg/:
#   python prepare.py config/data_gutenberg.py --input=path/to/books
# This repository's own examples use the 55 books in ../shared/data/gutenberg:
#   python prepare.py config/data_gutenberg.py --input=../shared/data/gutenberg

dataset = "gutenberg"
input = "~/gutenberg"  # a folder of books; set it to yours, here or with --input
glob = "**/*.txt"

strip_gutenberg = True
unicode_nfc = True
normalize_whitespace = True

# Gopher (Rae et al. 2021, appendix A) and C4 (Raffel et al. 2020) rules, as {rule: (min, max)}.
# They judge whole documents, here whole books, so two bounds differ from the web-page values:
# Gopher's 100,000-word maximum would drop every long novel, and books are hard-wrapped at about
# 70 columns, so most lines end mid-sentence (C4's line rule expects a line a paragraph).
quality_filters = {
    "words": (50, None),
    "mean_word_length": (3, 10),
    "symbol_word_ratio": (None, 0.1),
    "punctuation_word_ratio": (None, 0.5),  # prose has 0.1-0.35 per word; code 0.7-1.3
    "lines_ending_in_punctuation": (0.05, None),
    "duplicate_lines": (None, 0.3),
    "duplicate_paragraphs": (None, 0.3),
    "top_2gram": (None, 0.20),
    "top_3gram": (None, 0.18),
    "top_4gram": (None, 0.16),
    "non_alphabetic": (None, 0.2),  # prose has 0.03-0.08 of its non-space characters; code 0.13-0.3
}
dedup_exact = True
dedup_near = True

tokenizer = "bpe"
bpe_vocab_size = 8192
