"""
Tokenizers, rebuilt from the description that prepare.py writes into meta.json and every checkpoint
copies, so any stage can turn text into ids and back with nothing but that description.

Kinds: 'gpt2' (tiktoken's GPT-2 BPE, 50257 ids; TIKTOKEN_CACHE_DIR for offline use), 'bpe' (a
byte-level BPE that prepare.py trains, its whole vocabulary inline in tiktoken's format, encoded by
tiktoken), 'char' (one id per character of the corpus, the vocabulary in the description) and 'byte'
(256 ids). End-of-text takes the next id and joins documents; every kind but 'char' encodes any text.
"""

import base64
import collections
import heapq
import itertools

from optional import optional

EOT = "<|endoftext|>"

# GPT-2's pre-tokenization, as tiktoken writes it: contractions, letters with an optional leading
# space, numbers, punctuation runs, whitespace. Merges never cross these pieces, so " the" can be
# one token but "e t" never is.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class Tokenizer:
    def __init__(self, description):
        self.description = description
        self.kind = description["kind"]
        if self.kind == "gpt2":
            try:
                self._enc = optional("tiktoken", "the gpt2 tokenizer").get_encoding("gpt2")
            except Exception as e:  # network or cache failure surfaces as many exception types
                raise SystemExit(f"tokenizer error: could not load tiktoken's gpt2 files ({type(e).__name__}: "
                                 f"{e}); connect to the internet once or set TIKTOKEN_CACHE_DIR to a folder holding "
                                 "them") from None
            self.eot_id, self.vocab_size = self._enc.eot_token, self._enc.n_vocab
        elif self.kind == "bpe":
            self._enc = optional("tiktoken", "the bpe tokenizer").Encoding(
                "bpe", pat_str=description["pat_str"], mergeable_ranks=read_ranks(description["ranks"]),
                special_tokens=description["special_tokens"])
            self.eot_id, self.vocab_size = description["special_tokens"][description["eot"]], self._enc.n_vocab
        elif self.kind == "char":
            self.chars = description["chars"]
            self._stoi = {c: i for i, c in enumerate(self.chars)}
            self.eot_id, self.vocab_size = len(self.chars), len(self.chars) + 1
        elif self.kind == "byte":
            self.eot_id, self.vocab_size = 256, 257
        else:
            raise SystemExit(f"tokenizer error: unknown tokenizer kind '{self.kind}'; expected gpt2, bpe, char or byte")
        # A bpe description names its special tokens; the others have end-of-text, and tokens added after
        # the vocabulary (chat.py's roles and end of turn) named in the description: they decode to their
        # names, and no text encodes to them.
        self.special_tokens = {**({} if self.kind == "bpe" else {EOT: self.eot_id}),
                               **description.get("special_tokens", {})}
        self.vocab_size = max(self.vocab_size, max(self.special_tokens.values()) + 1)

    @classmethod
    def train(cls, kind, texts=(), vocab_size=8192, word_counts=None, special_tokens=(EOT,)):
        """Build a tokenizer of this kind; 'char' and 'bpe' learn their vocabulary from texts (or, for 'bpe',
        word_counts counted elsewhere). vocab_size counts every id: bytes, merges and special_tokens."""
        if kind == "char":
            return cls({"kind": "char", "chars": sorted(set().union(*texts)), "eot": EOT})
        if kind == "bpe":
            word_counts = count_words(texts) if word_counts is None else word_counts
            ranks = [bytes([b]) for b in range(256)] + train_bpe(word_counts, vocab_size - 256 - len(special_tokens))
            specials = {name: len(ranks) + i for i, name in enumerate(special_tokens)}
            # the ranks as the text of a .tiktoken file, one token (base64) and its rank a line
            text = "".join(f"{base64.b64encode(token).decode()} {rank}\n" for rank, token in enumerate(ranks))
            return cls({"kind": "bpe", "pat_str": GPT2_PATTERN, "ranks": text, "special_tokens": specials, "eot": EOT})
        return cls({"kind": kind, "eot": EOT})

    def encode(self, text):
        """Ordinary text to ids; the text <|endoftext|> is not turned into the special id."""
        if self.kind in ("gpt2", "bpe"):
            return self._enc.encode_ordinary(text)
        if self.kind == "byte":
            return list(text.encode("utf-8"))
        try:
            return [self._stoi[c] for c in text]
        except KeyError as e:
            raise SystemExit(f"tokenizer error: character {e.args[0]!r} is not in this char-level vocabulary; "
                             "remove it from the text or prepare the data with a byte, bpe or gpt2 tokenizer") from None

    def decode(self, ids):
        """Ids to text; special tokens (end-of-text, chat roles) show as their names."""
        names = {i: name for name, i in self.special_tokens.items()}
        runs = itertools.groupby(map(int, ids), names.__contains__)  # runs of special ids and of ordinary ones
        return "".join("".join(map(names.get, run)) if special else self._decode_ordinary(list(run))
                       for special, run in runs)

    def _decode_ordinary(self, ids):
        if self.kind in ("gpt2", "bpe"):
            return self._enc.decode(ids)
        if self.kind == "byte":
            return bytes(ids).decode("utf-8", errors="replace")
        return "".join(self.chars[i] for i in ids)


def read_ranks(text):
    """The .tiktoken text back to {token bytes: rank}, what tiktoken.Encoding takes."""
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in text.splitlines())}


def count_words(texts, pattern=GPT2_PATTERN):
    """Counter {pre-tokenized piece as UTF-8 bytes: how often it occurs} over all texts."""
    # tiktoken's own dependency; the standard re module has no \p{L}
    split = optional("regex", "training a BPE tokenizer").compile(pattern).findall
    counts = collections.Counter(word for text in texts for word in split(text))
    return collections.Counter({word.encode("utf-8"): n for word, n in counts.items()})


def merge_pair(word, pair, new_id):
    """word (a list of ids) with each occurrence of pair, left to right, replaced by new_id."""
    out, i = [], 0
    while i < len(word):
        at_pair = i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]
        out.append(new_id if at_pair else word[i])
        i += 2 if at_pair else 1
    return out


def train_bpe(word_counts, n_merges):
    """Learn up to n_merges byte-pair merges from {word bytes: count}; return the new tokens in rank order. Each
    step merges the most frequent adjacent pair (ties: smaller ids); only the words that hold it (an index) are
    re-counted and the best pair comes off a heap, so a merge costs the words it touches, not the corpus."""
    words = [list(word) for word in word_counts]
    freqs = list(word_counts.values())
    counts = collections.Counter()
    where = collections.defaultdict(set)  # pair → indices of the words that (may) hold it
    for i, (word, freq) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            counts[pair] += freq
            where[pair].add(i)
    heap = [(-n, pair) for pair, n in counts.items()]
    heapq.heapify(heap)
    token_bytes = [bytes([b]) for b in range(256)]  # by id: the bytes, then the merges
    id_of = {token: i for i, token in enumerate(token_bytes)}
    while heap and len(token_bytes) < 256 + n_merges:
        n, pair = heapq.heappop(heap)
        if -n != counts[pair]:  # a stale entry: the pair's count changed after it was pushed
            continue
        merged = token_bytes[pair[0]] + token_bytes[pair[1]]
        # bytes already made from another pair ("ab"+"c" and "a"+"bc") keep their id
        new_id = id_of.setdefault(merged, len(token_bytes))
        if new_id == len(token_bytes):
            token_bytes.append(merged)
        delta = collections.Counter()
        for i in where.pop(pair):
            word, freq = words[i], freqs[i]
            merged_word = merge_pair(word, pair, new_id)
            if len(merged_word) == len(word):  # the index is stale for this word
                continue
            for p in zip(word, word[1:]):
                delta[p] -= freq
            for p in zip(merged_word, merged_word[1:]):
                delta[p] += freq
                if new_id in p:
                    where[p].add(i)
            words[i] = merged_word
        for p, d in delta.items():
            if d:
                counts[p] += d
                if counts[p] > 0:
                    heapq.heappush(heap, (-counts[p], p))
    return token_bytes[256:]
