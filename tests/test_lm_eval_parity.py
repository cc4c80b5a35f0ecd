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

from benchmarks import evaluate_examples, read_examples
from conftest import GPT2, REPO, tiny_gpt
from evaluate import _BENCHMARKS
from hf import save_folder
from tokenizer import Tokenizer

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install \"lm-eval[hf]==0.4.13\")")
pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate (pip install \"lm-eval[hf]==0.4.13\")")
from lm_eval.tasks import TaskManager  # noqa: E402

LOCAL_EVALS = os.environ.get("LOCAL_EVALS", os.path.join(REPO, "..", "shared", "data", "evals"))
PARITY_EXAMPLES = int(os.environ.get("PARITY_EXAMPLES", "10"))
OFFICIAL = {"hellaswag": "hellaswag/hellaswag.yaml", "arc_easy": "arc/arc_easy.yaml", "piqa": "piqa/piqa.yaml",
            "winogrande": "winogrande/default.yaml", "lambada": "lambada/lambada_openai.yaml"}

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


def task_yaml(folder, task, data_file):
    """A task that is lm-eval's official one with only its data swapped for data_file."""
    official = os.path.join(os.path.dirname(lm_eval.tasks.__file__), OFFICIAL[task])
    lines = [f"include: {official}", f"task: parity_{task}", "tag: []", "dataset_path: json", "dataset_name: null",
             "dataset_kwargs:", "  data_files:", f"    test: {data_file}", "training_split: null",
             "validation_split: null", "test_split: test"]
    if task == "winogrande":  # lm-eval computes acc_norm for it too when asked; its task asks for acc alone
        lines += ["metric_list:", "  - metric: acc", "    aggregation: mean", "    higher_is_better: true",
                  "  - metric: acc_norm", "    aggregation: mean", "    higher_is_better: true"]
    with open(os.path.join(folder, f"parity_{task}.yaml"), "w") as f:
        f.write("\n".join(lines) + "\n")


def tiny_model(style, vocab_size, seed):
    """A random model whose logits vary widely, so that options rarely come near a tie."""
    styles = {"gpt2": dict(GPT2, tie_embeddings=False), "llama": dict(n_kv_head=2)}
    return tiny_gpt(seed, 0.3, vocab_size=vocab_size, block_size=256, n_head=4, **styles[style])


def task_records():
    """The records of each task: the hand-built ones and, where the local eval files are, their first ones."""
    records = {task: list(rows) for task, rows in HAND_BUILT.items()}
    if os.path.isdir(LOCAL_EVALS):
        for task, name in _BENCHMARKS.items():
            with open(os.path.join(LOCAL_EVALS, name), encoding="utf-8") as f:
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
