"""export.py and hf.py: Hugging Face folders out and back in, checked against transformers itself.

    python -m pytest tests/test_export.py -q

Tiny random models on the CPU. The tests that run transformers skip when it is not installed;
the GPT-2 tokenizer tests skip without tiktoken's files in ../shared/data/tiktoken_cache.
"""

import json
import os
from dataclasses import asdict, replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never reach for the network

import pytest
import torch

from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from conftest import GPT2, LLAMA, REPO, TINY_MODEL, run_script, tiny_gpt
from forked import error_line, run_forked
from hf import TOKENIZER_SIDECAR, architecture_of, read_folder, save_folder
from lora import LoRALinear, add_lora, describe_base, lora_state
from model import GPT, GPTConfig
from tokenizer import Tokenizer

TIKTOKEN_CACHE = os.path.join(REPO, os.pardir, "shared", "data", "tiktoken_cache")
GPT2_FILES = os.path.join(REPO, os.pardir, "shared", "data", "gpt2_tokenizer")
BYTE = {"kind": "byte", "eot": "<|endoftext|>"}
STYLES = {  # the two architectures, with and without tied embeddings, biases and grouped-query attention
    "llama": LLAMA,
    "llama-gqa-tied-bias": dict(LLAMA, n_kv_head=2, tie_embeddings=True, bias=True),
    "gpt2-tied-bias": GPT2,
    "gpt2-untied-nobias": dict(GPT2, tie_embeddings=False, bias=False),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread (here and in the scripts run), and far faster when other
    processes keep the cores busy."""
    threads, variable = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if variable is None:
        del os.environ["OMP_NUM_THREADS"]
    else:
        os.environ["OMP_NUM_THREADS"] = variable


def tiny_model(style, vocab_size=257, seed=0, **overrides):
    """A random model in eval mode (conftest.tiny_gpt), every tensor random."""
    return tiny_gpt(seed, 0.3, **{"vocab_size": vocab_size, "block_size": 32, "n_head": 4, **STYLES[style], **overrides})


def real_logits(model, idx):
    with torch.no_grad():
        return model(idx, all_logits=True)[0][..., : model.config.vocab_size]


def exported(tmp_path, style):
    model = tiny_model(style)
    save_folder(str(tmp_path / "hf"), model, Tokenizer(BYTE))
    return model, str(tmp_path / "hf")


def transformers_model(folder):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def one_line_error(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("style", STYLES)
def test_export_then_import_gives_identical_logits(tmp_path, style):
    model, folder = exported(tmp_path, style)
    imported, tokenizer = model_from_checkpoint(load_checkpoint("hf:" + folder))
    # GPT-2 always has biases: a bias=False model comes back with bias=True and zero biases
    assert imported.config == replace(model.config, bias=model.config.bias or model.config.pos == "learned")
    idx = torch.randint(0, 257, (2, 32))
    assert torch.equal(real_logits(imported.eval(), idx), real_logits(model, idx))
    assert tokenizer.description == BYTE


@pytest.mark.parametrize("style", STYLES)
def test_transformers_computes_the_same_logits_and_greedy_tokens(tmp_path, style):
    model, folder = exported(tmp_path, style)
    theirs = transformers_model(folder)
    expected = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[architecture_of(model.config)]
    assert type(theirs).__name__ == expected
    idx = torch.randint(0, 257, (2, 32))
    with torch.no_grad():
        difference = (theirs(idx).logits - real_logits(model, idx)).abs().max().item()
    assert difference < 1e-4
    prompt = idx[:, :8]
    ours = model.generate(prompt, 20, temperature=0, stop_tokens=[256])
    with torch.no_grad():
        generated = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False)
    assert generated.tolist() == ours.tolist()


def test_a_folder_transformers_wrote_in_shards_imports_with_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    # Llama with biases in attention only: model.py has them everywhere, the MLP's become zeros
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
                                      attention_bias=True, rope_theta=500.0)
    theirs = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0.0, 0.2)
    theirs.save_pretrained(tmp_path, max_shard_size="100KB")
    (tmp_path / TOKENIZER_SIDECAR).write_text(json.dumps(BYTE))  # a folder without one needs GPT-2's files
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours, _ = model_from_checkpoint(load_checkpoint(f"hf:{tmp_path}"))
    assert (ours.config.n_kv_head, ours.config.bias, ours.config.rope_theta) == (1, True, 500.0)
    idx = torch.randint(0, 300, (2, 64))
    with torch.no_grad():
        assert (theirs(idx).logits - real_logits(ours.eval(), idx)).abs().max().item() < 1e-4


def test_padding_rows_come_back_as_the_mean_of_the_real_rows(tmp_path):
    _, folder = exported(tmp_path, "llama")
    weights = read_folder(folder)["model"]
    for name in ("wte.weight", "lm_head.weight"):
        assert weights[name].shape[0] == 320
        assert torch.allclose(weights[name][257:], weights[name][:257].mean(dim=0).expand(63, -1))


@pytest.mark.parametrize("option, style", [
    ("qk_norm", dict(qk_norm=True)),
    ("norm", dict(norm="layernorm")),  # RoPE with LayerNorm
    ("mlp", dict(mlp="gelu")),  # RoPE with GELU
    ("norm", dict(pos="learned", mlp="gelu")),  # learned positions with RMSNorm
    ("mlp", dict(GPT2, mlp="swiglu")),
    ("n_kv_head", dict(GPT2, n_kv_head=2)),
])
def test_options_hugging_face_cannot_express_are_one_line_errors_naming_the_option(option, style):
    config = GPTConfig(vocab_size=257, block_size=32, n_layer=1, n_head=4, n_embd=32, **{**LLAMA, **style})
    with pytest.raises(SystemExit) as excinfo:
        architecture_of(config)
    assert one_line_error(excinfo).startswith(f"export error: {option}=")


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """What the table's rows point export.py at: a good checkpoint, one Hugging Face cannot express, a
    file where a folder belongs, a folder of someone else's files, and a file that is no checkpoint."""
    root = tmp_path_factory.mktemp("bad_inputs")
    for name, model in (("good", tiny_model("llama")),
                        ("qk", GPT(GPTConfig(vocab_size=257, block_size=32, n_layer=1, n_head=2, n_embd=32,
                                             qk_norm=True)))):
        save_checkpoint({"kind": "pretrain", "model_config": asdict(model.config), "model": model.state_dict(),
                         "tokenizer": BYTE}, str(root / name / "ckpt.pt"))
    (root / "taken").write_bytes(b"a file of the user's, not a folder\n")
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("mine")
    (root / "text.pt").write_text("hello")
    return root


def tree(root):
    return {os.path.join(folder, name): open(os.path.join(folder, name), "rb").read()
            for folder, _, names in os.walk(root) for name in names}


@pytest.mark.parametrize("args, message", [
    (["--folder={root}/taken"], "export error: {root}/taken is a file, not a folder"),
    (["--folder={root}/taken/hf"], "export error: {root}/taken is a file, not a folder"),
    (["--folder={root}/mine"], "export error: {root}/mine holds files export.py does not write (notes.txt)"),
    (["--out_dir={root}/qk"], "export error: qk_norm=True"),
    (["--dtype=int8"], "config error: dtype='int8' is not one of float32, bfloat16, float16"),
    (["--out_dir={root}/none"], "checkpoint error: no checkpoint at {root}/none/ckpt.pt"),
    (["--ckpt={root}/text.pt"], "checkpoint error: {root}/text.pt is corrupt or not a checkpoint"),
    (["--ckpt=hf:{root}/mine"], "import error: no {root}/mine/config.json"),
    (["--folderr={root}/hf"], "config error: unknown key 'folderr' on the command line; did you mean --folder"),
])
def test_bad_input_is_one_line_and_leaves_every_file_as_it_was(bad_inputs, args, message):
    root = str(bad_inputs)
    before = tree(root)
    result = run_forked("export.py", f"--out_dir={root}/good", *(a.format(root=root) for a in args))
    line = error_line(result)
    assert line.startswith(message.format(root=root)), line
    assert tree(root) == before  # nothing written, nothing changed, byte for byte


def test_a_lora_checkpoint_is_exported_with_its_adapters_merged(tmp_path):
    model = tiny_model("llama")
    base = {"kind": "pretrain", "model_config": asdict(model.config), "model": model.state_dict(), "tokenizer": BYTE,
            "step": 1}
    save_checkpoint(base, str(tmp_path / "base.pt"))
    settings = dict(rank=2, alpha=4.0, dropout=0.0, targets=["c_attn", "c_proj", "c_fc"])
    add_lora(model, **settings)
    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            torch.nn.init.normal_(layer.lora_B, std=0.1)  # trained adapters: not the zero they start at
    save_checkpoint({"kind": "sft", "model_config": asdict(model.config), "model": lora_state(model.state_dict()),
                     "tokenizer": BYTE, "lora": settings, "base": describe_base(str(tmp_path / "base.pt"), base)},
                    str(tmp_path / "adapter" / "ckpt.pt"))
    assert run_script("export.py", f"--out_dir={tmp_path / 'adapter'}").stderr == ""  # no progress bar when piped
    exported_model, _ = model_from_checkpoint(load_checkpoint(f"hf:{tmp_path / 'adapter' / 'hf'}"))
    idx = torch.randint(0, 257, (2, 32))
    assert not any(isinstance(m, LoRALinear) for m in exported_model.modules())
    # merging rounds W + (alpha / rank) B A to float32: about 1e-5 on these logits of size ~7
    assert (real_logits(exported_model.eval(), idx) - real_logits(model, idx)).abs().max() < 1e-4


def test_a_folder_that_cannot_be_written_is_one_line_and_nothing_is_left(tmp_path, read_only_folder):
    save_checkpoint({"kind": "pretrain", "model_config": asdict(tiny_model("llama").config),
                     "model": tiny_model("llama").state_dict(), "tokenizer": BYTE}, str(tmp_path / "ckpt.pt"))
    for folder in (read_only_folder, read_only_folder / "hf"):  # an existing folder, and a new one inside it
        line = error_line(run_forked("export.py", f"--ckpt={tmp_path / 'ckpt.pt'}", f"--folder={folder}"))
        assert line.startswith(f"export error: cannot write into {folder} (") and "choose a folder you can write to" in line, line
    assert os.listdir(read_only_folder) == []


def test_export_refuses_a_folder_with_files_it_did_not_write(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as excinfo:
        exported(tmp_path, "llama")
    assert "notes.txt" in one_line_error(excinfo) and (tmp_path / "hf" / "notes.txt").exists()


def test_folders_that_cannot_be_read_are_one_line_errors(tmp_path):
    _, folder = exported(tmp_path, "llama")
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    cases = [
        (dict(hf_config, architectures=["MistralForCausalLM"]), None, "architecture is MistralForCausalLM"),
        (dict(hf_config, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5}), None, "rope_type='llama3'"),
        (dict(hf_config, hidden_act="gelu"), None, "hidden_act='gelu'"),
        (dict(hf_config, num_hidden_layers=3), None, "no tensor model.layers.2."),
        (hf_config, "no sidecar", f"has no {TOKENIZER_SIDECAR} and its tokenizer is not GPT-2's"),
    ]
    for config, change, expected in cases:
        (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
        if change == "no sidecar":
            os.remove(os.path.join(folder, TOKENIZER_SIDECAR))
        with pytest.raises(SystemExit) as excinfo:
            read_folder(folder)
        assert expected in one_line_error(excinfo)
    with pytest.raises(SystemExit) as excinfo:
        load_checkpoint(f"hf:{tmp_path / 'none'}")
    assert one_line_error(excinfo).startswith("import error: no ")


@pytest.fixture
def gpt2_tokenizer(monkeypatch):
    if not os.path.isdir(TIKTOKEN_CACHE):
        pytest.skip("tiktoken's gpt2 files are not in ../shared/data/tiktoken_cache, and tests do not download them")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", os.path.abspath(TIKTOKEN_CACHE))
    return Tokenizer({"kind": "gpt2", "eot": "<|endoftext|>"})


def test_the_gpt2_tokenizer_exports_as_gpt2s_own_files_and_is_recognised_without_the_sidecar(tmp_path, gpt2_tokenizer):
    model = tiny_model("gpt2-tied-bias", vocab_size=50257)
    folder = tmp_path / "hf"
    save_folder(str(folder), model, gpt2_tokenizer)
    if os.path.isdir(GPT2_FILES):  # rebuilt from tiktoken's ranks, they equal OpenAI's encoder.json and vocab.bpe
        assert (folder / "merges.txt").read_text("utf-8") == open(os.path.join(GPT2_FILES, "vocab.bpe"), encoding="utf-8").read()
        with open(os.path.join(GPT2_FILES, "encoder.json")) as f:
            assert json.loads((folder / "vocab.json").read_text("utf-8")) == json.load(f)
    os.remove(folder / TOKENIZER_SIDECAR)
    checkpoint = read_folder(str(folder))
    assert checkpoint["tokenizer"] == {"kind": "gpt2", "eot": "<|endoftext|>"}
    text = "Hello world!  It's 2024, déjà vu.\n\n\tdef f(x):\n        return x ** 2  # 日本語\n"
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert theirs.encode(text) == gpt2_tokenizer.encode(text) and theirs.eos_token_id == 50256
    assert theirs.decode(gpt2_tokenizer.encode(text)) == text


def test_a_trained_bpe_exports_as_a_tokenizer_transformers_encodes_the_same(tmp_path):
    transformers = pytest.importorskip("transformers")
    texts = [open(os.path.join(REPO, name), encoding="utf-8").read() for name in ("model.py", "train.py")]
    tokenizer = Tokenizer.train("bpe", texts, vocab_size=500)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32, **LLAMA))
    save_folder(str(tmp_path), model, tokenizer)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    for text in texts + [readme, "héllo  wörld\n\n\t x 日本"]:
        # ordinary text: transformers turns the literal text <|endoftext|> into the special id, ours does not
        text = text.replace("<|endoftext|>", "")
        assert theirs.encode(text) == tokenizer.encode(text)
    assert theirs.eos_token_id == tokenizer.eot_id


def test_export_script_then_train_fine_tunes_the_folder_and_sample_reads_it(tiny_checkpoint, tiny_data_root, tmp_path):
    folder = tmp_path / "hf"
    result = run_script("export.py", f"--out_dir={tiny_checkpoint}", f"--folder={folder}")
    assert "LlamaForCausalLM" in result.stdout and "ids 0-255 are the bytes" in result.stdout
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors", TOKENIZER_SIDECAR]
    out_dir = tmp_path / "ft"
    result = run_script("train.py", *TINY_MODEL, f"--data_root={tiny_data_root}", "--dataset=tiny", f"--out_dir={out_dir}",
                        f"--init_from=hf:{folder}", "--max_iters=3", "--eval_interval=3", "--n_layer=1")
    assert f"starting a new run from the weights of hf:{folder}" in result.stdout
    with open(out_dir / "metrics.jsonl") as f:
        first_eval = json.loads(f.readline())
    with open(os.path.join(tiny_checkpoint, "metrics.jsonl")) as f:
        original = [json.loads(line) for line in f if "val_loss" in line][-1]
    # The same weights on the same evaluation batches; only the vocabulary's padding rows differ, and
    # model.py's loss takes its softmax over them too (hf.py's docstring says why the mean row).
    assert first_eval["step"] == 0 and abs(first_eval["val_loss"] - original["val_loss"]) < 0.01
    trained = load_checkpoint(str(out_dir / "ckpt.pt"))
    assert trained["step"] == 3 and trained["model_config"]["n_layer"] == 2  # the folder's architecture, not --n_layer
    # sampling from the folder and from the checkpoint it came from: the same text
    args = ["--device=cpu", "--num_samples=1", "--max_new_tokens=30", "--temperature=1.0"]
    assert (run_script("sample.py", f"--ckpt=hf:{folder}", *args).stdout
            == run_script("sample.py", f"--out_dir={tiny_checkpoint}", *args).stdout)


def test_train_refuses_a_folder_whose_tokenizer_or_context_does_not_fit_the_data(tiny_data_root, tmp_path):
    model = tiny_model("llama")
    save_folder(str(tmp_path / "char"), model, Tokenizer({"kind": "char", "chars": list("abc"), "eot": "<|endoftext|>"}))
    save_folder(str(tmp_path / "byte"), model, Tokenizer(BYTE))
    for folder, args, expected in [("char", [], "tokenizer (char) is not the one"),
                                   ("byte", ["--block_size=64"], "block_size=64 is longer than")]:
        result = run_script("train.py", *TINY_MODEL, f"--data_root={tiny_data_root}", "--dataset=tiny",
                            f"--out_dir={tmp_path / 'out'}", f"--init_from=hf:{tmp_path / folder}", *args, check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1 and expected in lines[0], result.stderr
