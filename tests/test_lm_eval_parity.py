"""benchmarks.py against lm-evaluation-harness itself: the same records through lm-eval's own task definitions
give the same accuracy and acc_norm, task by task.

    pip install "lm-eval[hf]==0.4.13"   # not in requirements.txt: about 340 MB more; the test skips without it
    python -m pytest -q tests/test_lm_eval_parity.py

A tiny random model (GPT-2 and Llama styles) and a small BPE tokenizer are exported with hf.py as a Hugging Face
folder, which lm-eval loads with its 'hf' model. lm-eval reads the records through local task YAMLs that include
its official hellaswag, arc_easy, piqa, winogrande and lambada_openai definitions and swap only the dataset for a
local JSON file (the records converted to the fields of the Hugging Face datasets those tasks read). The hand-built
records hit each convention (punctuation after the blank, WikiHow tags, trailing whitespace, contexts longer than
the model); the first PARITY_EXAMPLES (default 10; 100 by hand, see
README.md) records of each file in ../shared/data/evals are compared too
when that folder is there (or LOCAL_EVALS names one). Offline: nothing is downloaded.
"""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before lm-eval imports datasets and transformers: never the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

from benchmarks import TASKS, evaluate_examples, read_examples, read_task
from conftest import GPT2, REPO, tiny_gpt
from hf import save_folder
from tokenizer import Tokenizer

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install \"lm-eval[hf]==0.4.13\")")
pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate (pip install \"lm-eval[hf]==0.4.13\")")
from lm_eval.tasks import TaskManager  # noqa: E402

LOCAL_EVALS = os.environ.get("LOCAL_EVALS", os.path.join(REPO, "..", "shared", "data", "evals"))
PARITY_EXAMPLES = int(os.environ.get("PARITY_EXAMPLES", "10"))
OFFICIAL = {"hellaswag": "hellaswag/hellaswag.yaml", "arc_easy": "arc/arc_easy.yaml", "piqa": "piqa/piqa.yaml",
            "winogrande": "winogrande/default.yaml", "lambada": "lambada/lambada_openai.yaml"}
MULTIPLE_CHOICE = ("hellaswag", "arc_easy", "piqa", "winogrande", "lambada")
OFFICIAL["gsm8k"] = "gsm8k/gsm8k.yaml"
GSM8K_EXAMPLES = 50

# Records in this repository's formats (benchmarks.py), each task with the cases its convention turns on.
HAND_BUILT = {
    "hellaswag": [
        {"activity_label": "Baking", "ctx_a": "[header] How to bake a cake [title] Heat the oven.", "ctx_b": "then YOU",
         "endings": ["[step] Mix the  flour.", "eat it [substeps] now.", ", then wait.", "'s done."], "label": "2"},
        {"activity_label": "Roof shingle removal", "ctx": "A man is sitting on a roof. he", "label": 3,
         "endings": ["is using wrap.", "is ripping level tiles off.", "is holding a cube.", "starts pulling up roofing."]},
    ],
    "arc_easy": [
        {"query": "Question: Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide", "helium"], "gold": 1},
        {"query": "Question: What is 2+2? ", "choices": ["4", "five", "(c) 22", "4.0"], "gold": 0},
    ],
    "piqa": [
        {"query": "Question: How do I open a jar?\n", "choices": ["Twist the lid.", ", then twist the lid"], "gold": 0},
        {"query": "Question: dresser\n", "choices": ["replace drawer with bobby pin", "finish, woodgrain with  bobby pin"],
         "gold": 1},
    ],
    "winogrande": [
        {"context_options": ["Sarah was a much better surgeon than Maria so Sarah",
                             "Sarah was a much better surgeon than Maria so Maria"],
         "continuation": "always got the easier cases.", "gold": 1},
        {"context_options": ["The cup fell on the glass and the cup", "The cup fell on the glass and the glass"],
         "continuation": "'s handle broke.", "gold": 0},
    ],
    "lambada": [
        {"context": "He looked at the clock on the wall. It was almost midnight, and the", "continuation": "clock"},
        {"context": " ".join(["word"] * 300) + " and then the", "continuation": "end"},  # longer than the model
        {"context": "She said \"yes\" to the", "continuation": "offer"},
    ],
}


def as_lm_eval_record(task, record):
    """A record of this repository's formats as a record of the Hugging Face dataset lm-eval's task reads."""
    if task == "hellaswag":
        if "ctx_a" in record:
            return record
        # The cleaned format's ctx is the original's ctx_a and ctx_b joined; lm-eval strips the space it adds.
        return {"activity_label": record["activity_label"], "ctx_a": record["ctx"], "ctx_b": "",
                "endings": record["endings"], "label": str(record["label"])}
    if task in ("arc_easy", "piqa"):
        question = record["query"].strip().removeprefix("Question: ")
        if task == "piqa":
            return {"goal": question, "sol1": record["choices"][0], "sol2": record["choices"][1], "label": record["gold"]}
        labels = [chr(ord("A") + i) for i in range(len(record["choices"]))]
        return {"id": "q", "question": question, "choices": {"text": record["choices"], "label": labels},
                "answerKey": labels[record["gold"]]}
    if task == "winogrande":
        # The blank first and each option a whole context: lm-eval fills the blank with the option and scores
        # the rest of the sentence, exactly the pairs the context_options give.
        return {"sentence": "_ " + record["continuation"], "option1": record["context_options"][0],
                "option2": record["context_options"][1], "answer": str(record["gold"] + 1)}
    return {"text": record["context"] + " " + record["continuation"]}  # lambada: the last word after the last space


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def task_yaml(folder, task, data_file, train_file=None):
    """A task that is lm-eval's official one with only its data swapped for data_file (and its train split, where
    few-shot examples come from, for train_file)."""
    official = os.path.join(os.path.dirname(lm_eval.tasks.__file__), OFFICIAL[task])
    lines = [f"include: {official}", f"task: parity_{task}", "tag: []", "dataset_path: json", "dataset_name: null",
             "dataset_kwargs:", "  data_files:", f"    test: {data_file}"]
    lines += [f"    train: {train_file}", "training_split: train"] if train_file else ["training_split: null"]
    lines += ["validation_split: null", "test_split: test"]
    if task == "winogrande":  # lm-eval computes acc_norm for it too when asked; its task asks for acc alone
        lines += ["metric_list:", "  - metric: acc", "    aggregation: mean", "    higher_is_better: true",
                  "  - metric: acc_norm", "    aggregation: mean", "    higher_is_better: true"]
    with open(os.path.join(folder, f"parity_{task}.yaml"), "w") as f:
        f.write("\n".join(lines) + "\n")


def tiny_model(style, vocab_size, seed, block_size=256):
    """A random model whose logits vary widely, so that options rarely come near a tie."""
    styles = {"gpt2": dict(GPT2, tie_embeddings=False), "llama": dict(n_kv_head=2)}
    return tiny_gpt(seed, 0.3, vocab_size=vocab_size, block_size=block_size, n_head=4, **styles[style])


def task_records():
    """The records of each task: the hand-built ones and, where the local eval files are, their first ones."""
    records = {task: list(rows) for task, rows in HAND_BUILT.items()}
    if os.path.isdir(LOCAL_EVALS):
        for task in MULTIPLE_CHOICE:
            with open(os.path.join(LOCAL_EVALS, TASKS[task]), encoding="utf-8") as f:
                records[task] += [json.loads(line) for _, line in zip(range(PARITY_EXAMPLES), f)]
    return records


@pytest.fixture(scope="module")
def tokenizer():
    texts = [json.dumps(rows) for rows in task_records().values()]
    return Tokenizer.train("bpe", texts, vocab_size=1000)


@pytest.mark.parametrize("style, seed", [("gpt2", 0), ("llama", 1)])
def test_accuracy_and_acc_norm_equal_lm_evals_task_by_task(style, seed, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    model = tiny_model(style, tokenizer.vocab_size, seed)
    save_folder(str(tmp_path / "hf"), model, tokenizer)
    ours = {}
    for task, records in task_records().items():
        kind, examples = read_examples(write_jsonl(tmp_path / f"{task}.jsonl", records))
        ours[task] = evaluate_examples(kind, examples, model, tokenizer, batch_size=8)
        task_yaml(tmp_path, task, write_jsonl(tmp_path / f"{task}_lm_eval.jsonl",
                                              [as_lm_eval_record(task, r) for r in records]))
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'hf'},dtype=float32",
                                  tasks=[f"parity_{task}" for task in ours], device="cpu", batch_size=8,
                                  task_manager=TaskManager(include_path=str(tmp_path)), bootstrap_iters=0)
    for task, result in ours.items():
        theirs = out["results"][f"parity_{task}"]
        print(f"{style} {task:<11} {result['examples']:>4} examples  accuracy {result['accuracy']:.4f} lm-eval "
              f"{theirs['acc,none']:.4f}  " + (f"perplexity {result['perplexity']:.2f} lm-eval {theirs['perplexity,none']:.2f}"
              if task == "lambada" else f"accuracy_norm {result['accuracy_norm']:.4f} lm-eval {theirs['acc_norm,none']:.4f}"))
        assert out["n-samples"][f"parity_{task}"]["effective"] == result["examples"], task
        assert result["accuracy"] == theirs["acc,none"], task
        if task == "lambada":
            assert result["perplexity"] == pytest.approx(theirs["perplexity,none"], rel=1e-4)
        else:
            assert result["accuracy_norm"] == theirs["acc_norm,none"], task


@pytest.mark.skipif(not os.path.isdir(os.path.join(LOCAL_EVALS, "gsm8k")), reason="needs ../shared/data/evals/gsm8k")
def test_gsm8k_prompts_answers_and_both_exact_matches_equal_lm_evals(tmp_path, monkeypatch):
    """The first GSM8K_EXAMPLES test questions, five-shot, greedy up to 256 tokens: lm-eval's prompt, completion,
    strict-match and flexible-extract answer for each, and both exact-match scores, equal ours."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    test_file, train_file = (os.path.join(LOCAL_EVALS, "gsm8k", f"{split}.jsonl") for split in ("test", "train"))
    kind, examples = read_task("gsm8k", LOCAL_EVALS, GSM8K_EXAMPLES)
    with open(train_file, encoding="utf-8") as f:
        texts = [line for _, line in zip(range(1000), f)]
    tokenizer = Tokenizer.train("bpe", texts, vocab_size=2000)
    model = tiny_model("gpt2", tokenizer.vocab_size, seed=2, block_size=2048)  # five shots and an answer fit
    save_folder(str(tmp_path / "hf"), model, tokenizer)
    ours = evaluate_examples(kind, examples, model, tokenizer, batch_size=8, details=True)
    task_yaml(tmp_path, "gsm8k", test_file, train_file)
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'hf'},dtype=float32",
                                  tasks=["parity_gsm8k"], device="cpu", batch_size=8, limit=GSM8K_EXAMPLES,
                                  log_samples=True, task_manager=TaskManager(include_path=str(tmp_path)),
                                  bootstrap_iters=0)
    theirs = {}  # doc_id -> {filter: sample}
    for sample in out["samples"]["parity_gsm8k"]:
        theirs.setdefault(sample["doc_id"], {})[sample["filter"]] = sample
    assert sorted(theirs) == list(range(GSM8K_EXAMPLES))
    for i, (example, row) in enumerate(zip(examples, ours["per_example"])):
        strict, flexible = theirs[i]["strict-match"], theirs[i]["flexible-extract"]
        assert strict["arguments"][0][0] == example["base_prompt"], i
        assert strict["resps"][0][0] == row["completion"], i
        assert (strict["filtered_resps"][0], flexible["filtered_resps"][0]) == (row["strict"], row["flexible"]), i
        assert (strict["exact_match"], flexible["exact_match"]) == (row["strict_correct"], row["flexible_correct"]), i
    result = out["results"]["parity_gsm8k"]
    numbers = sum(row["flexible"] != "[invalid]" for row in ours["per_example"])
    print(f"gsm8k {ours['examples']} examples ({numbers} answers with a number): exact_match strict "
          f"{ours['exact_match_strict']:.4f} lm-eval {result['exact_match,strict-match']:.4f}, flexible "
          f"{ours['exact_match_flexible']:.4f} lm-eval {result['exact_match,flexible-extract']:.4f}")
    assert ours["exact_match_strict"] == result["exact_match,strict-match"]
    assert ours["exact_match_flexible"] == result["exact_match,flexible-extract"]


def official_yaml(task):
    """An official task's YAML as data; its !function tags (Python hooks) read as None."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    with open(os.path.join(os.path.dirname(lm_eval.tasks.__file__), OFFICIAL.get(task, f"{task}/{task}.yaml"))) as f:
        return yaml.load(f, Loader=Loader)


def test_the_gsm8k_and_humaneval_conventions_are_those_of_lm_evals_yaml():
    import benchmarks

    gsm8k, humaneval = official_yaml("gsm8k"), official_yaml("humaneval")
    assert gsm8k["doc_to_text"] == benchmarks.gsm8k_question("{{question}}") and gsm8k["num_fewshot"] == benchmarks.GSM8K_SHOTS
    assert gsm8k["generation_kwargs"]["until"] == benchmarks.GSM8K_STOPS
    filters = {f["name"]: f["filter"][0] for f in gsm8k["filter_list"]}
    assert filters["strict-match"]["regex_pattern"] == benchmarks.GSM8K_STRICT.pattern
    assert filters["flexible-extract"]["regex_pattern"] == benchmarks.GSM8K_FLEXIBLE.pattern
    metric = gsm8k["metric_list"][0]
    assert metric["regexes_to_ignore"] == benchmarks.GSM8K_IGNORE and metric["ignore_case"] and not metric["ignore_punctuation"]
    assert humaneval["generation_kwargs"]["until"] == benchmarks.CODE_STOPS


@pytest.mark.parametrize("text", ["#### 18", "So she makes $18.", "#### 1,234.\nThen 5", "nothing", "-3 and 4.5.",
                                  "The answer is #### -7", "#### 2.50 dollars", "$1,000,000"])
def test_gsm8k_filters_and_metric_equal_lm_evals_on_crafted_answers(text):
    """lm-eval's own RegexFilter and exact_match, configured from its gsm8k.yaml, on texts a random model rarely
    writes."""
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    import benchmarks

    gsm8k = official_yaml("gsm8k")
    metric = {k: v for k, v in gsm8k["metric_list"][0].items() if k not in ("metric", "aggregation", "higher_is_better")}
    reference = "Work: 9 * 2 = 18.\n#### 18"
    for name, strict in (("strict-match", True), ("flexible-extract", False)):
        regex = next(f["filter"][0] for f in gsm8k["filter_list"] if f["name"] == name)
        extracted = list(RegexFilter(**{k: v for k, v in regex.items() if k != "function"}).apply([[text]], [{}]))[0][0]
        assert benchmarks.gsm8k_extract(text, strict) == extracted
        theirs = exact_match_hf_evaluate([extracted], [reference], **metric)["exact_match"]
        assert benchmarks.gsm8k_correct(text, reference, strict) == bool(theirs)
