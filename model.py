"""
The decoder-only Transformer that every stage script shares.

    from model import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=50257, n_layer=12, n_head=12, n_embd=768))
    logits, loss = model(idx, targets)
    out = model.generate(idx, max_new_tokens=100, temperature=0.8, top_k=200)

One class covers two families, chosen by config fields:
- the 'gpt2' preset: GPT-2 124M exactly (learned positions, LayerNorm with bias,
  GELU MLP, tied input/output embeddings), for comparison and weight import;
- the default modern style (Llama-like): RMSNorm, SwiGLU MLP, rotary position
  embeddings (RoPE), no biases, optional grouped-query attention and QK-norm.

Design notes, the why behind the choices:
- Pre-norm residual blocks (x + f(norm(x))) keep the residual stream an identity
  path, so deep stacks train without warmup tricks.
- RoPE rotates q and k by an angle proportional to the position, so the q·k
  score depends only on the distance between two tokens; nothing is learned and
  nothing limits the position count but the context used in training.
- Grouped-query attention (n_kv_head < n_head) lets several query heads share
  one key/value head; the KV cache shrinks by n_head / n_kv_head at little cost
  in quality.
- SwiGLU (Shazeer 2020) beats GELU at equal parameters; its hidden width is
  8/3 of n_embd (rounded up to a multiple of 64) so the three matrices hold as
  many weights as GELU's two at 4x.
- Residual output projections start with std 0.02/sqrt(2*n_layer) (GPT-2 paper),
  so the residual stream's variance does not grow with depth at init.
- The embedding table and output layer are padded to a multiple of 64 rows:
  matrix shapes with large power-of-two factors run faster on GPUs. The padded
  ids are not tokens: the logits, and so every softmax over them, leave them out.
- Attention goes through F.scaled_dot_product_attention, which dispatches to
  flash or memory-efficient kernels where the hardware has them; rows packed
  from several examples go through FlexAttention on GPUs, whose kernel skips
  the masked-out blocks instead of reading a dense T x T mask.
- Generation (decoding.py) runs a step of one token per sequence against a
  preallocated KV cache, each row at its own position, with a few static shapes.
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
    mlp: str = "swiglu"  # 'swiglu' | 'gelu' | 'relu2'
    pos: str = "rope"  # 'rope' | 'learned' | 'sinusoidal'
    rope_theta: float = 10000.0
    qk_norm: bool = False  # normalise q and k per head before attention
    tie_embeddings: bool = False  # share the input embedding with the output layer
    bias: bool = False  # biases in linear layers and LayerNorm
    dropout: float = 0.0
    norm_eps: float = 1e-5
    zero_init_proj: bool = False  # residual output projections (attention's and the MLP's) start at zero
    logit_softcap: float = 0.0  # >0: logits = cap * tanh(logits / cap); 0: off

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
        if not self.n_kv_head:
            self.n_kv_head = self.n_head
        if not self.ffn_hidden:
            self.ffn_hidden = 64 * math.ceil(8 * self.n_embd / 3 / 64) if self.mlp == "swiglu" else 4 * self.n_embd
        choices = {"norm": ("rmsnorm", "layernorm"), "mlp": ("swiglu", "gelu", "relu2"),
                   "pos": ("rope", "learned", "sinusoidal")}
        for name, allowed in choices.items():
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
        """Build from a dict such as a checkpoint's model config, ignoring keys this version does not know."""
        if not isinstance(d, dict):
            raise ValueError(f"a model config is a dict of GPTConfig's fields, not a {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# Architectures by name; fields not given take GPTConfig's (modern) defaults.
PRESETS = {
    "gpt2": dict(
        vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768,
        norm="layernorm", mlp="gelu", pos="learned", tie_embeddings=True, bias=True,
    ),
    "modern": dict(),
}


def cross_entropy(logits, targets):
    """The mean next-token loss over positions whose target is not -1, computed in float32."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def make_norm(config, dim):
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
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


def apply_rope(x, cos, sin):
    """Rotate pairs (first half, second half) of each head's channels; x is (B, heads, T, head_dim)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.type_as(x)


# Masks are functions of (batch, head, query index, key index), FlexAttention's mask_mod
# signature, written with tensor ops so that the same function also gives SDPA's dense boolean
# mask when called on broadcasting index tensors (see dense_mask). One definition, two kernels.

def document_mask(doc_ids):
    """For rows packed from several examples (doc_ids (B, T): a run of equal ids is one example),
    each token's position within its example (B, T) and the mask that lets it see only the
    earlier tokens of its own example. With both, a packed row computes exactly what its
    examples would one by one."""
    T = doc_ids.size(1)
    t = torch.arange(T, device=doc_ids.device)
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
        self.block_size = config.block_size
        # q, k and v come from one matrix: one large matmul is faster than three small ones.
        self.c_attn = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * config.head_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_projection = True
        self.q_norm = make_norm(config, config.head_dim) if config.qk_norm else None
        self.k_norm = make_norm(config, config.head_dim) if config.qk_norm else None
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope, cache=None, pos=None, mask=None):
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1
        )
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
            else:
                # A decoding step (see GPT.forward): each row's key and value go to the buffers at
                # its position; it attends over the buffers' first mask.size(-1) slots.
                rows = torch.arange(B, device=x.device)
                cache["k"][rows, :, pos] = k[:, :, 0]
                cache["v"][rows, :, pos] = v[:, :, 0]
                k, v = cache["k"][:, :, : mask.size(-1)], cache["v"][:, :, : mask.size(-1)]
        if isinstance(mask, BlockMask):
            y = compiled_flex_attention()(q, k, v, block_mask=mask, enable_gqa=self.n_kv_head != self.n_head)
        else:  # no mask is SDPA's own causal one, which its flash kernel takes
            y = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=mask,
                is_causal=mask is None and T > 1,
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=self.n_kv_head != self.n_head,
            )
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.kind = config.mlp
        # For SwiGLU, c_fc holds the gate and the up projection side by side.
        self.c_fc = nn.Linear(config.n_embd, (2 if self.kind == "swiglu" else 1) * config.ffn_hidden, bias=config.bias)
        self.c_proj = nn.Linear(config.ffn_hidden, config.n_embd, bias=config.bias)
        self.c_proj.residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "relu2":
            h = F.relu(h).square()  # ReLU squared (So et al. 2021, Primer): sparse, cheap, and as good as SwiGLU
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's GELU
        return self.dropout(self.c_proj(h))


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
        if config.pos == "rope":
            cos, sin = rope_tables(config, config.block_size)
            # Not saved in checkpoints: they are a function of the config.
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.activation_checkpointing = False  # set by the trainer to trade compute for memory
        # Packed and padded rows: FlexAttention (a compiled kernel that skips masked-out blocks)
        # or SDPA with a dense (B, 1, T, T) mask, which only SDPA's math kernel takes (T^2 memory per
        # head). None picks flex on CUDA; on CPU, torch (2.11-2.14) has no flex backward.
        self.flex_attention = None
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            residual = getattr(module, "residual_projection", False)
            std = 0.02 / math.sqrt(2 * self.config.n_layer) if residual else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if residual and self.config.zero_init_proj:
                # Each block starts as the identity, and the gradient still reaches the projection
                # through its input (modded-nanogpt's speedrun record uses this).
                nn.init.zeros_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=False):
        """Parameters the model really uses: the padding rows of the vocabulary are not counted.

        non_embedding=True also leaves out the lookup tables (token and learned position
        embeddings) but keeps the output layer, which is a matmul; this is the N of 6*N.
        """
        c = self.config
        n = sum(p.numel() for p in self.parameters())
        pad_rows = c.padded_vocab_size - c.vocab_size
        n -= pad_rows * c.n_embd * (1 if c.tie_embeddings else 2)
        if non_embedding:
            if not c.tie_embeddings:
                n -= c.vocab_size * c.n_embd
            if self.wpe is not None:
                n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token: 6N for the matmuls (forward 2N, backward 4N) plus attention's
        q·k and attention·v, 6 * 2 * n_layer * n_embd * seq_len (PaLM paper, appendix B;
        the causal mask's halving is not counted, as there)."""
        c = self.config
        T = seq_len or c.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.n_embd * T

    def forward(self, idx, targets=None, all_logits=False, cache=None, pos=None, keys=None, doc_ids=None):
        """idx (B, T) token ids. With targets (B, T): returns all logits and the mean cross-entropy,
        ignoring targets of -1. Without: the last position's logits, or every position's if
        all_logits. Logits cover the real vocab_size ids only. doc_ids (B, T) is for rows packed
        from several examples: the example each position belongs to (see document_mask).
        cache is for decoding (decoding.py): a list of one dict per layer. A forward from position
        0 (pos None) leaves each layer's keys and values in its dict as "k" and "v" (B, n_kv_head,
        T, head_dim). A decoding step passes one token per row, pos (B,) the position of each, and
        dicts holding key and value buffers (B, n_kv_head, block_size, head_dim): a row's key and
        value are written at its position, and it attends over the buffers' first `keys` slots
        (all if None), those after its position masked. pos is a tensor and keys one of a few
        lengths, so that the steps have few shapes and a compiled graph serves many of them."""
        B, T = idx.shape[:2]
        decoding = pos is not None
        if decoding and not (torch.is_tensor(pos) and cache is not None and T == 1):
            raise ValueError("a decoding step is one token per row with a cache and pos, a tensor of each row's "
                             f"position; got {T} tokens and pos={pos!r}")
        if T > self.config.block_size:
            raise ValueError(f"a forward of {T} tokens: at most block_size={self.config.block_size}")
        mask = None
        if decoding:
            positions = pos[:, None]
            keys = keys or self.config.block_size
            # (B, 1, 1, keys): a row sees the slots up to its position. Those after it may hold the keys of
            # an earlier, longer sequence, or zeros; either way they must not count.
            mask = (torch.arange(keys, device=idx.device) <= positions)[:, None, None, :]
        elif doc_ids is not None:
            positions, mask_mod = document_mask(doc_ids)
            flex = self.flex_attention if self.flex_attention is not None else idx.is_cuda
            if flex and not (self.training and self.config.dropout):  # flex has no dropout
                mask = create_block_mask(mask_mod, B, None, T, T, device=idx.device)
            else:
                mask = dense_mask(mask_mod, B, torch.arange(T, device=idx.device), T)
        else:
            positions = slice(0, T)  # a slice: views of the tables, no index tensor per call
        rope = None
        if self.config.pos == "rope":
            rope = (self.rope_cos[positions], self.rope_sin[positions])
            if not isinstance(positions, slice):  # positions per row: (B, 1, T, head_dim/2), broadcast over heads
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
            if self.activation_checkpointing and self.training:
                # Keep only the block's input; recompute its insides during the backward pass.
                x = torch.utils.checkpoint.checkpoint(block, x, rope, None, None, mask, use_reentrant=False)
            else:
                x = block(x, rope, None if cache is None else cache[i], pos, mask)
        if self.lm_head is None:
            return x, None  # an earlier pipeline stage hands its hidden states on
        x = self.ln_f(x)
        # The padding ids are not tokens, so no softmax (the loss, DPO's log-probabilities,
        # evaluation, sampling) may give them probability mass: the logits are a view of the first
        # vocab_size columns. The matmul keeps its padded width, which runs faster on GPUs than
        # the lm_head's first vocab_size rows would. The view costs no copy under bf16 autocast,
        # where cross_entropy's float() copies anyway; in float32, log_softmax makes one
        # contiguous copy of it (measured on torch 2.13), the price of an aligned matmul.
        logits = self.lm_head(x if targets is not None or all_logits else x[:, -1:, :])[..., : self.config.vocab_size]
        logits = self.soft_cap(logits)
        return logits, None if targets is None else cross_entropy(logits, targets)

    def soft_cap(self, logits):
        """With logit_softcap: cap * tanh(logits / cap), which bounds the logits smoothly to (-cap, cap) so no
        token's logit can run away early in training (Gemma 2; modded-nanogpt)."""
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    # Generation lives in decoding.py; model.generate(...) as in nanoGPT.
    generate, generate_stream = decoding.generate, decoding.generate_stream


# Peak dense bf16 tensor FLOP/s per GPU (vendor data sheets, no sparsity), for MFU.
# Matched against torch.cuda.get_device_name(); the first key found in the name wins, so
# longer names come first.
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM
    "H200": 989e12,
    "H800": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "A10G": 70e12,
    "A10": 125e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "RTX 6000 Ada": 364e12,
    "A6000": 155e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "MI300X": 1307e12,
}


def peak_flops(device_name, override=0.0):
    """Peak bf16 FLOP/s of a GPU by name, or override if given; 0.0 when unknown (MFU is then not shown)."""
    if override:
        return override
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return flops
    return 0.0
