"""
The decoder-only Transformer that every stage script shares.

    from model import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=50257, n_layer=12, n_head=12, n_embd=768))
    logits, loss = model(idx, targets)
    out = model.generate(idx, max_new_tokens=100, temperature=0.8, top_k=200)

One class covers several families, chosen by config fields:
- GPTConfig's defaults are train.py's (its fast recipe): RMSNorm, ReLU² MLP, rotary position embeddings (RoPE),
  QK-norm, logits soft-capped at 15, output projections starting at zero, no biases, untied embeddings;
- Llama's style (mlp='swiglu', qk_norm=False, logit_softcap=0): what hf.py imports and exports, with optional
  grouped-query attention;
- GPT-2's (norm='layernorm', mlp='gelu', pos='learned', tie_embeddings=True, bias=True, and the three above off):
  GPT-2 124M exactly, for comparison and weight import (config/train_gpt2.py).

Design notes, the why behind the choices:
- Pre-norm residual blocks (x + f(norm(x))) keep the residual stream an identity path, so deep stacks train
  without warmup tricks.
- RoPE rotates q and k by an angle proportional to the position, so the q·k score depends only on the distance
  between two tokens. Grouped-query attention (n_kv_head < n_head) shrinks the KV cache by n_head / n_kv_head at
  little cost in quality.
- SwiGLU (Shazeer 2020) beats GELU at equal parameters (hidden width 8/3 of n_embd, so its three matrices hold as
  many weights as GELU's two at 4x); ReLU² (So et al. 2021) is as good at less compute. QK-norm keeps attention
  logits bounded at high learning rates, and the soft cap keeps a few output logits from running away early.
- Residual output projections start at zero (each block starts as the identity, and the gradient still reaches
  them through their input: modded-nanogpt's speedrun), or at std 0.02/sqrt(2*n_layer) (GPT-2), so the residual
  stream's variance does not grow with depth.
- The embedding and output layer are padded to a multiple of 64 rows, which runs faster on GPUs; the padded ids
  are not tokens, and the logits leave them out.
- Attention goes through F.scaled_dot_product_attention, which dispatches to flash or memory-efficient kernels
  where the hardware has them; rows packed from several examples go through FlexAttention on GPUs, whose kernel
  skips the masked-out blocks instead of reading a dense T x T mask.
- Generation (decoding.py) runs a step of one token per sequence against a preallocated KV cache, each row at its
  own position, with a few static shapes; on a CPU its linear layers multiply through oneDNN on packed copies of
  the weights (linear_parts, packed_linear.py).
"""

import functools
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

import decoding
import packed_linear


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024  # the longest context the model sees
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 0  # 0: same as n_head (multi-head attention); 1: multi-query
    n_embd: int = 768
    ffn_hidden: int = 0  # 0: 4*n_embd for gelu and relu2, 8/3*n_embd rounded up to 64 for swiglu
    norm: str = "rmsnorm"  # 'rmsnorm' | 'layernorm'
    mlp: str = "relu2"  # 'relu2' | 'swiglu' | 'gelu'
    pos: str = "rope"  # 'rope' | 'learned' | 'sinusoidal'
    rope_theta: float = 10000.0
    qk_norm: bool = True  # normalise q and k per head before attention
    tie_embeddings: bool = False  # share the input embedding with the output layer
    bias: bool = False  # biases in linear layers and LayerNorm
    dropout: float = 0.0
    norm_eps: float = 1e-5
    zero_init_proj: bool = True  # residual output projections (attention's and the MLP's) start at zero
    logit_softcap: float = 15.0  # >0: logits = cap * tanh(logits / cap); 0: off

    def __post_init__(self):
        for field in fields(self):  # a checkpoint's config is untrusted input: a string or a bool where a number goes
            value, kind = getattr(self, field.name), field.type
            if isinstance(value, bool) != (kind is bool) or not isinstance(value, (int, float) if kind is float else kind):
                raise ValueError(f"{field.name}={value!r} is not of type {kind.__name__}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.n_kv_head < 0 or self.ffn_hidden < 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"need n_kv_head >= 0, ffn_hidden >= 0 and 0 <= dropout < 1, got {self.n_kv_head}, "
                             f"{self.ffn_hidden} and {self.dropout}")
        self.n_kv_head = self.n_kv_head or self.n_head
        if not self.ffn_hidden:
            self.ffn_hidden = 64 * math.ceil(8 * self.n_embd / 3 / 64) if self.mlp == "swiglu" else 4 * self.n_embd
        for name, allowed in {"norm": ("rmsnorm", "layernorm"), "mlp": ("swiglu", "gelu", "relu2"),
                              "pos": ("rope", "learned", "sinusoidal")}.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"RoPE needs an even head size, got n_embd/n_head={self.n_embd // self.n_head}")
        if self.pos == "sinusoidal" and self.n_embd % 2:
            raise ValueError(f"sinusoidal positions need an even n_embd, got {self.n_embd}")
        if self.logit_softcap < 0:
            raise ValueError(f"logit_softcap={self.logit_softcap} must be 0 (off) or positive")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self):
        return 64 * math.ceil(self.vocab_size / 64)

    @classmethod
    def from_dict(cls, d):
        """Build from a dict such as a checkpoint's model config, ignoring keys this version does not know.
        A checkpoint written before a field existed lacks it: the field takes its value of then (off)."""
        if not isinstance(d, dict):
            raise ValueError(f"a model config is a dict of GPTConfig's fields, not a {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        return cls(**{"logit_softcap": 0.0, "zero_init_proj": False, **{k: v for k, v in d.items() if k in names}})


def cross_entropy(logits, targets):
    """The mean next-token loss over positions whose target is not -1, computed in float32."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


def make_norm(config, dim):
    if config.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


def rope_tables(config, length, device=None):
    """cos and sin of the rotation angle position * theta^(-2i/d), shape (length, head_dim/2)."""
    half = config.head_dim // 2
    inv_freq = config.rope_theta ** (-torch.arange(half, dtype=torch.float32, device=device) / half)
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


def sinusoidal_table(length, dim):
    """The original Transformer's fixed position vectors (length, dim): sin and cos of position *
    10000^(-2i/dim), sines in the first half of the channels and cosines in the second."""
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return torch.cat((angles.sin(), angles.cos()), dim=-1)


def linear_parts(layer, x, sizes):
    """layer(x) split along its last dimension into parts of the given sizes (q, k, v; SwiGLU's gate
    and up). Training takes one product, one large matmul being faster than several small ones. Without
    gradients (decoding, evaluation) each part is its own product on a block of the weight's rows (views):
    the same numbers, contiguous parts, and at a few rows faster on a CPU (MKL: 12 products of 8 x 768 x
    2,304 took 6% longer than the same as three of 768, 8 x 768 x 4,096 5% longer than two of 2,048);
    while decoding on a CPU, through oneDNN on packed copies of those blocks (packed_linear.py).
    The backward of several views of one weight would add their gradients through copies; a LoRA layer
    is no plain nn.Linear, and a GPU's products were not measured so: both take the one product too."""
    if torch.is_grad_enabled() or type(layer) is not nn.Linear or x.device.type != "cpu":
        return layer(x).split(sizes, dim=-1)
    biases = [None] * len(sizes) if layer.bias is None else layer.bias.split(sizes)
    packed = packed_linear.parts(layer.weight, sizes, x)
    if packed is not None:
        return [packed_linear.multiply(x, weight, bias) for weight, bias in zip(packed, biases)]
    return [F.linear(x, weight, bias) for weight, bias in zip(layer.weight.split(sizes), biases)]


def linear(layer, x):
    """layer(x); while decoding on a CPU, through oneDNN on a packed copy of its weight (linear_parts)."""
    if torch.is_grad_enabled() or type(layer) is not nn.Linear:  # training: no split on its hot path
        return layer(x)
    return linear_parts(layer, x, [layer.out_features])[0]


def apply_rope(x, cos, sin):
    """Rotate pairs (first half, second half) of each head's channels; x is (B, heads, T, head_dim)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


# Masks are functions of (batch, head, query index, key index), FlexAttention's mask_mod
# signature, written with tensor ops so that the same function also gives SDPA's dense boolean
# mask when called on broadcasting index tensors (see dense_mask). One definition, two kernels.

def document_mask(doc_ids):
    """For rows packed from several examples (doc_ids (B, T): a run of equal ids is one example), each token's
    position within its example (B, T) and the mask that lets it see only the earlier tokens of its own example.
    With both, a packed row computes exactly what its examples would one by one."""
    t = torch.arange(doc_ids.size(1), device=doc_ids.device)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    positions = t - torch.where(starts, t, 0).cummax(dim=1).values  # distance from the run's start
    run = starts.cumsum(dim=1)

    def same_example(b, h, q, kv):
        return (run[b, q] == run[b, kv]) & (kv <= q)

    return positions, same_example


def dense_mask(mask_mod, batch, query, keys):
    """mask_mod as SDPA's boolean attn_mask (batch, 1, len(query), keys): True where query may see key."""
    b = torch.arange(batch, device=query.device)[:, None, None, None]
    return mask_mod(b, None, query[:, None], torch.arange(keys, device=query.device))


@functools.cache
def compiled_flex_attention():
    # FlexAttention is only fast compiled: eager, it computes the full score matrix.
    return torch.compile(flex_attention, dynamic=False)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        # q, k and v come from one matrix: in training one large matmul beats three small ones (see linear_parts).
        self.c_attn = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * config.head_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_projection = True
        self.q_norm = make_norm(config, config.head_dim) if config.qk_norm else None
        self.k_norm = make_norm(config, config.head_dim) if config.qk_norm else None
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope, cache=None, pos=None, mask=None):
        B, T, _ = x.shape
        kv_width = self.n_kv_head * self.head_dim
        q, k, v = linear_parts(self.c_attn, x, [self.n_head * self.head_dim, kv_width, kv_width])
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            if pos is None:  # a forward from position 0 hands its keys and values to the caller
                cache["k"], cache["v"] = k, v
            else:  # a decoding step, as GPT.forward's docstring describes
                rows = torch.arange(B, device=x.device)
                cache["k"][rows, :, pos] = k[:, :, 0]
                cache["v"][rows, :, pos] = v[:, :, 0]
                k, v = cache["k"][:, :, : mask.size(-1)], cache["v"][:, :, : mask.size(-1)]
        if isinstance(mask, BlockMask):
            y = compiled_flex_attention()(q, k, v, block_mask=mask, enable_gqa=self.n_kv_head != self.n_head)
        else:  # no mask is SDPA's own causal one, which its flash kernel takes
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                               dropout_p=self.dropout if self.training else 0.0,
                                               enable_gqa=self.n_kv_head != self.n_head)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(linear(self.c_proj, y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.kind, self.hidden = config.mlp, config.ffn_hidden
        # For SwiGLU, c_fc holds the gate and the up projection side by side.
        self.c_fc = nn.Linear(config.n_embd, (2 if self.kind == "swiglu" else 1) * config.ffn_hidden, bias=config.bias)
        self.c_proj = nn.Linear(config.ffn_hidden, config.n_embd, bias=config.bias)
        self.c_proj.residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        if self.kind == "swiglu":
            gate, up = linear_parts(self.c_fc, x, [self.hidden, self.hidden])
            h = F.silu(gate) * up
        elif self.kind == "relu2":
            # ReLU squared (So et al. 2021, Primer): sparse, cheap, and as good as SwiGLU
            h = F.relu(linear(self.c_fc, x)).square()
        else:
            h = F.gelu(linear(self.c_fc, x), approximate="tanh")  # GPT-2's GELU
        return self.dropout(linear(self.c_proj, h))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = Attention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, rope, cache=None, pos=None, mask=None):
        x = x + self.attn(self.ln_1(x), rope, cache, pos, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        V = config.padded_vocab_size
        self.wte = nn.Embedding(V, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos == "learned" else None
        if config.pos == "sinusoidal":  # not saved in checkpoints: a function of the config
            self.register_buffer("sinusoidal_pos", sinusoidal_table(config.block_size, config.n_embd), persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = make_norm(config, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, V, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if config.pos == "rope":  # not saved either: a function of the config
            cos, sin = rope_tables(config, config.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.activation_checkpointing = False  # set by the trainer to trade compute for memory
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            residual = getattr(module, "residual_projection", False)
            nn.init.normal_(module.weight, std=0.02 / math.sqrt(2 * self.config.n_layer) if residual else 0.02)
            if residual and self.config.zero_init_proj:  # after normal_: the other weights draw the same numbers
                nn.init.zeros_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def num_params(self, non_embedding=False):
        """Parameters the model really uses (not the vocabulary's padding rows); non_embedding also leaves
        out the lookup tables (token and learned position embeddings), the N of 6*N."""
        c = self.config
        pad_rows = c.padded_vocab_size - c.vocab_size
        n = sum(p.numel() for p in self.parameters()) - pad_rows * c.n_embd * (1 if c.tie_embeddings else 2)
        if non_embedding:
            if not c.tie_embeddings:
                n -= c.vocab_size * c.n_embd
            if self.wpe is not None:
                n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token: 6N for the matmuls (forward 2N, backward 4N) plus attention's q·k and
        attention·v, 12 * n_layer * n_embd * seq_len (PaLM, appendix B; the causal halving not counted)."""
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.n_embd * (seq_len or c.block_size)

    def forward(self, idx, targets=None, all_logits=False, cache=None, pos=None, keys=None, doc_ids=None):
        """idx (B, T) token ids. With targets (B, T): all logits and the mean cross-entropy, ignoring targets of -1;
        without: the last position's logits, or every position's if all_logits. Logits cover the real vocab_size ids
        only. doc_ids (B, T), for rows packed from several examples: the example of each position (see document_mask).
        cache is for decoding (decoding.py): a list of one dict per layer. A forward from position 0 (pos None) leaves
        each layer's keys and values in its dict as "k" and "v" (B, n_kv_head, T, head_dim). A decoding step passes one
        token per row, pos (B,) the position of each, and dicts holding key and value buffers (B, n_kv_head, S,
        head_dim), S up to block_size: a row's key and value are written at its position, and it attends over the
        buffers' first `keys` slots (block_size if None), those after its position masked. pos is a tensor and keys
        one of a few lengths, so that the steps have few shapes and a compiled graph serves many of them."""
        B, T = idx.shape[:2]
        decoding = pos is not None
        if decoding and not (torch.is_tensor(pos) and cache is not None and T == 1):
            raise ValueError("a decoding step is one token per row with a cache and pos, a tensor of each row's "
                             f"position; got {T} tokens and pos={pos!r}")
        if T > self.config.block_size:
            raise ValueError(f"a forward of {T} tokens: at most block_size={self.config.block_size}")
        positions, mask = slice(0, T), None  # a slice: views of the tables, no index tensor per call
        if decoding:
            positions = pos[:, None]
            # (B, 1, 1, keys): a row sees the slots up to its position. Those after it may hold the keys of
            # an earlier, longer sequence, or zeros; either way they must not count.
            mask = (torch.arange(keys or self.config.block_size, device=idx.device) <= positions)[:, None, None, :]
        elif doc_ids is not None:
            positions, mask_mod = document_mask(doc_ids)
            # FlexAttention on CUDA (it has no dropout; on a CPU torch 2.11-2.14 has no flex backward), else
            # SDPA with a dense (B, 1, T, T) mask, which only its math kernel takes (T^2 memory per head)
            if idx.is_cuda and not (self.training and self.config.dropout):
                mask = create_block_mask(mask_mod, B, None, T, T, device=idx.device)
            else:
                mask = dense_mask(mask_mod, B, torch.arange(T, device=idx.device), T)
        rope = (self.rope_cos[positions], self.rope_sin[positions]) if self.config.pos == "rope" else None
        if rope is not None and not isinstance(positions, slice):  # per row: (B, 1, T, head_dim/2), for every head
            rope = (rope[0][:, None], rope[1][:, None])
        if self.wte is None:
            x = idx  # a later pipeline stage (see pipeline.split_for_pipeline): the hidden states of the one before
        else:
            x = self.wte(idx)
            if self.wpe is not None:
                x = x + self.wpe.weight[positions]
            elif self.config.pos == "sinusoidal":
                x = x + self.sinusoidal_pos[positions].to(x.dtype)
            x = self.drop(x)
        for i, block in enumerate(self.blocks):
            if block is None:  # a layer another pipeline stage holds
                continue
            if self.activation_checkpointing and self.training:  # keep its input, recompute the rest in backward
                x = torch.utils.checkpoint.checkpoint(block, x, rope, None, None, mask, use_reentrant=False)
            else:
                x = block(x, rope, None if cache is None else cache[i], pos, mask)
        if self.lm_head is None:
            return x, None  # an earlier pipeline stage hands its hidden states on
        x = self.ln_f(x)
        # A view of the first vocab_size columns: no softmax (the loss, DPO, evaluation, sampling) may give the padding
        # ids probability. It costs no copy under bf16 autocast (cross_entropy's float() copies anyway); in float32,
        # log_softmax makes one contiguous copy of it (torch 2.13), the price of the padded width's faster matmul.
        x = x if targets is not None or all_logits else x[:, -1:, :]
        logits = linear(self.lm_head, x)[..., : self.config.vocab_size]
        logits = self.soft_cap(logits)
        return logits, None if targets is None else cross_entropy(logits, targets)

    def soft_cap(self, logits):
        """With logit_softcap: cap * tanh(logits / cap), the logits bounded smoothly (Gemma 2; modded-nanogpt)."""
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    # Generation lives in decoding.py; model.generate(...) as in nanoGPT.
    generate, generate_stream = decoding.generate, decoding.generate_stream


# -----------------------------------------------------------------------------
# The encoder-decoder (Vaswani et al. 2017) for translation, built from GPT's own parts


@dataclass
class EncoderDecoderConfig(GPTConfig):
    """GPTConfig's fields shape both stacks; n_layer counts the decoder's blocks. block_size bounds the
    source and the target each (a target's start token included)."""

    n_encoder_layer: int = 6

    def __post_init__(self):
        super().__post_init__()
        if self.n_encoder_layer < 1:
            raise ValueError(f"n_encoder_layer={self.n_encoder_layer} must be at least 1")


class CrossAttention(Attention):
    """The decoder's attention to the source: queries from the target, keys and values from the encoder's
    output, through Attention's own c_attn rows; no positions. When decoding, the source's keys and
    values are computed at the first step and kept in the layer's cache."""

    def projection(self, part):
        """c_attn's weight and bias rows of the queries ('q') or of the keys and values ('kv')."""
        rows = slice(0, self.n_head * self.head_dim) if part == "q" else slice(self.n_head * self.head_dim, None)
        return self.c_attn.weight[rows], None if self.c_attn.bias is None else self.c_attn.bias[rows]

    def forward(self, x, memory, source_mask, cache=None):
        """x (B, T, n_embd) attends to memory (B, S, n_embd), the encoder's output, where source_mask
        (B, 1, 1, S) is true."""
        B, T, _ = x.shape
        if cache is not None and "source_k" in cache:
            k, v = cache["source_k"], cache["source_v"]
        else:
            kv = F.linear(memory, *self.projection("kv")).view(B, memory.size(1), 2, self.n_kv_head, self.head_dim)
            k, v = kv.permute(2, 0, 3, 1, 4)  # each (B, kv heads, S, head_dim)
            if self.k_norm is not None:
                k = self.k_norm(k)
            if cache is not None:
                cache["source_k"], cache["source_v"] = k, v
        q = F.linear(x, *self.projection("q")).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q = self.q_norm(q)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=source_mask,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.n_kv_head != self.n_head)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.c_proj(y))


class DecoderBlock(Block):
    """A block that also reads the source: self-attention, then cross-attention, then the MLP."""

    def __init__(self, config):
        super().__init__(config)
        self.ln_cross = make_norm(config, config.n_embd)
        self.cross_attn = CrossAttention(config)

    def forward(self, x, rope, cache=None, pos=None, mask=None, source=None):
        """source: (the encoder's output, the mask of its real tokens)."""
        x = x + self.attn(self.ln_1(x), rope, cache, pos, mask)
        x = x + self.cross_attn(self.ln_cross(x), *source, cache)
        return x + self.mlp(self.ln_2(x))


class EncoderDecoder(GPT):
    """The original Transformer: forward(src, tgt) encodes the source, decodes the target with it,
    and maps the decoder's output to next-token logits:

        memory = encoder(src)            # bidirectional self-attention, the padding masked
        hidden = decoder(tgt, memory)    # causal self-attention + cross-attention to memory
        logits = lm_head(hidden)

    GPT's parts serve as they are: one embedding for both sides (a joint vocabulary; with
    tie_embeddings the output layer too, as Vaswani et al. section 3.4), its blocks, final norm and
    output layer; the encoder's blocks take a padding mask instead of the causal one. Sources are
    right-padded: row b's tokens are its first src_lengths[b]."""

    def __init__(self, config):
        super().__init__(config)
        self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.n_layer))  # in place of GPT's
        self.encoder = nn.ModuleList(Block(config) for _ in range(config.n_encoder_layer))
        self.ln_source = make_norm(config, config.n_embd)
        self.apply(self._init_weights)

    def embed(self, idx, positions):
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe.weight[positions]
        elif self.config.pos == "sinusoidal":
            # The sinusoids' entries are of size 1, the embedding's of 0.02: scaled by sqrt(n_embd) as in
            # Vaswani et al. (section 3.4), the tokens are not drowned by their positions.
            x = x * math.sqrt(self.config.n_embd) + self.sinusoidal_pos[positions].to(x.dtype)
        return self.drop(x)

    def rope_at(self, positions):
        return (self.rope_cos[positions], self.rope_sin[positions]) if self.config.pos == "rope" else None

    def check_length(self, length, side):
        if length > self.config.block_size:
            raise ValueError(f"a {side} of {length} tokens is longer than block_size={self.config.block_size}")

    def encode(self, src, src_lengths=None):
        """The encoder's output (B, S, n_embd) for src (B, S), and the mask of its real tokens (B, 1, 1, S)
        that attention to it takes; src_lengths (B,) None: every token is real."""
        B, S = src.shape
        self.check_length(S, "source")
        lengths = torch.full((B,), S, device=src.device) if src_lengths is None else src_lengths
        source_mask = (torch.arange(S, device=src.device) < lengths[:, None])[:, None, None, :]
        x, rope = self.embed(src, slice(0, S)), self.rope_at(slice(0, S))
        for block in self.encoder:
            x = block(x, rope, mask=source_mask)  # a mask, so not the causal one: every token sees the whole source
        return self.ln_source(x), source_mask

    def decode(self, tgt, memory, source_mask, cache=None, pos=None, all_logits=True):
        """Next-token logits after each position of tgt (B, T) (all_logits=False: the last one's), given the
        encoder's output memory and its source_mask. cache and pos (B,) decode one token at a time, as in
        GPT.forward."""
        B, T = tgt.shape
        self.check_length(T, "target")
        if pos is not None:  # a decoding step: one token per row, row b at position pos[b] of the cache
            positions = pos[:, None]
            mask = (torch.arange(int(pos.max()) + 1, device=tgt.device) <= positions)[:, None, None, :]
        else:
            positions, mask = slice(0, T), None  # None: attention's own causal mask
        x, rope = self.embed(tgt, positions), self.rope_at(positions)
        if rope is not None and pos is not None:  # positions per row: broadcast over the heads
            rope = (rope[0][:, None], rope[1][:, None])
        for i, block in enumerate(self.blocks):
            x = block(x, rope, None if cache is None else cache[i], pos, mask, (memory, source_mask))
        x = self.ln_f(x)
        return self.soft_cap(self.lm_head(x if all_logits else x[:, -1:])[..., : self.config.vocab_size])

    def forward(self, src, tgt, targets=None, src_lengths=None):
        """Logits (B, T, vocab_size) of the token after each position of tgt (B, T), which starts with the
        start token; with targets (B, T), also the mean cross-entropy over those that are not -1."""
        memory, source_mask = self.encode(src, src_lengths)
        logits = self.decode(tgt, memory, source_mask)
        return logits, None if targets is None else cross_entropy(logits, targets)

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per target token, a source of the same length counted with it: 6N plus attention's
        (self-attention in both stacks, cross-attention in the decoder), as GPT.flops_per_token counts them."""
        c = self.config
        T = seq_len or c.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * (c.n_encoder_layer + 2 * c.n_layer) * c.n_embd * T

    def stepper(self, src, src_lengths=None, copies=1, use_cache=True):
        """A function step(tokens, order=None) for greedy_decode and beam_search: the next-token logits
        (rows, vocab_size) after tokens (rows, t), where each source row stands for `copies` rows (beam
        search's beams). The source is encoded once, here; with the cache, the keys and values of each
        decoder block's cross-attention are computed at the first step, and a step runs only the newest
        token. order (rows,), given when the rows changed places, says which row of the previous step
        each continues."""
        memory, source_mask = self.encode(src, src_lengths)
        memory, source_mask = memory.repeat_interleave(copies, 0), source_mask.repeat_interleave(copies, 0)
        cache = [{} for _ in self.blocks] if use_cache else None

        def step(tokens, order=None):
            if cache is None or tokens.size(1) == 1:  # without a cache, or the first step: the whole target
                return self.decode(tokens, memory, source_mask, cache, all_logits=False)[:, -1]
            for layer in cache:
                if layer["k"].size(2) < self.config.block_size:  # after the first step: buffers for every position
                    for name in ("k", "v"):
                        first = layer[name]
                        layer[name] = first.new_zeros(*first.shape[:2], self.config.block_size, first.size(3))
                        layer[name][:, :, : first.size(2)] = first
                if order is not None:  # the self-attention's keys and values follow their rows (a source's don't move)
                    layer["k"], layer["v"] = layer["k"][order], layer["v"][order]
            pos = torch.full((tokens.size(0),), tokens.size(1) - 1, device=tokens.device)
            return self.decode(tokens[:, -1:], memory, source_mask, cache, pos, all_logits=False)[:, -1]

        return step

    @torch.no_grad()
    def translate(self, src, src_lengths, start, end, max_new_tokens, beam_size=1, length_penalty=1.0,
                  use_cache=True):
        """The translation of each source row as token ids, end left out: greedy with beam_size 1, else beam
        search, from the token start to end, or after max_new_tokens tokens (one number, or one per row)."""
        step = self.stepper(src, src_lengths, beam_size, use_cache)
        first = torch.full((src.size(0), 1), start, dtype=torch.long, device=src.device)
        limits = torch.as_tensor(max_new_tokens).expand(src.size(0)).clamp(max=self.config.block_size - 1).tolist()
        return search(step, first, end, limits, beam_size, length_penalty)  # the target holds the start token too


def search(step, first, end, max_new_tokens, beam_size=1, length_penalty=1.0):
    """greedy_decode with beam_size 1, else beam_search. max_new_tokens: one number, or one per row of first."""
    limits = torch.as_tensor(max_new_tokens).expand(first.size(0)).tolist()
    if beam_size == 1:
        return greedy_decode(step, first, end, limits)
    return beam_search(step, first, end, limits, beam_size, length_penalty)


def greedy_decode(step, first, end, limits):
    """Continue each row of first (B, t) with its likeliest next token (step: EncoderDecoder.stepper's) until
    end or its limit of new tokens; each row's new tokens, end left out, independent of the other rows."""
    tokens = first
    done = torch.tensor([limit == 0 for limit in limits], device=first.device)
    reached = {t: torch.tensor([limit == t for limit in limits], device=first.device) for t in set(limits)}
    for t in range(1, max(limits) + 1):
        next_token = step(tokens).argmax(dim=-1).masked_fill(done, end)  # a finished row repeats end
        tokens = torch.cat((tokens, next_token[:, None]), dim=1)
        done |= (next_token == end) | reached.get(t, False)
        if bool(done.all()):
            break
    new = tokens[:, first.size(1):].tolist()
    return [until_end(row[:limit], end) for row, limit in zip(new, limits)]


def beam_search(step, first, end, limits, beam_size, length_penalty=1.0):
    """Each row of first (B, t)'s best continuation of up to its limit of new tokens (end left out) by beam
    search, batched over the rows; step gives beam_size rows per row of first. As fairseq's: of the 2k best
    extensions of the k beams, those among the first k that end are finished, scored by log-probability
    over length**length_penalty; the k best that do not end are the next beams. A row is done with k
    finished hypotheses, or at its limit, where its live beams finish as they are."""
    B, k, device = first.size(0), beam_size, first.device
    tokens = first.repeat_interleave(k, 0)
    scores = torch.full((B, k), -math.inf, device=device)
    scores[:, 0] = 0.0  # the beams start equal: only one of them may expand, or every hypothesis would come k times
    best_score, best = [-math.inf] * B, [[] for _ in range(B)]
    finished = [0 if limit else k for limit in limits]  # k: the row is done
    order, rank = None, torch.arange(2 * k, device=device)

    def consider(b, beam, score, t):
        if score > best_score[b]:
            best_score[b], best[b] = score, tokens[b * k + beam, first.size(1) : first.size(1) + t].tolist()

    for t in range(1, max(limits) + 1):
        logprobs = step(tokens, order).float().log_softmax(dim=-1)
        V = logprobs.size(-1)
        top_scores, top = (scores.reshape(-1, 1) + logprobs).view(B, k * V).topk(2 * k, dim=1)
        beam, token = top // V, top % V
        # At most k extensions end (one per beam), so k of the 2k never do: the next beams.
        open_rows = torch.tensor([n < k for n in finished], device=device)[:, None]
        ends = (token == end) & (rank < k) & (top_scores > -math.inf) & open_rows
        for b, col in ends.nonzero().tolist():
            finished[b] += 1
            consider(b, beam[b, col].item(), top_scores[b, col].item() / t**length_penalty, t - 1)
        keep = (token == end).int().argsort(dim=1, stable=True)[:, :k]
        beam, token, scores = beam.gather(1, keep), token.gather(1, keep), top_scores.gather(1, keep)
        order = (torch.arange(B, device=device)[:, None] * k + beam).view(-1)
        tokens = torch.cat((tokens[order], token.view(-1, 1)), dim=1)
        for b in (b for b in range(B) if limits[b] == t and finished[b] < k):  # its live beams finish as they are
            for j, score in enumerate((scores[b] / t**length_penalty).tolist()):
                consider(b, j, score, t)
            finished[b] = k
        if min(finished) >= k:
            break
    return best


def until_end(ids, end):
    return ids[: ids.index(end)] if end in ids else ids
