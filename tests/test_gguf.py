"""gguf_file.py and export.py --format=gguf: GGUF files read back with the gguf package's own reader,
by transformers, and, where llama-cpp-python is installed, run by llama.cpp itself.

    python -m pytest tests/test_gguf.py -q

Tiny random models on the CPU. Everything skips without the gguf package. The llama.cpp tests skip
without llama-cpp-python, which compiles llama.cpp when installed (minutes), so it is not in CI; the
transformers ones skip without transformers, the GPT-2 tokenizer without tiktoken's files in ../shared.
"""

import json
import math
import os
from dataclasses import asdict

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed: pip install gguf")

from chat import CHAT_TOKENS, END, add_chat_tokens, prompt_ids  # noqa: E402
from checkpoint import save_checkpoint  # noqa: E402
from conftest import REPO, run_script  # noqa: E402
from forked import error_line, run_forked  # noqa: E402
from gguf_file import save_gguf  # noqa: E402
from hf import byte_to_unicode, save_folder, write_file  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from test_export import BYTE, STYLES, TIKTOKEN_CACHE, one_line_error, tiny_model, tree  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

TEXT = "Hello world!  It's 2024, déjà vu.\n\n\tdef f(x):\n        return x ** 2  # 日本語 🙂\n  \n"
LLAMA = dict(mlp="swiglu", qk_norm=False, logit_softcap=0.0)  # llama.cpp's llama, whatever GPTConfig's defaults
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?\nIn digits, please."},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]


def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it compiles llama.cpp, minutes: "
                                                   "pip install llama-cpp-python); not in CI")


def read(path):
    """A GGUF file's metadata {key: value} and tensors {name: (type name, float32 array)}."""
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type)) for t in reader.tensors}
    return fields, tensors


def exported(tmp_path, model, tokenizer=None, gguf_type="f16"):
    path = str(tmp_path / f"model-{gguf_type}.gguf")
    save_gguf(path, model, tokenizer or Tokenizer(BYTE), gguf_type)
    return path


def expected_tensor_names(config):
    """What llama.cpp's loader reads (src/models/llama.cpp and gpt2.cpp), written out by hand."""
    gpt2 = config.pos == "learned"
    if gpt2:
        names = {"token_embd.weight", "position_embd.weight", "output_norm.weight", "output_norm.bias"}
        layer = [n + p for n in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")
                 for p in (".weight", ".bias")]
    else:
        names = {"token_embd.weight", "output_norm.weight"}
        linear = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
        layer = ["attn_norm.weight", "ffn_norm.weight"] + [n + ".weight" for n in linear]
        layer += [n + ".bias" for n in linear] if config.bias else []
    if not config.tie_embeddings:
        names.add("output.weight")
    return names | {f"blk.{i}.{name}" for i in range(config.n_layer) for name in layer}


@pytest.mark.parametrize("style", STYLES)
def test_the_file_holds_llama_cpps_settings_tokenizer_and_tensor_names(tmp_path, style):
    model = tiny_model(style)
    config = model.config
    fields, tensors = read(exported(tmp_path, model))
    arch = "gpt2" if config.pos == "learned" else "llama"
    settings = {"general.architecture": arch, f"{arch}.context_length": 32, f"{arch}.embedding_length": 32,
                f"{arch}.block_count": 2, f"{arch}.feed_forward_length": config.ffn_hidden,
                f"{arch}.attention.head_count": 4, "general.file_type": gguf.LlamaFileType.MOSTLY_F16,
                "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.bos_token_id": 256,
                "tokenizer.ggml.eos_token_id": 256, "tokenizer.ggml.add_bos_token": False}
    if arch == "llama":
        settings |= {"llama.attention.head_count_kv": config.n_kv_head, "llama.rope.freq_base": 10000.0,
                     "llama.rope.dimension_count": 8, "llama.vocab_size": 257}
    assert {key: fields.get(key) for key in settings} == settings
    eps = fields["llama.attention.layer_norm_rms_epsilon" if arch == "llama" else "gpt2.attention.layer_norm_epsilon"]
    assert eps == pytest.approx(1e-5)
    assert len(fields["tokenizer.ggml.tokens"]) == 257 and fields["tokenizer.ggml.tokens"][256] == "<|endoftext|>"
    assert "tokenizer.chat_template" not in fields  # no chat tokens, no template
    assert set(tensors) == expected_tensor_names(config)
    kv = config.n_kv_head * 8
    shapes = {"token_embd.weight": (257, 32), "blk.1.ffn_down.weight": (32, config.ffn_hidden)}
    shapes |= {"position_embd.weight": (32, 32), "blk.0.attn_qkv.weight": (96, 32)} if arch == "gpt2" else {
        "blk.0.attn_q.weight": (32, 32), "blk.0.attn_k.weight": (kv, 32),
        "blk.0.ffn_gate.weight": (config.ffn_hidden, 32)}
    assert {name: tensors[name][1].shape for name in shapes} == shapes


def interleaved(rows, heads):
    """llama.cpp's row order for q or k: within each head, row i of the first half, then row i of the second."""
    size = rows.shape[0] // heads
    order = [h * size + half * size // 2 + i for h in range(heads) for i in range(size // 2) for half in (0, 1)]
    return rows[order]


def test_f16_holds_our_llama_weights_rounded_with_q_and_k_rows_interleaved_per_head(tmp_path):
    model = tiny_model("llama-gqa-tied-bias")
    _, tensors = read(exported(tmp_path, model))
    ours = {name: t.detach() for name, t in model.state_dict().items()}
    f16 = lambda t: t.half().float().numpy()
    q, k, v = ours["blocks.1.attn.c_attn.weight"].split([32, 16, 16])
    qb, kb, vb = ours["blocks.1.attn.c_attn.bias"].split([32, 16, 16])
    gate, up = ours["blocks.1.mlp.c_fc.weight"].chunk(2)
    expected = {"token_embd.weight": f16(ours["wte.weight"][:257]),
                "blk.1.attn_q.weight": f16(interleaved(q, 4)), "blk.1.attn_k.weight": f16(interleaved(k, 2)),
                "blk.1.attn_v.weight": f16(v), "blk.1.attn_output.weight": f16(ours["blocks.1.attn.c_proj.weight"]),
                "blk.1.ffn_gate.weight": f16(gate), "blk.1.ffn_up.weight": f16(up),
                "blk.1.ffn_down.weight": f16(ours["blocks.1.mlp.c_proj.weight"]),
                # vectors stay float32
                "blk.1.attn_q.bias": interleaved(qb, 4).numpy(), "blk.1.attn_k.bias": interleaved(kb, 2).numpy(),
                "blk.1.attn_v.bias": vb.numpy(), "blk.1.attn_norm.weight": ours["blocks.1.ln_1.weight"].numpy(),
                "output_norm.weight": ours["ln_f.weight"].numpy()}
    for name, value in expected.items():
        assert tensors[name][0] == ("F16" if name.endswith("weight") and value.ndim == 2 else "F32"), name
        assert np.array_equal(tensors[name][1], value), name


def test_f16_holds_our_gpt2_weights_in_nn_linear_layout_and_zero_biases(tmp_path):
    model = tiny_model("gpt2-untied-nobias")
    _, tensors = read(exported(tmp_path, model))
    ours = {name: t.detach() for name, t in model.state_dict().items()}
    f16 = lambda t: t.half().float().numpy()
    assert np.array_equal(tensors["blk.0.attn_qkv.weight"][1], f16(ours["blocks.0.attn.c_attn.weight"]))
    assert np.array_equal(tensors["blk.0.ffn_up.weight"][1], f16(ours["blocks.0.mlp.c_fc.weight"]))
    assert np.array_equal(tensors["output.weight"][1], f16(ours["lm_head.weight"][:257]))
    assert tensors["position_embd.weight"][0] == "F32"  # as llama.cpp's converter keeps it
    assert np.array_equal(tensors["position_embd.weight"][1], ours["wpe.weight"].numpy())
    assert not tensors["blk.0.attn_qkv.bias"][1].any()  # bias=False: GPT-2 needs biases, zero is the same function


def test_bf16_and_q8_0_hold_our_weights_within_their_rounding(tmp_path):
    # n_embd=48: rows of 48 weights are not whole 32-weight blocks, so q8_0 writes those as f16
    model = tiny_model("llama", n_embd=48)
    ours = model.state_dict()["blocks.0.mlp.c_proj.weight"].detach()  # rows of ffn_hidden=128 weights: q8_0
    _, bf16 = read(exported(tmp_path, model, gguf_type="bf16"))
    assert bf16["blk.0.ffn_down.weight"][0] == "BF16"
    assert np.array_equal(bf16["blk.0.ffn_down.weight"][1], ours.bfloat16().float().numpy())
    _, q8 = read(exported(tmp_path, model, gguf_type="q8_0"))
    assert q8["blk.0.ffn_down.weight"][0] == "Q8_0" and q8["blk.0.attn_q.weight"][0] == "F16"
    blocks = ours.reshape(-1, 32).numpy()
    error = np.abs(q8["blk.0.ffn_down.weight"][1].reshape(-1, 32) - blocks)
    # each block is int8 times one scale, max|block| / 127 (a float16): half a step off at most, plus the scale's
    # own rounding
    step = np.abs(blocks).max(axis=1, keepdims=True) / 127
    assert (error <= step * (0.5 + 127 * 2**-11)).all() and error.max() > 0


@pytest.mark.parametrize("style, overrides", [
    ("llama", {}),
    # transformers' GGUF reader drops Llama's biases and sizes GPT-2's position table from its own default of
    # 1024, not the file's context_length (transformers 5.x): llama.cpp runs those (tests below), so here none
    # and a context of 1024
    ("llama-gqa-tied-bias", dict(bias=False)),
    ("gpt2-tied-bias", dict(block_size=1024)),
    ("gpt2-untied-nobias", dict(block_size=1024)),
])
def test_transformers_reads_the_file_and_computes_our_logits(tmp_path, style, overrides):
    transformers = pytest.importorskip("transformers")
    model = tiny_model(style, **overrides)
    path = exported(tmp_path, model, gguf_type="f32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=os.path.basename(path)).eval()
    idx = torch.randint(0, 257, (2, 32))
    with torch.no_grad():  # transformers undoes the q and k permutation as llama.cpp's converter defines it
        assert (theirs(idx).logits - model(idx, all_logits=True)[0][..., :257]).abs().max().item() < 1e-4


# llama.cpp's 'gpt-2' pre-tokenizer (src/llama-vocab.cpp); the text between two matches is a piece too
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"""


def bpe_as_llama_cpp_does(text, tokens, merges):
    """Ids of text under a GGUF 'gpt2' tokenizer's tokens and merges, by BPE written out plainly:
    split into pieces, each piece's bytes as byte_to_unicode's characters, then merge the adjacent pair
    of lowest rank until none is a merge."""
    import regex

    rank = {tuple(merge.split(" ", 1)): r for r, merge in enumerate(merges)}
    ids = {token: i for i, token in enumerate(tokens)}
    to_char = byte_to_unicode()
    pieces, end = [], 0
    for match in regex.finditer(GPT2_SPLIT, text):
        pieces += [text[end : match.start()], match.group()]
        end = match.end()
    out = []
    for piece in [p for p in pieces + [text[end:]] if p]:
        symbols = [to_char[b] for b in piece.encode("utf-8")]
        while len(symbols) > 1:
            best, i = min((rank.get(pair, math.inf), i) for i, pair in enumerate(zip(symbols, symbols[1:])))
            if best == math.inf:
                break
            symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
        out += [ids[symbol] for symbol in symbols]
    return out


@pytest.fixture(scope="module")
def tokenizers():
    """One tokenizer of each kind; the char and bpe ones learned from this repository's text and TEXT."""
    texts = [open(os.path.join(REPO, name), encoding="utf-8").read() for name in ("model.py", "hf.py")] + [TEXT]
    kinds = {"byte": Tokenizer(BYTE), "char": Tokenizer.train("char", texts), "bpe": Tokenizer.train("bpe", texts, 400)}
    if os.path.isdir(TIKTOKEN_CACHE):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("TIKTOKEN_CACHE_DIR", os.path.abspath(TIKTOKEN_CACHE))
            kinds["gpt2"] = Tokenizer({"kind": "gpt2", "eot": "<|endoftext|>"})
    return kinds, texts


def tokenizer_of_kind(tokenizers, kind):
    if kind not in tokenizers[0]:
        pytest.skip("tiktoken's gpt2 files are not in ../shared/data/tiktoken_cache, and tests do not download them")
    return tokenizers[0][kind], tokenizers[1]


def model_for(tokenizer):
    return GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32, **LLAMA))


# gpt2's file goes through the same code as bpe's (its tokens are tested against OpenAI's files in
# test_export.py), and reading its 100,000 strings back takes the gguf package and transformers a minute on
# a busy CPU: llama.cpp's test below, which reads it in a second, has it
@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_the_files_tokenizer_encodes_and_decodes_as_ours(tmp_path, tokenizers, kind):
    tokenizer, texts = tokenizer_of_kind(tokenizers, kind)
    fields, _ = read(exported(tmp_path, model_for(tokenizer), tokenizer))
    tokens, merges = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.merges"]
    assert len(tokens) == tokenizer.vocab_size and fields["tokenizer.ggml.eos_token_id"] == tokenizer.eot_id
    from_char = {c: b for b, c in byte_to_unicode().items()}
    for text in [TEXT, texts[0][:3000]]:
        ids = tokenizer.encode(text)
        assert bpe_as_llama_cpp_does(text, tokens, merges) == ids
        assert bytes(from_char[c] for i in ids for c in tokens[i]).decode("utf-8") == text
    if kind == "bpe":  # transformers reads the file alike (not byte's or char's: it wants merges made of tokens)
        transformers = pytest.importorskip("transformers")
        theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="model-f16.gguf")
        assert theirs.encode(TEXT, add_special_tokens=False) == tokenizer.encode(TEXT)


def chat_model(tokenizer):
    return add_chat_tokens(model_for(tokenizer), tokenizer)


def render(template, messages):
    """The template rendered as transformers and llama-cpp-python render chat templates (a sandboxed Jinja)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    return environment.from_string(template).render(messages=messages, add_generation_prompt=True)


def ids_with_specials(tokenizer, text):
    """text's ids with the special tokens' names read as those tokens, as llama.cpp and Ollama read a chat prompt."""
    import re

    names = sorted(tokenizer.special_tokens, key=len, reverse=True)
    parts = re.split("(" + "|".join(map(re.escape, names)) + ")", text)
    return [i for part in parts if part for i in
            ([tokenizer.special_tokens[part]] if part in tokenizer.special_tokens else tokenizer.encode(part))]


def test_the_chat_template_in_the_file_and_the_folder_renders_chat_pys_prompt(tmp_path, tokenizers):
    model, tokenizer = chat_model(tokenizers[0]["bpe"])
    fields, _ = read(exported(tmp_path, model, tokenizer))
    assert fields["tokenizer.ggml.eot_token_id"] == tokenizer.special_tokens[END]
    types = fields["tokenizer.ggml.token_type"]
    assert [types[tokenizer.special_tokens[name]] for name in CHAT_TOKENS] == [gguf.TokenType.CONTROL] * 4
    template = fields["tokenizer.chat_template"]
    assert ids_with_specials(tokenizer, render(template, MESSAGES)) == prompt_ids(tokenizer, MESSAGES)
    with pytest.raises(ValueError, match="role"):
        render(template, [{"role": "tool", "content": "{}"}])
    # the Hugging Face folder carries the same template, and transformers applies it
    transformers = pytest.importorskip("transformers")
    save_folder(str(tmp_path / "hf"), model, tokenizer)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert theirs.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False) \
        == prompt_ids(tokenizer, MESSAGES)


# -----------------------------------------------------------------------------
# export.py


def test_export_script_writes_a_gguf_file_named_after_the_run_and_replaces_it(tiny_checkpoint, tmp_path):
    result = run_forked("export.py", f"--out_dir={tiny_checkpoint}", "--format=gguf")
    path = os.path.join(tiny_checkpoint, os.path.basename(tiny_checkpoint) + "-f16.gguf")
    assert result.returncode == 0 and result.stderr == "", result.stderr  # no progress bar when piped
    assert f"-> {path}: llama.cpp's llama" in result.stdout
    assert f"llama-completion -m {path} -c 32 -no-cnv" in result.stdout
    assert read(path)[0]["general.architecture"] == "llama"
    target = tmp_path / "new" / "model.gguf"  # folders are made; an earlier GGUF file is replaced
    for gguf_type in ("f16", "q8_0"):
        result = run_forked("export.py", f"--out_dir={tiny_checkpoint}", "--format=gguf", f"--gguf_type={gguf_type}",
                            f"--file={target}")
        assert result.returncode == 0, result.stderr
        assert read(str(target))[0]["general.file_type"] == gguf.LlamaFileType[f"MOSTLY_{gguf_type.upper()}"]
    assert os.listdir(tmp_path / "new") == ["model.gguf"]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """A good checkpoint, checkpoints of the default fast block llama.cpp cannot run, a folder, a file where a
    folder belongs, and a file of the user's that is not GGUF."""
    root = tmp_path_factory.mktemp("bad_inputs")
    options = {"good": {}, "relu2": dict(mlp="relu2"), "softcap": dict(logit_softcap=15.0), "qk": dict(qk_norm=True)}
    for name, option in options.items():
        model = GPT(GPTConfig(vocab_size=257, block_size=32, n_layer=1, n_head=2, n_embd=32, **{**LLAMA, **option}))
        save_checkpoint({"kind": "pretrain", "model_config": asdict(model.config), "model": model.state_dict(),
                         "tokenizer": BYTE}, str(root / name / "ckpt.pt"))
    (root / "folder").mkdir()
    (root / "taken").write_bytes(b"a file of the user's, not a folder\n")
    (root / "notes.gguf").write_text("the user's notes, not a GGUF file")
    return root


@pytest.mark.parametrize("args, message", [
    (["--file={root}/folder"], "export error: {root}/folder is a folder; give --file a file name"),
    (["--file={root}/taken/model.gguf"], "export error: {root}/taken is a file, not a folder; choose another --file"),
    (["--file={root}/notes.gguf"], "export error: {root}/notes.gguf exists and is not a GGUF file"),
    (["--out_dir={root}/relu2"], "export error: mlp='relu2' has no equivalent"),
    (["--out_dir={root}/softcap"], "export error: logit_softcap=15.0 has no equivalent"),
    (["--out_dir={root}/qk"], "export error: qk_norm=True has no equivalent"),
    (["--gguf_type=q4_0"], "config error: gguf_type='q4_0' is not one of f32, f16, bf16, q8_0"),
    (["--format=onnx"], "config error: format='onnx' is not one of hf, gguf"),
])
def test_bad_input_is_one_line_and_leaves_every_file_as_it_was(bad_inputs, args, message):
    root = str(bad_inputs)
    before = tree(root)
    result = run_forked("export.py", f"--out_dir={root}/good", "--format=gguf",
                        *(a.format(root=root) for a in args))
    line = error_line(result)
    assert line.startswith(message.format(root=root)), line
    if "no equivalent" in message:  # the refusal names what to train instead
        assert "--mlp=swiglu --qk_norm=False --logit_softcap=0" in line
    assert tree(root) == before


def test_a_folder_that_cannot_be_written_or_a_failed_write_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF an earlier export")

    def disk_full(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a file")
        raise OSError(28, "No space left on device")

    with pytest.raises(SystemExit) as excinfo:
        write_file(str(path), disk_full)
    assert one_line_error(excinfo) == f"export error: writing {path} failed (No space left on device); free some " \
                                      "space or choose another folder"
    assert os.listdir(tmp_path) == ["model.gguf"] and path.read_bytes() == b"GGUF an earlier export"

    def read_only(*args, **kwargs):  # what a read-only folder gives (root ignores a folder's permissions)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.mkstemp", read_only)
    with pytest.raises(SystemExit) as excinfo:
        save_gguf(str(path), tiny_model("llama"), Tokenizer(BYTE))
    assert one_line_error(excinfo).startswith(f"export error: cannot write into {tmp_path} (Permission denied)")
    assert path.read_bytes() == b"GGUF an earlier export"


# -----------------------------------------------------------------------------
# llama.cpp itself


@pytest.mark.parametrize("style", ["llama-gqa-tied-bias", "gpt2-untied-nobias"])
def test_llama_cpp_greedy_tokens_and_logits_equal_ours(tmp_path, style):
    llama_cpp()
    model = tiny_model(style, block_size=128)
    # Matrices at std 1/sqrt(n_embd), where a layer keeps the size of its input as a trained model's do: at
    # tiny_model's 0.3, activations grow layer by layer and float16's rounding with them (2e-2 in the logits).
    with torch.no_grad():
        for weight in (p for p in model.parameters() if p.dim() == 2):
            weight.normal_(0.0, 32**-0.5)
    save_checkpoint({"kind": "pretrain", "model_config": asdict(model.config), "model": model.state_dict(),
                     "tokenizer": BYTE}, str(tmp_path / "ckpt.pt"))
    # f32 with a float32 KV cache: nothing rounded, so the mapping must be exact (but for GPT-2's GELU, which
    # llama.cpp reads from a float16 table); f16 as llama.cpp runs it by default, keys and values in float16 too
    bounds = {("f32", "f32"): 1e-4 if style.startswith("llama") else 1e-2, ("f16", "f16"): 1e-2}
    for gguf_type, kv_cache in bounds:
        out = tmp_path / f"{gguf_type}.json"
        run_script("bench/gguf_parity.py", f"--out_dir={tmp_path}", f"--types={gguf_type}", f"--kv_cache={kv_cache}",
                   "--prompt=def main():", "--new_tokens=64", f"--out={out}")
        row = json.loads(out.read_text())[0]
        difference = row["max_logit_diff_rounded"]  # against ours with the weights as the file holds them
        assert difference < bounds[gguf_type, kv_cache], row
        # the same 64 tokens, or a first difference where our two best logits were a tie within that difference
        assert row["same_tokens_rounded"] == 64 or row["gap_at_difference_rounded"] <= 2 * difference, row


@pytest.mark.parametrize("kind", ["byte", "char", "bpe", "gpt2"])
def test_llama_cpp_tokenizes_and_detokenizes_as_ours(tmp_path, tokenizers, kind):
    Llama = llama_cpp().Llama
    tokenizer, texts = tokenizer_of_kind(tokenizers, kind)
    llm = Llama(model_path=exported(tmp_path, model_for(tokenizer), tokenizer), vocab_only=True, verbose=False)
    for text in [TEXT, texts[0][:3000]]:
        ids = tokenizer.encode(text)
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == ids
        assert llm.detokenize(ids) == text.encode("utf-8")


def test_llama_cpp_reads_the_chat_prompt_as_ours_and_ends_a_turn_at_end(tmp_path, tokenizers):
    llama_cpp_module = llama_cpp()
    model, tokenizer = chat_model(tokenizers[0]["byte"])
    llm = llama_cpp_module.Llama(model_path=exported(tmp_path, model, tokenizer), vocab_only=True, verbose=False)
    text = render(llm.metadata["tokenizer.chat_template"], MESSAGES)
    assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == prompt_ids(tokenizer, MESSAGES)
    vocab = llama_cpp_module.llama_model_get_vocab(llm.model)
    assert [llama_cpp_module.llama_vocab_is_eog(vocab, i) for i in sorted(tokenizer.special_tokens.values())] \
        == [True, False, False, False, True]  # <|endoftext|>, <|system|>, <|user|>, <|assistant|>, <|end|>
