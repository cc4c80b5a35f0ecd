"""
Tokenizers, rebuilt from the description that prepare.py writes into meta.json
and every checkpoint copies, so any stage can turn text into ids and back with
nothing but that description.

Kinds:
- 'gpt2': OpenAI's GPT-2 byte-level BPE through tiktoken (50257 ids, the last
  one <|endoftext|>). tiktoken downloads its two files once; set
  TIKTOKEN_CACHE_DIR to a folder that holds them to work offline.
- 'char': one id per character seen in the corpus; the vocabulary is stored in
  the description itself. End-of-text gets the next id.
- 'byte': the 256 byte values, end-of-text is id 256. Any text encodes, and
  decoding replaces byte sequences that are not valid UTF-8.

Documents are joined with the end-of-text token, so a model learns where one
document stops and the next begins.
"""

EOT = "<|endoftext|>"


class Tokenizer:
    def __init__(self, description):
        self.description = description
        self.kind = description["kind"]
        if self.kind == "gpt2":
            import tiktoken

            try:
                self._enc = tiktoken.get_encoding("gpt2")
            except Exception as e:  # network or cache failure surfaces as many exception types
                raise SystemExit(
                    f"tokenizer error: could not load tiktoken's gpt2 files ({type(e).__name__}: {e}); "
                    "connect to the internet once or set TIKTOKEN_CACHE_DIR to a folder holding them"
                ) from None
            self.eot_id = self._enc.eot_token
            self.vocab_size = self._enc.n_vocab
        elif self.kind == "char":
            self.chars = description["chars"]
            self._stoi = {c: i for i, c in enumerate(self.chars)}
            self.eot_id = len(self.chars)
            self.vocab_size = len(self.chars) + 1
        elif self.kind == "byte":
            self.eot_id = 256
            self.vocab_size = 257
        else:
            raise SystemExit(f"tokenizer error: unknown tokenizer kind '{self.kind}'; expected gpt2, char or byte")

    @classmethod
    def train(cls, kind, texts=()):
        """Build a tokenizer of this kind; 'char' reads its vocabulary from texts."""
        if kind == "char":
            chars = set()
            for text in texts:
                chars.update(text)
            return cls({"kind": "char", "chars": sorted(chars), "eot": EOT})
        return cls({"kind": kind, "eot": EOT})

    def encode(self, text):
        """Ordinary text to ids; the text <|endoftext|> is not turned into the special id."""
        if self.kind == "gpt2":
            return self._enc.encode_ordinary(text)
        if self.kind == "byte":
            return list(text.encode("utf-8"))
        try:
            return [self._stoi[c] for c in text]
        except KeyError as e:
            raise SystemExit(
                f"tokenizer error: character {e.args[0]!r} is not in this char-level vocabulary; "
                "remove it from the text or prepare the data with a byte or gpt2 tokenizer"
            ) from None

    def decode(self, ids):
        """Ids to text; end-of-text shows as <|endoftext|>."""
        ids = [int(i) for i in ids]
        if self.kind == "gpt2":
            return self._enc.decode(ids)
        if self.kind == "byte":
            out, run = [], bytearray()
            for i in ids:
                if i == self.eot_id:
                    out += [run.decode("utf-8", errors="replace"), EOT]
                    run = bytearray()
                else:
                    run.append(i)
            return "".join(out) + run.decode("utf-8", errors="replace")
        return "".join(EOT if i == self.eot_id else self.chars[i] for i in ids)
