"""
Verifiers: the programs that check an answer and give rl.py its reward, in one place; and a
synthetic task, addition, whose difficulty is a dial and whose SFT data the same code writes.

    python verifiers.py --digits=3 --out=data/addition    # sft.jsonl, prompts.jsonl, held_out.jsonl
    python verifiers.py --digits=2 --careless=0.5        # SFT answers from a teacher who forgets carries
    reward("gsm8k", "So she pays $1,234.", {"answer": "... #### 1234"})    # 1.0

A task file is a benchmark file of benchmarks.py, so that evaluate.py scores the same held-out
prompts with the same rule: GSM8K records {"question", "answer"} are verified by GSM8K's
final-number match (benchmarks.gsm8k_correct, lm-eval's flexible extract: the last number, commas,
dollar signs and a trailing period ignored); generation records {"prompt", "answer"} by exact
match after SQuAD's normalisation (benchmarks.exact_match_score), of the answer's first line, as
evaluate.py cuts a generation answer at its first newline.

Addition: "What is A+B?" with A and B drawn uniformly below 10**digits, answered by the sum's
digits alone. digits is the dial: a few more digits mean longer chains of carries, which a small
model trained on the CPU learns only in part from SFT, leaving room for RL. careless is the share
of the SFT sums needing a carry whose answer forgets every carry: SFT learns the slip, and RL, whose
verifier knows the sums, unlearns it. The held-out prompts, the RL prompts and the SFT examples are
disjoint sets of problems.
"""

import argparse
import json
import os
import random

from benchmarks import exact_match_score, gsm8k_correct

KINDS = ("gsm8k", "generation")  # the benchmark kinds (benchmarks.read_examples) that have a verifier


def reward(kind, text, example):
    """1.0 if a model's answer text is right for the example (as benchmarks.read_examples gives it), else 0.0."""
    if kind == "gsm8k":
        return float(gsm8k_correct(text, example["answer"]))
    return exact_match_score(text.split("\n")[0].strip(), example["answers"])


def question(kind, example):
    """The user's turn of an example: what the model is asked."""
    return example["question"] if kind == "gsm8k" else example["prompt"]


# -----------------------------------------------------------------------------
# addition: the synthetic task


def addition_problems(digits, count, seed, exclude=()):
    """count distinct (a, b) with a and b below 10**digits, none of them in exclude."""
    rng, seen, problems = random.Random(seed), set(exclude), []
    if count > 10 ** (2 * digits) - len(seen):
        raise SystemExit(f"config error: there are not {count} distinct {digits}-digit additions; lower the counts "
                         "or raise --digits")
    while len(problems) < count:
        problem = (rng.randrange(10**digits), rng.randrange(10**digits))
        if problem not in seen:
            seen.add(problem)
            problems.append(problem)
    return problems


def addition_prompt(a, b):
    return f"What is {a}+{b}?"


def write_jsonl(path, records):
    """Write records one per line, to a temporary name first, so a file is never half-written."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    os.replace(path + ".tmp", path)


def sum_without_carries(a, b):
    """a + b written column by column with every carry forgotten: 57+68 -> 15 (7+8 -> 5, 5+6 -> 1)."""
    column, total = 1, 0
    while a or b:
        total += (a % 10 + b % 10) % 10 * column
        a, b, column = a // 10, b // 10, column * 10
    return total


def write_addition_task(out, digits, held_out, prompts, sft, seed=0, careless=0.0):
    """The three files of the addition task in the folder out: held_out.jsonl and prompts.jsonl
    (generation records, for evaluate.py and rl.py) and sft.jsonl (Alpaca-style records, for sft.py).
    careless: the share of the SFT sums that need a carry whose answer forgets every carry, as a
    careless teacher would write it; the RL and held-out answers are always right."""
    held = addition_problems(digits, held_out, seed)
    train = addition_problems(digits, prompts, seed + 1, exclude=held)
    taught = addition_problems(digits, sft, seed + 2, exclude=held + train)
    slips = random.Random(seed + 3)
    taught_answers = [sum_without_carries(a, b) if slips.random() < careless else a + b for a, b in taught]
    os.makedirs(out, exist_ok=True)
    for name, problems in (("held_out", held), ("prompts", train)):
        write_jsonl(os.path.join(out, f"{name}.jsonl"), [{"prompt": addition_prompt(a, b), "answer": str(a + b)}
                                                        for a, b in problems])
    write_jsonl(os.path.join(out, "sft.jsonl"), [{"instruction": addition_prompt(a, b), "output": str(answer)}
                                                for (a, b), answer in zip(taught, taught_answers)])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write the addition task's files: SFT examples, RL prompts and "
                                                 "held-out prompts, disjoint.")
    parser.add_argument("--digits", type=int, default=3, help="the difficulty: operands below 10**digits")
    parser.add_argument("--out", default="data/addition")
    parser.add_argument("--held_out", type=int, default=200)
    parser.add_argument("--prompts", type=int, default=20000)
    parser.add_argument("--sft", type=int, default=20000)
    parser.add_argument("--careless", type=float, default=0.0,
                        help="the share of SFT answers that forget their carries (a careless teacher, 0 to 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.digits < 1:
        raise SystemExit(f"config error: --digits={args.digits}; it must be at least 1")
    if not 0 <= args.careless <= 1:
        raise SystemExit(f"config error: --careless={args.careless}; it is a share, from 0 to 1")
    write_addition_task(args.out, args.digits, args.held_out, args.prompts, args.sft, args.seed, args.careless)
    print(f"wrote {args.out}/held_out.jsonl ({args.held_out}), prompts.jsonl ({args.prompts}) and sft.jsonl "
          f"({args.sft}): {args.digits}-digit additions")
