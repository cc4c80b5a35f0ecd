"""
The GGUF format: model.py's weights and tokenizer as one file that llama.cpp and Ollama run.

    python export.py --out_dir=out/llama --format=gguf        # writes out/llama/llama-f16.gguf (see export.py)
    llama-cli -m out/llama/llama-f16.gguf -c 1024 -no-cnv -p "Once upon a time"

A GGUF file (llama.cpp's format, written with the gguf package of llama.cpp's authors) holds an
architecture's settings as key-value metadata, the tokenizer (each token's text and type, the
BPE merges, the special ids, a chat template) and the tensors, each in its own type. The
architectures are hf.py's two: model.py's 'gpt2' style is llama.cpp's 'gpt2', the modern style
its 'llama'; what neither expresses (ReLU², QK-norm, logit soft-cap, sinusoidal positions, a
mixed style) is refused by hf.architecture_of with the option named.

The tensors start from hf.py's Hugging Face ones (so names, splits, the dropped padding rows and
GPT-2's zero biases are decided in one place) and get what llama.cpp's converter
(convert_hf_to_gguf.py) does to those:
- names: the gguf package's own table from Hugging Face names to GGUF ones (blk.N.attn_q, ...);
- Llama's q and k rows, permuted within each head: llama.cpp's 'llama' rotates interleaved
  channel pairs (0, 1), (2, 3), ... where model.py (and Hugging Face) rotate (i, i + head_dim/2);
  putting row i of a head's second half right after row i of its first half gives the same
  rotation, and q and k permuted alike give the same q·k;
- GPT-2's Conv1D weights, transposed back to nn.Linear's (out, in), the layout GGUF's gpt2 takes;
- vectors (norm gains, biases) and GPT-2's position table stay float32 as llama.cpp wants; the
  matrices take the type asked: f32, f16, bf16 or q8_0 (blocks of 32 weights as int8 with one
  float16 scale, 8.5 bits a weight; a row whose length is not a multiple of 32 stays f16).
The tokenizer is hf.byte_level_bpe's, llama.cpp's 'gpt2' (byte-level BPE) kind with GPT-2's
pre-tokenizer, exact for the gpt2, bpe and byte kinds; with a char tokenizer, a character outside
the vocabulary is dropped where tokenizer.py would stop with an error. Nothing is prepended to a
prompt (add_bos_token false, as sample.py). A checkpoint with chat.py's tokens also carries the
chat template and <|end|> as end-of-turn, so llama.cpp and Ollama stop an answer where sample.py does.
"""

import os
from pathlib import Path

from chat import END, chat_template, has_chat_tokens
from hf import architecture_of, byte_level_bpe, to_hf, weight_names, write_file
from optional import optional
from tokenizer import GPT2_PATTERN

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # the tensor types written, by llama.cpp's names


def interleave_rope_pairs(weight, heads):
    """q or k rows (or biases) from (first half, second half) order within each head to interleaved
    pairs: row i of a head's second half moves next to row i of its first half."""
    pairs = weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])  # (head, half, row)
    return pairs.transpose(1, 2).reshape(weight.shape)


def gguf_tensors(model, gguf):
    """(GGUF name, float32 tensor) for every tensor llama.cpp reads."""
    config = model.config
    architecture = architecture_of(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[architecture.upper()], config.n_layer)
    conv1d = {theirs[0] for _, theirs, transposed in weight_names(config) if transposed}
    for name, tensor in to_hf(model.state_dict(), config).items():
        if name in conv1d:
            tensor = tensor.t()
        if architecture == "llama" and (".q_proj." in name or ".k_proj." in name):
            tensor = interleave_rope_pairs(tensor, config.n_head if ".q_proj." in name else config.n_kv_head)
        yield names.get_name(name, try_suffixes=(".weight", ".bias")), tensor.float().contiguous()


def add_tokenizer(writer, tokenizer, vocab_size, gguf):
    if tokenizer.description.get("pat_str", GPT2_PATTERN) != GPT2_PATTERN:
        raise SystemExit("export error: this bpe tokenizer splits text with its own pattern, which llama.cpp's "
                         "tokenizer cannot; prepare the data with --tokenizer=bpe of this version, or gpt2 or byte")
    vocab, merges = byte_level_bpe(tokenizer)
    special_ids = set(tokenizer.special_tokens.values())
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # ids the model has and the tokenizer never gives
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i], types[i] = text, gguf.TokenType.CONTROL if i in special_ids else gguf.TokenType.NORMAL
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # llama.cpp needs the merges key and the gguf package writes no empty list: for a byte tokenizer,
    # which has no merges, one that never applies (special tokens are never inside BPE's pieces).
    eot = tokens[tokenizer.eot_id]
    writer.add_token_merges([f"{a} {b}" for a, b in merges] or [f"{eot} {eot}"])
    writer.add_bos_token_id(tokenizer.eot_id)  # else llama.cpp takes id 11; documents follow end-of-text
    writer.add_eos_token_id(tokenizer.eot_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if has_chat_tokens(tokenizer):
        writer.add_eot_token_id(tokenizer.special_tokens[END])
        writer.add_chat_template(chat_template(tokenizer))


def save_gguf(path, model, tokenizer, gguf_type="f16"):
    """Write model (a GPT) and tokenizer as one GGUF file at path, its matrices in gguf_type
    (one of GGUF_TYPES); return the architecture's name in llama.cpp."""
    gguf = optional("gguf", "export.py --format=gguf")
    config = model.config
    architecture = architecture_of(config)  # refuses what llama.cpp cannot run, before anything is written
    writer = gguf.GGUFWriter(None, architecture)
    writer.add_name(os.path.splitext(os.path.basename(path))[0])
    writer.add_file_type(gguf.LlamaFileType["ALL_F32" if gguf_type == "f32" else "MOSTLY_" + gguf_type.upper()])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.ffn_hidden)
    writer.add_head_count(config.n_head)
    if architecture == "llama":
        writer.add_head_count_kv(config.n_kv_head)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_vocab_size(config.vocab_size)
    else:
        writer.add_layer_norm_eps(config.norm_eps)
    add_tokenizer(writer, tokenizer, config.vocab_size, gguf)
    wanted = gguf.GGMLQuantizationType[gguf_type.upper()]
    position_table = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.POS_EMBD] + ".weight"
    for name, tensor in gguf_tensors(model, gguf):
        qtype = gguf.GGMLQuantizationType.F32 if tensor.dim() == 1 or name == position_table else wanted
        try:
            data = gguf.quants.quantize(tensor.numpy(), qtype)
        except gguf.QuantError:  # q8_0 of a row whose length is not a multiple of its 32-weight blocks
            qtype = gguf.GGMLQuantizationType.F16
            data = gguf.quants.quantize(tensor.numpy(), qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)

    def write(tmp):
        writer.write_header_to_file(Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write_file(path, write)
    return architecture
