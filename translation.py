"""
Parallel text for the encoder-decoder, and the standard scores of a translation: what
translate.py trains on and what it, sample.py and evaluate.py share.

    pairs, n_empty = read_pairs("train.de.gz,train.en.gz")          # [(German, English), ...]
    tokenizer = train_tokenizer("bpe", [text for pair in pairs for text in pair], vocab_size=8000)
    translations, n_cut = translate_lines(model, tokenizer, [s for s, _ in pairs], beam_size=4)
    scores = corpus_scores(translations, [t for _, t in pairs])     # {'bleu': ..., 'chrf': ..., signatures}

Parallel data is named by one string (translate.py's data, val_data and test_data keys):
- "SOURCE_FILE,TARGET_FILE": two line-aligned text files, plain or .gz; line n of the target
  file is the translation of line n of the source file;
- "FILE.jsonl" (or .jsonl.gz): one JSON record a line with a source and a target string field;
- "multi30k": Multi30K task 1 (Elliott et al. 2016; image captions in German, English and
  French, 29,000 train, 1,014 val and 1,000 test_2016_flickr sentences), read from a folder
  holding its files as the multi30k/dataset repository names them (train.de.gz, ...) or
  downloaded from that repository at a fixed commit and checked against the sha256 below. Its
  README limits it to non-commercial research and education, so this repository ships none of it.

Sentences are tokenized with a tokenizer.py tokenizer: a byte-level BPE learned on both sides
at once (a joint vocabulary, so the encoder and the decoder can share one embedding) or GPT-2's.
A source is its tokens and end-of-text; a target starts from end-of-text and ends with it, so
the one special token is the decoder's start and the end of every sentence. The BPE decodes to
the exact text it encoded, so a translation is detokenized, cased text with no post-processing,
which is what sacreBLEU scores against the raw references (Post 2018, "A Call for Clarity in
Reporting BLEU Scores"): BLEU with its 13a tokenization and chrF, as the sacrebleu command line
computes them by default, with the signature that says so.
"""

import functools
import gzip
import json
import os

import numpy as np
import torch

from model import EncoderDecoder, search
from optional import optional
from tokenizer import Tokenizer

MULTI30K_URL = "https://raw.githubusercontent.com/multi30k/dataset/a3d2e0d26b56f3846f66a952536ffed4e401d05a/data/task1/raw/"
MULTI30K_SHA256 = {
    "train.de.gz": "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6",
    "train.en.gz": "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f",
    "train.fr.gz": "622e75069e9f4c577425c4f277116ce66e63a2401c0a2312d90073cb12379a3c",
    "val.de.gz": "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a",
    "val.en.gz": "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28",
    "val.fr.gz": "ca3106f1a72390591d25f6c45cb4cd39dec4cd3f123e099748a3ce5256c160e9",
    "test_2016_flickr.de.gz": "9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8",
    "test_2016_flickr.en.gz": "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9",
    "test_2016_flickr.fr.gz": "6d326e188d259fb1d04ac19eae3af956559b3a0b93d7635e56c90987c40c8b90",
}
MULTI30K_SPLITS = {"train": "train", "val": "val", "test": "test_2016_flickr"}


# -----------------------------------------------------------------------------
# reading


def read_lines(path):
    """The lines of a UTF-8 text file, plain or .gz, without their line ends; one line if it cannot be read."""
    if not os.path.isfile(path):
        raise SystemExit(f"data error: no file {path}; check the path")
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise SystemExit(f"data error: {path} is not UTF-8 text (byte {e.start} is not); convert it "
                         "(iconv -t UTF-8) or pick another file") from None
    except (OSError, EOFError) as e:  # a damaged or truncated .gz
        raise SystemExit(f"data error: {path} cannot be read ({e}); download or copy it again") from None
    # Only \n and \r\n end a line: splitlines() would also split at U+2028 and its kin inside a sentence.
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def read_parallel(spec, source_field="source", target_field="target"):
    """(sources, targets): the aligned sentences of "SOURCE_FILE,TARGET_FILE" or a .jsonl(.gz) file."""
    if spec.endswith((".jsonl", ".jsonl.gz")):
        sources, targets = [], []
        for n, line in enumerate(read_lines(spec), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"data error: {spec} line {n} is not valid JSON ({e.msg}); fix or remove it") from None
            if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in (source_field,
                                                                                                 target_field)):
                raise SystemExit(f"data error: {spec} line {n} is not a record with string fields '{source_field}' "
                                 f"and '{target_field}'; fix it, or set source_field and target_field")
            sources.append(record[source_field])
            targets.append(record[target_field])
        return sources, targets
    paths = spec.split(",")
    if len(paths) != 2:
        raise SystemExit(f"config error: parallel data '{spec}' is neither SOURCE_FILE,TARGET_FILE nor a .jsonl file")
    sources, targets = read_lines(paths[0]), read_lines(paths[1])
    if len(sources) != len(targets):
        raise SystemExit(f"data error: {paths[0]} has {len(sources):,} lines but {paths[1]} has {len(targets):,}; "
                         "line n of one must be the translation of line n of the other")
    return sources, targets


def multi30k(folder, split, source_lang, target_lang):
    """The "SOURCE_FILE,TARGET_FILE" of a Multi30K split (train, val or test) from folder, or, if folder is
    empty, from the public copies, downloaded once into data/multi30k and checked against their sha256."""
    from download import download  # requests: only when something is downloaded

    names = []
    for lang in (source_lang, target_lang):
        name = f"{MULTI30K_SPLITS[split]}.{lang}.gz"
        if name not in MULTI30K_SHA256:
            raise SystemExit(f"config error: Multi30K has no language '{lang}'; source_lang and target_lang are "
                             "two of de, en, fr")
        if folder:
            names.append(os.path.join(folder, name))
        else:
            names.append(download(MULTI30K_URL + name, MULTI30K_SHA256[name], os.path.join("data", "multi30k"),
                                  error="data error", offline="fetch the files another way and pass "
                                  "--multi30k_dir=FOLDER", other_sha256="pass --multi30k_dir=FOLDER holding "
                                  "copies you trust")[0])
    return ",".join(names)


def data_of(config, split):
    """The parallel data of a split (train, val, test) that a translate.py config names, as read_parallel reads it;
    '' for none. data='multi30k' also names its val and test sets, unless val_data or test_data say otherwise."""
    spec = config["data"] if split == "train" else config[f"{split}_data"]
    if not spec and config["data"] == "multi30k":
        spec = "multi30k"
    if spec == "multi30k":
        return multi30k(config["multi30k_dir"], split, config["source_lang"], config["target_lang"])
    return spec


def read_pairs(spec, source_field="source", target_field="target"):
    """The (source, target) pairs of parallel data (see read_parallel) with text on both sides, and how
    many were left out for an empty side."""
    pairs = list(zip(*read_parallel(spec, source_field, target_field)))
    kept = [(s, t) for s, t in pairs if s.strip() and t.strip()]
    if not kept:
        raise SystemExit(f"data error: {spec} has no pair with text on both sides; check the files")
    return kept, len(pairs) - len(kept)


def held_out_split(pairs, fraction, seed=0):
    """(train, held out): a fixed random `fraction` of the pairs held out, each part in its original order."""
    order = np.random.default_rng(seed).permutation(len(pairs))
    held = set(order[: round(fraction * len(pairs))].tolist())
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


# -----------------------------------------------------------------------------
# tokens


def train_tokenizer(kind, texts, vocab_size):
    """A byte-level BPE learned on texts (both sides: one joint vocabulary) or, with kind 'gpt2', GPT-2's."""
    if kind not in ("bpe", "gpt2"):
        raise SystemExit(f"config error: tokenizer='{kind}' is not one of bpe, gpt2")
    if kind == "bpe" and vocab_size < 258:
        raise SystemExit(f"config error: vocab_size={vocab_size} leaves no room for merges after the 256 bytes and "
                         "end-of-text; use e.g. --vocab_size=8000")
    return Tokenizer.train(kind, texts, vocab_size=vocab_size)


def encode_source(tokenizer, text, block_size):
    """A source's ids: its tokens and end-of-text, cut to block_size."""
    return (tokenizer.encode(text) + [tokenizer.eot_id])[:block_size]


def encode_pairs(tokenizer, pairs, block_size):
    """Training examples (source ids, target ids) of (source, target) text pairs, and how many sides were cut
    at block_size. The target ids are end-of-text, its tokens, end-of-text: the decoder reads all but the
    last and predicts all but the first, so it holds block_size + 1 ids at most."""
    examples, n_cut = [], 0
    for source, target in pairs:
        source_ids = tokenizer.encode(source) + [tokenizer.eot_id]
        target_ids = [tokenizer.eot_id] + tokenizer.encode(target) + [tokenizer.eot_id]
        n_cut += (len(source_ids) > block_size) + (len(target_ids) > block_size + 1)
        examples.append((source_ids[:block_size], target_ids[: block_size + 1]))
    return examples, n_cut


@functools.lru_cache(maxsize=4)
def epoch_batches(lengths, batch_size, seed, epoch):
    """The batches (lists of example indices) of one epoch: every example once, in an order of its own
    each epoch. Examples of about the same length go together, so little of a batch is padding: a random
    order is cut into pools of 64 batches, each pool sorted by length and cut into batches, and the
    batches shuffled. lengths is a tuple (hashable: the result is cached)."""
    rng = np.random.default_rng((seed, epoch))
    order = rng.permutation(len(lengths))
    pool = 64 * batch_size
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool].tolist(), key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def batch_at(lengths, batch_size, index, seed):
    """Batch number `index` of an endless run of epochs: a pure function of its arguments, so a resumed run
    reads the batches one never stopped would have, and each process can take its own without asking."""
    n_batches = -(-len(lengths) // batch_size)
    return epoch_batches(lengths, batch_size, seed, index // n_batches)[index % n_batches]


def collate_pairs(pairs, pad_id):
    """Examples as tensors: src (B, S) right-padded with pad_id and src_lengths (B,); the decoder's input
    tgt (B, T) and its targets (B, T), -1 where there is nothing to predict."""
    S, T = max(len(s) for s, _ in pairs), max(len(t) for _, t in pairs) - 1
    src, tgt = torch.full((len(pairs), S), pad_id), torch.full((len(pairs), T), pad_id)
    targets = torch.full((len(pairs), T), -1)
    for row, (source, target) in enumerate(pairs):
        src[row, : len(source)] = torch.tensor(source)
        tgt[row, : len(target) - 1] = torch.tensor(target[:-1])
        targets[row, : len(target) - 1] = torch.tensor(target[1:])
    return src, torch.tensor([len(s) for s, _ in pairs]), tgt, targets


# -----------------------------------------------------------------------------
# translating and scoring


def decoder_only_example(source_ids, target_ids):
    """A decoder-only model's training row for a pair: the source, end-of-text, the target, end-of-text
    (x, and its next tokens y with the loss on the target only, -1 over the source, as sft.py masks
    the prompt)."""
    sequence = source_ids + target_ids[1:]
    return sequence[:-1], [-1] * (len(source_ids) - 1) + target_ids[1:]


def decoder_only_stepper(model, prompts, copies=1):
    """For a GPT that translates by continuing `source <end-of-text>`: (first, step) for greedy_decode and
    beam_search, first the prompts left-padded (B, L) and step as EncoderDecoder.stepper's. The model
    never reads the padding: each row runs from position 0 of its own cache rows, as decoding.py's
    slots do, so a prompt is translated as it would be alone."""
    L = max(len(p) for p in prompts)
    device = model.lm_head.weight.device
    first = torch.zeros((len(prompts), L), dtype=torch.long, device=device)
    for row, ids in enumerate(prompts):
        first[row, L - len(ids) :] = torch.tensor(ids)
    lengths = torch.tensor([len(ids) for ids in prompts], device=device).repeat_interleave(copies)
    cache = [{} for _ in model.blocks]  # per layer "k" and "v" (rows, n_kv_head, block_size, head_dim)

    def prefill(tokens):
        """Run each row's prompt (prompts of one length together) into its cache rows; its last logits."""
        logits = None
        for length in sorted(set(lengths.tolist())):
            index = (lengths == length).nonzero()[:, 0]
            layers = [{} for _ in model.blocks]
            out = model(tokens[index, L - length :], cache=layers)[0][:, -1]
            for layer, new in zip(cache, layers):
                for name in ("k", "v"):
                    if name not in layer:
                        layer[name] = new[name].new_zeros(len(tokens), new[name].size(1), model.config.block_size,
                                                          new[name].size(3))
                    layer[name][index, :, :length] = new[name]
            logits = out.new_empty(len(tokens), out.size(-1)) if logits is None else logits
            logits[index] = out
        return logits

    def step(tokens, order=None):
        if tokens.size(1) == L:
            return prefill(tokens)
        if order is not None:  # beams of one prompt move among its rows, whose prompt length is the same
            for layer in cache:
                for name in layer:
                    layer[name] = layer[name][order]
        pos = lengths + (tokens.size(1) - 1 - L)  # each row's newest token, after its own prompt
        return model(tokens[:, -1:], cache=cache, pos=pos, keys=int(pos.max()) + 1)[0][:, -1]

    return first, step


@torch.no_grad()
def translate_lines(model, tokenizer, lines, batch_size=64, beam_size=1, length_penalty=1.0, autocast=None,
                    device="cpu"):
    """The translation of each line (an empty line: an empty one), in order, and how many sources were cut
    at block_size. An EncoderDecoder reads the source; a decoder-only GPT continues `source <end-of-text>`.
    Lines go in batches of similar length, longest first."""
    block_size = model.config.block_size
    decoder_only = not isinstance(model, EncoderDecoder)
    room = block_size // 2 if decoder_only else block_size  # a decoder-only model's context holds both sides
    ids = [encode_source(tokenizer, line, room) if line.strip() else [] for line in lines]
    n_cut = sum(len(tokenizer.encode(line)) + 1 > room for line in lines if line.strip())
    order = sorted((i for i in range(len(lines)) if ids[i]), key=lambda i: -len(ids[i]))
    out = [""] * len(lines)
    end = tokenizer.eot_id
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        longest = len(ids[rows[0]])
        # A translation rarely runs past twice its source's length (fairseq's max_len_a, max_len_b); a
        # decoder-only model's continuation has the room its context leaves after the longest source.
        max_new_tokens = [min(2 * len(ids[i]) + 10, block_size - room if decoder_only else block_size) for i in rows]
        with autocast or torch.autocast("cpu", enabled=False):
            if decoder_only:
                first, step = decoder_only_stepper(model, [ids[i] for i in rows], beam_size)
                translated = search(step, first, end, max_new_tokens, beam_size, length_penalty)
            else:
                src = torch.zeros((len(rows), longest), dtype=torch.long, device=device)
                for r, i in enumerate(rows):
                    src[r, : len(ids[i])] = torch.tensor(ids[i])
                lengths = torch.tensor([len(ids[i]) for i in rows], device=device)
                translated = model.translate(src, lengths, end, end, max_new_tokens, beam_size, length_penalty)
        for i, new in zip(rows, translated):
            out[i] = tokenizer.decode(new).strip()
    return out, n_cut


def corpus_scores(hypotheses, references):
    """sacreBLEU's BLEU and chrF of the hypotheses against one reference each, as `sacrebleu REFS -i HYPS -m bleu
    chrf` computes them (cased, 13a tokenization inside BLEU), and their signatures."""
    metrics = optional("sacrebleu.metrics", "scoring translations")
    bleu, chrf = metrics.BLEU(), metrics.CHRF()
    return {"bleu": bleu.corpus_score(hypotheses, [references]).score,
            "chrf": chrf.corpus_score(hypotheses, [references]).score,
            "bleu_signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature())}
