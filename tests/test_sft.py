"""sft.py and lora.py: the loss is on the answer only, packing changes nothing, LoRA starts as the base,
merges exactly and trains only adapters, adapter checkpoints rebuild their model, SFT teaches answers,
and a stopped run resumes exactly."""

import json
import os
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from chat import add_chat_tokens, collate, pack, render, response_logprobs, split_held_out, training_example
from checkpoint import checkpoint_to_resume, load_checkpoint, model_from_checkpoint, save_checkpoint
from configurator import configure
from conftest import (LLAMA, TOY_INSTRUCTIONS, TOY_VAL_FRACTION, assert_same_weights, logged_after, run_script, run_torchrun,
                      stop_and_resume)
from lora import LoRALinear, adapters_disabled, add_lora, describe_base, lora_state, merge_lora
from model import GPT, GPTConfig
from tokenizer import EOT, Tokenizer

BYTE = {"kind": "byte", "eot": EOT}
LORA = dict(rank=4, alpha=8.0, dropout=0.0, targets=["c_attn", "c_proj", "c_fc"])


def chat_model(**overrides):
    torch.manual_seed(0)
    config = dict(vocab_size=257, n_layer=2, n_head=2, n_embd=32, block_size=64, **LLAMA) | overrides
    return add_chat_tokens(GPT(GPTConfig(**config)), Tokenizer(BYTE))


def exchange(question, answer):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def test_prompt_tokens_get_no_loss_and_the_loss_is_the_mean_over_the_answer():
    model, tok = chat_model()
    ids, learned = render(tok, exchange("hi", "yo"))
    user, assistant, end = (tok.special_tokens[n] for n in ("<|user|>", "<|assistant|>", "<|end|>"))
    assert ids == [tok.eot_id, user, ord("h"), ord("i"), end, assistant, ord("y"), ord("o"), end]
    x, y = training_example(ids, learned, block_size=64)
    assert y == [-1, -1, -1, -1, -1, ord("y"), ord("o"), end]  # after <|assistant|>: 'y', then 'o', then <|end|>
    logits, loss = model(torch.tensor([x]), torch.tensor([y]))
    logp = torch.log_softmax(logits[0].double(), dim=-1)
    by_hand = -(logp[5, ord("y")] + logp[6, ord("o")] + logp[7, end]) / 3
    assert abs(loss.item() - by_hand.item()) < 1e-5


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_packed_examples_get_the_same_loss_as_padded_ones(pos):
    model, tok = chat_model(pos=pos)
    model.eval()
    conversations = [exchange("What is 2+2?", "Four."), exchange("hi", "yo"), exchange("Name a color.", "A warm red.")]
    examples = [training_example(*render(tok, c), block_size=64) for c in conversations]
    padded_x, padded_y, _ = collate([(x, y, [0] * len(x)) for x, y in examples], tok.eot_id)
    padded = response_logprobs(model(padded_x, all_logits=True)[0], padded_y)

    rows = pack(examples, block_size=64)
    assert len(rows) == 1  # all three share one row
    x, y, docs = collate(rows, tok.eot_id)
    nll = F.cross_entropy(model(x, all_logits=True, doc_ids=docs)[0].flatten(0, 1), y.flatten(), ignore_index=-1,
                          reduction="none").view(y.shape)
    packed = torch.stack([-nll[docs == d].sum() for d in range(3)])
    assert torch.allclose(packed, padded, atol=1e-4), (packed, padded)
    # without the document mask the later examples would see the earlier ones
    unmasked = F.cross_entropy(model(x, all_logits=True)[0].flatten(0, 1), y.flatten(), ignore_index=-1,
                               reduction="none").view(y.shape)
    assert not torch.allclose(-unmasked[docs == 2].sum(), padded[2], atol=1e-3)


def test_lora_with_zero_b_computes_exactly_what_the_base_did():
    model, tok = chat_model()
    x = torch.randint(0, 256, (2, 16))
    before = model(x, all_logits=True)[0]
    add_lora(model, **LORA)
    assert torch.equal(model(x, all_logits=True)[0], before)


def test_merged_lora_equals_unmerged_and_is_a_plain_model_again():
    model, tok = chat_model()
    plain_keys = set(model.state_dict())
    add_lora(model, **LORA)
    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            torch.nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randint(0, 256, (2, 16))
    unmerged = model(x, all_logits=True)[0]
    with adapters_disabled(model):
        assert not torch.allclose(model(x, all_logits=True)[0], unmerged, atol=1e-3)
    merge_lora(model)
    assert torch.allclose(model(x, all_logits=True)[0], unmerged, atol=1e-5)
    assert set(model.state_dict()) == plain_keys and all(p.requires_grad for p in model.parameters())


def test_only_the_adapters_get_gradients():
    model, tok = chat_model()
    add_lora(model, **LORA)
    x = torch.randint(0, 256, (2, 16))
    model(x, x)[1].backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (".lora_" in name), name
    n_embd = model.config.n_embd
    ffn = model.config.ffn_hidden
    # rank * (in + out) per adapted layer: c_attn 32->96, attn c_proj 32->32, c_fc 32->2*ffn (SwiGLU), mlp c_proj ffn->32
    expected = model.config.n_layer * 4 * ((n_embd + 3 * n_embd) + 2 * n_embd + (n_embd + 2 * ffn) + (ffn + n_embd))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_an_adapter_checkpoint_rebuilds_base_plus_adapters_and_refuses_a_changed_base(tmp_path):
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=257, n_layer=2, n_head=2, n_embd=32, block_size=64, **LLAMA))
    base_ckpt = {"kind": "pretrain", "model_config": asdict(base.config), "model": base.state_dict(),
                 "tokenizer": BYTE, "step": 7}
    save_checkpoint(base_ckpt, tmp_path / "base.pt")
    # what sft.py does with LoRA on a pretraining checkpoint: chat tokens, then adapters
    model, tok = model_from_checkpoint(load_checkpoint(str(tmp_path / "base.pt")))
    model, tok = add_chat_tokens(model, tok)
    add_lora(model, **LORA)
    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            torch.nn.init.normal_(layer.lora_B, std=0.1)
    adapter = {"kind": "sft", "model_config": asdict(model.config), "model": lora_state(model.state_dict()),
               "tokenizer": tok.description, "lora": LORA, "base": describe_base(str(tmp_path / "base.pt"), base_ckpt)}
    save_checkpoint(adapter, tmp_path / "adapter.pt")
    assert os.path.getsize(tmp_path / "adapter.pt") < os.path.getsize(tmp_path / "base.pt") / 2

    again, again_tok = model_from_checkpoint(load_checkpoint(str(tmp_path / "adapter.pt")))
    x = torch.randint(0, 261, (2, 16))
    assert torch.equal(again(x, all_logits=True)[0], model(x, all_logits=True)[0])
    assert again_tok.special_tokens == tok.special_tokens

    save_checkpoint({**base_ckpt, "step": 8}, tmp_path / "base.pt")  # the base moved on
    with pytest.raises(SystemExit, match="which has changed since"):
        model_from_checkpoint(load_checkpoint(str(tmp_path / "adapter.pt")))

    # a base of another shape, named with its own sha256 (the adapter file edited): one line, no size mismatch
    wider = GPT(GPTConfig(vocab_size=257, n_layer=2, n_head=2, n_embd=48, block_size=64))
    wider_ckpt = {**base_ckpt, "model_config": asdict(wider.config), "model": wider.state_dict()}
    save_checkpoint(wider_ckpt, tmp_path / "wider.pt")
    save_checkpoint({**adapter, "base": describe_base(str(tmp_path / "wider.pt"), wider_ckpt)}, tmp_path / "moved.pt")
    with pytest.raises(SystemExit, match=r"adapters do not fit its base .*wider.pt \(blocks.0.attn.c_attn.lora_A is "
                                         r"\[4, 32\] in the adapters, \[4, 48\] in the base\)"):
        model_from_checkpoint(load_checkpoint(str(tmp_path / "moved.pt")))


def test_sft_makes_a_small_model_repeat_a_training_answer_verbatim(tiny_sft_checkpoint):
    train_records, held_out = split_held_out(TOY_INSTRUCTIONS, TOY_VAL_FRACTION)
    assert len(held_out) == 2
    record = next(r for r in train_records if not r.get("input"))
    result = run_script("sample.py", f"--out_dir={tiny_sft_checkpoint}", "--device=cpu", "--chat=True",
                        f"--prompt={record['instruction']}", "--temperature=0", "--max_new_tokens=20")
    assert result.stdout == record["output"] + "\n"
    ckpt = load_checkpoint(os.path.join(tiny_sft_checkpoint, "ckpt.pt"))
    assert ckpt["kind"] == "sft" and ckpt["model_config"]["vocab_size"] == 261 and "lora" not in ckpt
    with open(os.path.join(tiny_sft_checkpoint, "metrics.jsonl")) as f:
        held_out_losses = [m["val_loss"] for m in map(json.loads, f) if "val_loss" in m]
    assert len(held_out_losses) == 3  # steps 0, 40, 80


def test_sft_tracks_a_generative_benchmark_in_chat_prompts_at_every_evaluation(tiny_sft_checkpoint):
    # The fixture's benchmark asks the questions it trains on: a model that answers them verbatim in the chat
    # format (see the test above) gets every one right only if the benchmark asks in that format too.
    with open(os.path.join(tiny_sft_checkpoint, "metrics.jsonl")) as f:
        evals = [m for m in map(json.loads, f) if "val_loss" in m]
    assert [m["step"] for m in evals] == [0, 40, 80]
    assert all(m["benchmark_examples"] == 4 and m["benchmark_chance"] == 0.0 for m in evals)
    assert evals[0]["benchmark_exact_match"] == 0.0 and evals[-1]["benchmark_exact_match"] == 1.0


def test_sft_with_lora_saves_only_the_adapters_and_says_how_many_weights_train(tiny_checkpoint, tmp_path):
    (tmp_path / "toy.jsonl").write_text("".join(json.dumps({"messages": exchange(r["instruction"], r["output"])}) + "\n"
                                                for r in TOY_INSTRUCTIONS))
    result = run_script("sft.py", f"--init_from={tiny_checkpoint}/ckpt.pt", f"--data={tmp_path / 'toy.jsonl'}",
                        f"--out_dir={tmp_path / 'out'}", "--device=cpu", "--lora_rank=4", "--packing=False",
                        "--batch_size=2", "--total_batch_size=4", "--max_iters=3", "--eval_interval=3")
    assert "of them trained" in result.stdout
    assert "<|system|> 257, <|user|> 258, <|assistant|> 259, <|end|> 260" in result.stdout
    ckpt = load_checkpoint(str(tmp_path / "out" / "ckpt.pt"))
    assert ckpt["lora"]["rank"] == 4 and ckpt["base"]["step"] == 4 and len(ckpt["base"]["sha256"]) == 64
    assert ckpt["base"]["path"].endswith("ckpt-0000004.pt")  # the step-numbered file, not the moving ckpt.pt
    assert all(".lora_" in k for k in ckpt["model"])
    model, tok = model_from_checkpoint(ckpt, "adapter")
    assert any(isinstance(m, LoRALinear) for m in model.modules()) and tok.vocab_size == 261


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_sft_in_two_processes_ends_with_the_weights_of_one(parallelism, tiny_checkpoint, tmp_path):
    (tmp_path / "toy.json").write_text(json.dumps(TOY_INSTRUCTIONS))
    # 4 examples per step: 2 micro-steps of 2 in one process, 1 in each of two
    args = [f"--init_from={tiny_checkpoint}/ckpt.pt", f"--data={tmp_path / 'toy.json'}", "--device=cpu",
            "--val_fraction=0", "--batch_size=2", "--total_batch_size=4", "--max_iters=3", "--eval_interval=3",
            "--learning_rate=1e-2", "--packing=False"]
    run_script("sft.py", *args, f"--out_dir={tmp_path / 'one'}")
    result = run_torchrun("sft.py", *args, f"--out_dir={tmp_path / 'two'}", f"--parallelism={parallelism}")
    assert "2 x 2 processes x 1 accumulation steps" in result.stdout
    one, two = (load_checkpoint(str(tmp_path / run / "ckpt.pt"))["model"] for run in ("one", "two"))
    start = model_from_checkpoint(load_checkpoint(f"{tiny_checkpoint}/ckpt.pt"))[0].state_dict()
    assert (one["blocks.0.attn.c_attn.weight"] - start["blocks.0.attn.c_attn.weight"]).abs().max() > 1e-3
    assert_same_weights(two, one, atol=1e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_sft_stopped_and_resumed_ends_with_the_weights_and_losses_of_an_uninterrupted_run(lora, tiny_checkpoint,
                                                                                         tmp_path):
    (tmp_path / "toy.json").write_text(json.dumps(TOY_INSTRUCTIONS))
    args = [f"--init_from={tiny_checkpoint}/ckpt.pt", f"--data={tmp_path / 'toy.json'}", "--device=cpu",
            f"--val_fraction={TOY_VAL_FRACTION}", "--batch_size=2", "--total_batch_size=4", "--max_iters=4",
            "--eval_interval=2", "--log_interval=1", "--learning_rate=1e-2", "--warmup_iters=1", "--resume=auto"]
    # with LoRA, the adapters' dropout makes the losses depend on the restored random state too
    args += ["--lora_rank=4", "--lora_dropout=0.1"] if lora else []
    whole, resumed, stdout = stop_and_resume("sft.py", args, tmp_path, at_step=2)
    assert f"resuming {resumed / 'ckpt-0000002.pt'} at step 2" in stdout
    assert [r["step"] for r in logged_after(whole, 2)] == [3, 4, 4]  # two steps' losses, then the held-out loss
    assert logged_after(resumed, 2) == logged_after(whole, 2)
    ends = [load_checkpoint(str(run / "ckpt.pt")) for run in (whole, resumed)]
    assert_same_weights(ends[1]["model"], ends[0]["model"])
    if lora:  # the file stays small: adapters only, and the optimizer state of the adapters only
        assert all(".lora_" in k for k in ends[1]["model"])
        assert set(ends[1]["optimizer"]["state"]) == set(ends[1]["model"])


def test_a_one_process_lora_run_resumes_under_fsdp_in_two_processes_with_its_weights_and_losses(tiny_checkpoint,
                                                                                                 tmp_path):
    (tmp_path / "toy.json").write_text(json.dumps(TOY_INSTRUCTIONS))
    # 4 examples per step: 2 micro-steps of 2 in one process, 1 in each of two; FSDP shards only under torchrun
    args = [f"--init_from={tiny_checkpoint}/ckpt.pt", f"--data={tmp_path / 'toy.json'}", "--device=cpu",
            "--val_fraction=0", "--batch_size=2", "--total_batch_size=4", "--max_iters=4", "--eval_interval=2",
            "--log_interval=1", "--learning_rate=1e-2", "--packing=False", "--lora_rank=4", "--parallelism=fsdp",
            "--resume=auto"]
    whole, resumed, stdout = stop_and_resume("sft.py", args, tmp_path, at_step=2, nproc=2)
    assert "written by 1 processes, this run has 2" in stdout and "dropout's random state starts afresh" in stdout
    losses = [[r["loss"] for r in logged_after(run, 2) if "loss" in r] for run in (whole, resumed)]
    assert len(losses[0]) == 2 and losses[1] == pytest.approx(losses[0], abs=1e-5)
    one, two = (load_checkpoint(str(run / "ckpt.pt"))["model"] for run in (whole, resumed))
    assert one.keys() == two.keys() and all(".lora_" in k for k in one)
    assert_same_weights(two, one, atol=1e-5)


def test_resuming_stops_with_one_line_when_out_dir_has_no_checkpoint_that_can_continue_the_run(tiny_checkpoint,
                                                                                                tmp_path):
    config, keys = {"init_from": "start.pt", "lora_rank": 0}, ("init_from", "lora_rank")

    def error(resume):
        with pytest.raises(SystemExit) as stopped:
            checkpoint_to_resume(resume, str(tmp_path), "sft", config, keys)
        assert "\n" not in str(stopped.value)
        return str(stopped.value)

    assert checkpoint_to_resume("auto", str(tmp_path), "sft", config, keys) == (None, None)  # nothing there: a new run
    assert error("yes").startswith(f"config error: resume='yes' but {tmp_path} has no checkpoint that loads")
    with pytest.raises(SystemExit, match="^config error: resume='True' is invalid; resume must be one of no, yes, auto$"):
        configure({"resume": "no"}, ["--resume=True"])  # the range table: before the script does anything
    os.link(f"{tiny_checkpoint}/ckpt-0000004.pt", tmp_path / "ckpt-0000004.pt")
    assert error("auto").startswith(f"checkpoint error: {tmp_path / 'ckpt-0000004.pt'} is of kind 'pretrain', "
                                    "not one of sft.py's")
    sft = {**load_checkpoint(f"{tiny_checkpoint}/ckpt.pt"), "kind": "sft", "config": config}
    save_checkpoint({**sft, "config": {**config, "lora_rank": 4}}, tmp_path / "ckpt-0000005.pt")
    assert "was trained with lora_rank=4, this run has lora_rank=0" in error("auto")
    save_checkpoint({k: v for k, v in sft.items() if k != "optimizer"}, tmp_path / "ckpt-0000006.pt")
    assert "holds no optimizer state" in error("yes")
    save_checkpoint(sft, tmp_path / "ckpt-0000007.pt")
    assert checkpoint_to_resume("yes", str(tmp_path), "sft", config, keys)[1] == str(tmp_path / "ckpt-0000007.pt")


def test_a_step_in_micro_batches_has_the_loss_and_gradients_of_one_big_batch(tiny_checkpoint, tmp_path):
    (tmp_path / "toy.json").write_text(json.dumps(TOY_INSTRUCTIONS))  # answers of 3 to 10 tokens: uneven batches
    # the same 4 examples in step 1: two micro-batches of 2 (batch_of's indices 0, 1), or one of 4 (index 0)
    args = [f"--init_from={tiny_checkpoint}/ckpt.pt", f"--data={tmp_path / 'toy.json'}", "--device=cpu",
            "--val_fraction=0", "--total_batch_size=4", "--max_iters=1", "--eval_interval=1", "--log_interval=1",
            "--packing=False", "--grad_clip=0", "--weight_decay=0"]
    for run, batch_size in (("micro", 2), ("big", 4)):
        run_script("sft.py", *args, f"--batch_size={batch_size}", f"--out_dir={tmp_path / run}")
    micro, big = (load_checkpoint(str(tmp_path / run / "ckpt.pt")) for run in ("micro", "big"))
    step_loss = lambda run: [r["loss"] for r in logged_after(tmp_path / run, 0) if "loss" in r]
    assert len(step_loss("big")) == 1 and step_loss("micro") == pytest.approx(step_loss("big"), rel=1e-6)
    # after one AdamW step exp_avg is (1 - beta1) x the gradient: the gradients are compared exactly
    for name, state in big["optimizer"]["state"].items():
        torch.testing.assert_close(micro["optimizer"]["state"][name]["exp_avg"], state["exp_avg"], rtol=1e-4,
                                   atol=1e-9, msg=name)
