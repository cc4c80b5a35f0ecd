"""
Decoding with a KV cache: the one engine behind model.generate(), sample.py, evaluate.py's
generated answers, and a server's or an RL trainer's batches of sequences that come and go.

    from decoding import Decoder
    decoder = Decoder(model, slots=8)                    # up to 8 sequences at once
    a = decoder.prefill(prompt_ids, temperature=0.0, stop_tokens=[eot])     # returns its slot
    b = decoder.prefill(other_ids, temperature=0.8, top_p=0.95, seed=42)
    tokens = decoder.step()          # (slots,): the next token of every active slot
    decoder.free(a)                  # a finished or cancelled sequence frees its slot at once;
    c = decoder.prefill(new_ids)     # a new one joins while b is mid-answer

model.generate(idx, max_new_tokens, ...) and model.generate_stream(...) put each row of idx in
a slot of their own Decoder and step it; nothing else decodes.

Design notes, the why behind the choices:
- A slot is one sequence: its own length, cache rows, sampling settings, random generator and
  stop tokens. Rows at different positions share every step, so a sequence can join or leave
  between any two steps (continuous batching) and nothing waits for the longest row.
- prefill() runs a prompt from position 0 into its slot's cache and leaves the logits of its
  next token; step() first runs the newest token of every slot that has one (one batched
  forward of one token per slot), then samples one token for every active slot. So a sequence's
  first token costs its prefill and nothing more, and a step with a new arrival advances the
  others too.
- A step runs the slots up to the highest one in use (a free slot among them computes a token no
  one reads), and attention reads the cache's first L slots: eager, L is the longest sequence's length; compiled, the next
  power of two above it (at least 64, at most block_size), so that the step keeps a few shapes
  and so a few graphs (on CUDA, CUDA graphs). Reading all block_size slots at every step, as a
  single static shape would, made a batch of 8 short sequences read more cache than weights.
  Eager, the cache itself is only that power of two of slots long, and grows with the longest
  sequence: reading each row's first L slots out of block_size was slower (see make_room).
- On a CPU, each linear layer of an eager prefill or step multiplies through oneDNN on a copy of
  its weight packed into oneDNN's layout, made at the decoder's first forward and kept while it lives
  (a second copy of the weights): at a few rows MKL's sgemm, torch's default there, is far from the
  core's peak (packed_linear.py; greedy decoding at 124M 1.2-2.4x faster, docs/benchmarks.md).
- A greedy row gives the same tokens alone or beside others, and the same as recomputing its
  whole context at every step. Once a sequence fills block_size, its last block_size tokens
  run again from position 0 at every step (a sliding window, exactly as without a cache).
- Each sampling slot has its own torch.Generator (seeded by the request, or from torch's global
  generator), so a seeded request gives the same tokens whatever else shares its batch. A step
  samples every sampling slot in one batched pass, each with its own settings, each drawing one
  number from its own generator (sample_next_token), not one pass per slot.
"""

import functools

import torch
import torch.nn.functional as F

import packed_linear

SMALLEST_BUCKET = 64  # the shortest cache prefix a compiled step reads: below it, fewer graphs matter more


def attended_length(longest, block_size, bucketed):
    """How many cache slots a decoding step reads when its longest row holds `longest` positions
    (the new token's included): bucketed (a compiled step, one graph per length), the next power
    of two, at least SMALLEST_BUCKET, at most block_size; eager, exactly `longest`."""
    if not bucketed:
        return longest
    return min(block_size, max(SMALLEST_BUCKET, 1 << (longest - 1).bit_length()))


def sample_next_token(logits, temperature, top_k=None, top_p=None, generator=None):
    """One token per row (B, 1) from next-token logits (B, V). Each setting is one value for every
    row or a list of one per row: temperature 0 is greedy; top_k keeps the k most likely tokens
    (None: all); top_p keeps the smallest set whose probability reaches p (None or 1.0: all).
    generator: None (torch's global one), a torch.Generator, or a list of one per row (None in it:
    the global one). Every row draws one uniform number u from its generator and takes the token
    where its cumulative probability passes u (inverse CDF): one batched pass for all rows, and a
    row's token depends on its own logits, settings and generator alone, whatever shares the batch."""
    rows = logits.size(0)
    temperature = per_row(temperature, rows, 0.0)
    if not any(temperature):
        return logits.argmax(dim=-1, keepdim=True)
    cdf = kept_logits(logits, temperature, top_k, top_p).softmax(dim=-1).cumsum(dim=-1)
    if isinstance(generator, (list, tuple)):
        u = torch.stack([torch.rand((), generator=g, device=logits.device) for g in generator])
    else:
        u = torch.rand(rows, generator=generator, device=logits.device)
    total = cdf[:, -1:]
    # The first token whose cdf exceeds u * total, so never one of probability 0 (its cdf equals its
    # predecessor's); u * total may round up to total, and then it is the first token that reaches it.
    token = torch.searchsorted(cdf, u[:, None] * total, right=True)
    token = torch.minimum(token, (cdf < total).sum(dim=-1, keepdim=True))
    if all(temperature):
        return token
    sampled = torch.tensor(temperature, device=logits.device)[:, None] > 0
    return torch.where(sampled, token, logits.argmax(dim=-1, keepdim=True))


def kept_logits(logits, temperature, top_k=None, top_p=None):
    """logits (B, V) / temperature in float32 (a new tensor: the caller's stays as it was), with -inf
    at every token that top_k or top_p drops; settings as in sample_next_token, a greedy row's
    temperature taken as 1. Each row's result is what it would be alone."""
    rows, vocab = logits.shape
    temperature = torch.tensor([t or 1.0 for t in per_row(temperature, rows, 0.0)], device=logits.device)
    # float(): a new tensor. Less each row's largest logit, so that a temperature too small for float32
    # (1e-300 is 0 there) makes the others -inf and the largest 0, never inf - inf = NaN
    logits = logits.float()
    temperature = temperature.clamp(min=torch.finfo(torch.float32).tiny)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature[:, None]
    # masked_fill, not logits[mask] = ...: boolean indexing waits for the device to count the mask
    top_k = [min(k, vocab) if k else vocab for k in per_row(top_k, rows, None)]
    if min(top_k) < vocab:  # the k-th largest logit of each row that has a top_k (-inf: keep all)
        largest = torch.topk(logits, max(k for k in top_k if k < vocab)).values
        kth = largest.gather(1, torch.tensor([[k - 1 if k < vocab else 0] for k in top_k], device=logits.device))
        kth = kth.masked_fill(torch.tensor([[k == vocab] for k in top_k], device=logits.device), -float("inf"))
        logits = logits.masked_fill(logits < kth, -float("inf"))
    top_p = [p if p is not None and p < 1.0 else float("inf") for p in per_row(top_p, rows, None)]
    if min(top_p) < 1.0:
        # Keep the smallest set of most likely tokens whose probability reaches top_p.
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # (a top_p too small for float32 would be 0 there and drop the most likely token too: every token)
        limit = torch.tensor(top_p, device=logits.device).clamp(min=torch.finfo(torch.float32).tiny)[:, None]
        sorted_logits = sorted_logits.masked_fill(probs.cumsum(dim=-1) - probs >= limit, -float("inf"))
        logits = torch.full_like(logits, -float("inf")).scatter(1, order, sorted_logits)
    return logits


def per_row(setting, rows, default):
    """A sampling setting as a list of one value per row, None as default."""
    values = setting if isinstance(setting, (list, tuple)) else [setting] * rows
    return [default if v is None else v for v in values]


@functools.cache
def compiled_forward(model_class, cuda_graphs):
    """model_class.forward compiled for decoding steps, whose shapes take a few values (see attended_length)."""
    return torch.compile(model_class.forward, mode="reduce-overhead" if cuda_graphs else None, fullgraph=True,
                         dynamic=False)


class Decoder:
    """Up to `slots` sequences decoding together, each at its own position (see the module docstring).
    compile: compile the decoding step (None: on CUDA, where it replays as CUDA graphs; on a CPU
    compiling takes longer than it saves over a few hundred tokens, see docs/benchmarks.md)."""

    def __init__(self, model, slots, compile=None):
        self.model, self.slots = model, slots
        self.block_size = model.config.block_size
        self.device = next(model.parameters()).device
        self.cuda_graphs = self.device.type == "cuda" and compile is not False
        self.compiled = bool(compile or self.cuda_graphs)
        self.forward = functools.partial(compiled_forward(type(model), self.cuda_graphs), model) if self.compiled else model
        self.cache = [{} for _ in model.blocks]  # per layer "k" and "v" (slots, n_kv_head, positions, head_dim)
        # On a CPU, the model's weights packed for oneDNN while this decoder lives (packed_linear.py); none for a
        # compiled step, which multiplies with inductor's kernels (and the prefill then with F.linear's, not to pack
        # what no step reads).
        self.packed = None if self.compiled else {}
        self.logits = None  # (slots, vocab_size) float32: each slot's next-token logits
        self.context = torch.zeros(slots, self.block_size, dtype=torch.long, device=self.device)  # what the cache holds
        self.newest = torch.zeros(slots, dtype=torch.long, device=self.device)  # each slot's last sampled token
        self.finished = torch.zeros(slots, dtype=torch.bool, device=self.device)  # has produced a stop token
        self.stop_ids = torch.full((slots, 1), -1, device=self.device)  # each slot's stop tokens, -1 for none
        self.room = 0  # the cache slots [0, room) hold finite numbers in every row (see make_room)
        self.length = [None] * slots  # positions each slot's cache holds; None: the slot is free
        self.unfed = [False] * slots  # the slot's newest token is not in its cache yet
        self.sampling = [None] * slots  # (temperature, top_k, top_p, generator) per slot
        self.stops = [[] for _ in range(slots)]  # each slot's stop tokens

    @property
    def free_slots(self):
        return [s for s in range(self.slots) if self.length[s] is None]

    @torch.no_grad()
    def prefill(self, prompts, temperature=1.0, top_k=None, top_p=None, seed=None, stop_tokens=()):
        """Start a sequence for each prompt (a list of token ids; its last block_size count) in a free
        slot and return their slots: the prompts run through the model into the slots' caches
        (prompts of one length in one batch), and the next step() samples their first tokens.
        temperature 0 is greedy; top_k and top_p as in sample_next_token; seed makes the samples
        reproducible whatever else is decoding (prompt i gets seed + i; None: drawn from torch's
        global generator). Once a sequence samples one of stop_tokens it is finished: it repeats
        that token until freed."""
        prompts = [torch.as_tensor(ids, dtype=torch.long, device=self.device)[-self.block_size :] for ids in prompts]
        if any(ids.dim() != 1 or not len(ids) for ids in prompts):
            raise ValueError("a prompt is a non-empty list of token ids")
        if len(prompts) > len(self.free_slots):
            raise RuntimeError(f"{len(prompts)} prompts and {len(self.free_slots)} of {self.slots} slots free: "
                               "free() some first")
        slots = self.free_slots[: len(prompts)]
        stops = sorted(set(stop_tokens))
        for i, slot in enumerate(slots):
            generator = None
            if temperature > 0:
                generator = torch.Generator(self.device)
                generator.manual_seed(int(torch.randint(2**62, ())) if seed is None else seed + i)
            self.sampling[slot] = (temperature, top_k, top_p, generator)
            self.stops[slot] = stops
            self.unfed[slot] = False
        self.finished[slots] = False
        self.stop_ids = stop_table(self.stops, self.device)
        for length in sorted({len(ids) for ids in prompts}):
            rows = [i for i, ids in enumerate(prompts) if len(ids) == length]
            self.fill(torch.tensor([slots[i] for i in rows], device=self.device), torch.stack([prompts[i] for i in rows]))
        return slots

    def free(self, slot):
        """End the slot's sequence; the slot takes the next prefill."""
        self.length[slot], self.unfed[slot], self.sampling[slot], self.stops[slot] = None, False, None, []
        self.finished[slot] = False
        self.stop_ids = stop_table(self.stops, self.device)

    @torch.no_grad()
    def step(self):
        """Advance every active slot by one token and return the tokens (slots,); a free slot's
        entry means nothing, a finished slot's is its stop token again."""
        active = [s for s in range(self.slots) if self.length[s] is not None]
        fed = [s for s in active if self.unfed[s]]
        full = torch.tensor([s for s in fed if self.length[s] == self.block_size], device=self.device)
        self.advance([s for s in fed if self.length[s] < self.block_size])
        if len(full):  # the context is full: run its last block_size tokens from position 0, as without a cache
            self.fill(full, torch.cat((self.context[full, 1:], self.newest[full, None]), dim=1))
        tokens = self.logits.argmax(dim=-1)
        rows = [s for s in active if self.sampling[s][0] > 0]
        if rows:  # every sampling slot in one batched draw, each from its own generator
            temperature, top_k, top_p, generator = map(list, zip(*(self.sampling[s] for s in rows)))
            index = torch.tensor(rows, device=self.device)
            tokens[index] = sample_next_token(self.logits[index], temperature, top_k, top_p, generator)[:, 0]
        tokens = torch.where(self.finished, self.newest, tokens)
        self.finished |= (tokens[:, None] == self.stop_ids).any(dim=1)
        self.newest = tokens
        for s in active:
            self.unfed[s] = True
        return tokens

    def fill(self, rows, ids):
        """Run ids (len(rows), T) from position 0 into the cache of slots rows."""
        layers = [{} for _ in self.cache]
        with packed_linear.weights(self.packed):
            logits, _ = self.model(ids, cache=layers)
        T = ids.size(1)
        if not any(self.cache):  # the first fill: buffers of the model's kind of keys and values (see make_room)
            for layer, new in zip(self.cache, layers):
                for name in ("k", "v"):
                    slots = self.block_size if self.compiled else 0
                    layer[name] = new[name].new_empty(self.slots, new[name].size(1), slots, new[name].size(3))
                    if self.cuda_graphs:  # CUDA graphs replay their writes into the cache where it is now
                        torch._dynamo.mark_static_address(layer[name])
        self.make_room(T)
        for layer, new in zip(self.cache, layers):
            for name in ("k", "v"):
                layer[name][rows, :, :T] = new[name]
        if self.logits is None:
            self.logits = torch.zeros(self.slots, logits.size(-1), device=self.device)
        self.logits[rows] = logits[:, -1].float()
        self.context[rows, :T] = ids
        for slot in rows.tolist():
            self.length[slot] = T

    def make_room(self, length):
        """Have every slot's cache hold finite numbers in the slots [0, length) and on to the bucket of
        `length` (attended_length's next power of two): a masked slot that a step reads gets weight 0,
        but 0 * NaN from uninitialised memory is NaN. Eager, the buffers are that long and grow by a
        zeroed tail: at batch 8, 64 new tokens after 64 took 6% longer with buffers of 1,024 slots per
        row than of 128, the attention reading rows far apart (docs/benchmarks.md). Compiled, they
        hold block_size slots from the start (a graph's inputs keep their strides and, with CUDA
        graphs, their address), zeroed a bucket at a time, which spares writing a whole block_size
        cache per batch."""
        room = attended_length(length, self.block_size, bucketed=True)
        if room <= self.room:
            return
        for layer in self.cache:
            for name, buffer in layer.items():
                if self.compiled:
                    buffer[:, :, self.room : room].zero_()
                else:
                    layer[name] = F.pad(buffer, (0, 0, 0, room - self.room))  # zeros after the slots it has
        self.room = room

    def advance(self, rows):
        """Run the newest token of each slot in rows (each with room in its cache) through the
        model: one step of one token for the slots up to the highest one in use."""
        if not rows:
            return
        # prefill() fills the lowest free slots, so the sequences sit at the front: the step runs that
        # prefix of the batch (views of the cache, so the writes land in it), and a server of 16 slots
        # with one request computes one row, not 16. Compiled, the prefix is a power of two (few shapes);
        # with CUDA graphs it is every slot, as the graphs replay on the whole cache where it lies.
        width = max(s for s in range(self.slots) if self.length[s] is not None) + 1
        if self.compiled:
            width = self.slots if self.cuda_graphs else min(self.slots, 1 << (width - 1).bit_length())
        # Every slot of the prefix writes its key and value somewhere: a slot not in rows at its next
        # free position (or, free or full, at 0), which holds nothing it needs.
        pos = [self.length[s] if self.length[s] is not None and self.length[s] < self.block_size else 0
               for s in range(width)]
        keys = attended_length(max(pos[s] for s in rows) + 1, self.block_size, bucketed=self.compiled)
        positions = torch.tensor(pos, device=self.device)
        self.make_room(keys)
        cache = self.cache if width == self.slots else [{name: buffer[:width] for name, buffer in layer.items()}
                                                        for layer in self.cache]
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are used up
        with packed_linear.weights(self.packed):
            logits, _ = self.forward(self.newest[:width, None], cache=cache, pos=positions, keys=keys)
        index = torch.tensor(rows, device=self.device)
        self.logits[index] = logits[index, -1].float()
        self.context[index, positions[index]] = self.newest[index]
        for s in rows:
            self.length[s] += 1


def stop_table(stops, device):
    """Each slot's stop tokens as one (slots, most) tensor, -1 where a slot has fewer."""
    width = max(1, *map(len, stops))
    return torch.tensor([s + [-1] * (width - len(s)) for s in stops], device=device)


@torch.no_grad()
def generate_stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_tokens=None, pad=None,
                    compile=None, check_every=1):
    """Yield (B, 1) next tokens one at a time; see generate(). Whether every row has stopped is
    checked (a wait for the device) every check_every tokens: up to check_every - 1 tokens past
    that point, each row repeating its stop token, may come out."""
    decoder = Decoder(model, idx.size(0), compile)
    prompts = idx if pad is None else [ids[start:] for ids, start in zip(idx, pad.tolist())]
    decoder.prefill(prompts, temperature, top_k, top_p, stop_tokens=stop_tokens or ())  # slot i is row i
    for i in range(max_new_tokens):
        yield decoder.step()[:, None]
        if stop_tokens and (i + 1) % check_every == 0 and bool(decoder.finished.all()):
            return


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_tokens=None, pad=None,
             compile=None):
    """Continue idx (B, T) by up to max_new_tokens tokens and return (B, T + new).

    temperature 0 is greedy; top_k keeps the k most likely tokens; top_p keeps the smallest
    set whose probability reaches p. Generation stops early once every row has produced one
    of stop_tokens; a row that stopped repeats its stop token until then. Each row decodes in
    a slot of its own (see Decoder): the output is the same as recomputing the whole context
    every step. Prompts of different lengths go in one batch left-padded: pad (B,) says how
    many tokens of any id each row starts with, and every row continues as it would alone.
    compile: see Decoder."""
    new = torch.cat([idx[:, :0], *generate_stream(model, idx, max_new_tokens, temperature, top_k, top_p, stop_tokens,
                                                  pad, compile, check_every=16)], dim=1)
    if stop_tokens:  # cut what came after the step where the last row stopped
        stopped = torch.isin(new, torch.tensor(sorted(stop_tokens), device=new.device))
        if stopped.any(dim=1).all():
            new = new[:, : stopped.int().argmax(dim=1).max() + 1]  # argmax: a row's first stop token
    return torch.cat((idx, new), dim=1)
