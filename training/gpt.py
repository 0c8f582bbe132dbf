"""A small GPT: a decoder-only transformer over bytes, for `--model gpt`.

    make gpt        # 2 CPU processes, the standard library, 600 steps (Makefile: GPT_FLAGS)
    python -m benchmarks.learning_gpt   # the same, checked against the unigram entropy

Token and position embeddings, `layers` pre-LayerNorm blocks (causal self-attention through
F.scaled_dot_product_attention, then a 4x-wide GELU MLP, each added to the residual stream),
a final LayerNorm and the output head. No dropout and no BatchNorm: the model is a pure
function of its parameters and input, which the equivalence oracles need (one process, W
ranks and every --sync mode must compute the same thing).

The head is tied to the token embedding: the logits are `x @ tok.T`, with the very Parameter
the input lookup uses, so the model holds it once and autograd adds the two gradients (from
the lookup and from the head) into one `.grad` before its AccumulateGrad hook fires. What each
--sync mode does with it:
- ddp (and torch-zero1, compressed ddp): DDP registers one hook per Parameter, so the tied
  weight is one gradient in one bucket, all-reduced once per step.
- allreduce, overlap, local-sgd, zero1, zero2: they iterate model.parameters(), which yields
  a shared Parameter once; overlap's post-accumulate hook fires once, after both uses.
- zero3 and fsdp2 shard per module that owns parameters directly. `tok` and `pos` are
  Parameters of the GPT module itself (not of an nn.Embedding), so both uses of the tied
  weight happen inside the root unit's forward, while that unit is gathered; a separate
  embedding module would be resharded before the head reads its weight.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.errors import UsageError


class Block(nn.Module):
    """x + attention(LN(x)), then x + MLP(LN(x)): pre-LayerNorm, as GPT-2."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        # (b, t, c) -> (b, heads, t, c / heads): each head attends over its own slice.
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        # is_causal: position i sees positions <= i only, so every position of a window is
        # one next-byte prediction that cannot peek at its target.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class GPT(nn.Module):
    """Byte ids (batch, time) -> next-byte logits (batch, time, vocab)."""

    def __init__(
        self,
        vocab: int = 256,
        context: int = 128,
        layers: int = 4,
        width: int = 128,
        heads: int = 4,
    ) -> None:
        super().__init__()
        if width % heads:
            raise UsageError(f"--gpt-width {width} is not a multiple of --gpt-heads {heads}")
        self.context = context
        # Parameters of this module, not nn.Embedding modules: see the module docstring.
        self.tok = nn.Parameter(torch.empty(vocab, width))
        self.pos = nn.Parameter(torch.empty(context, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        # GPT-2's init: N(0, 0.02), biases zero, and the projections into the residual
        # stream scaled by 1/sqrt(2 x layers) so its variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                std = (
                    0.02 / math.sqrt(2 * layers)
                    if name.endswith(("proj.weight", "down.weight"))
                    else 0.02
                )
                nn.init.normal_(p, std=std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"{t} positions, more than the context of {self.context}")
        x = F.embedding(idx, self.tok) + self.pos[:t]
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln(x), self.tok)  # the head: the token embedding, tied


@torch.no_grad()
def generate(
    model: nn.Module, prompt: bytes, n: int, *, temperature: float = 0.8, seed: int = 0
) -> bytes:
    """`n` bytes that `model` continues `prompt` with, one at a time, each step seeing the last
    `context` bytes. temperature 0 is greedy; otherwise samples from softmax(logits / T)
    with a generator seeded by `seed`: the same model and seed give the same bytes."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = list(prompt) or [ord("\n")]
    for _ in range(n):
        window = torch.tensor([ids[-model.context :]], device=device)
        logits = model(window)[0, -1].double().cpu()
        if temperature == 0:
            ids.append(int(logits.argmax()))
        else:
            probs = torch.softmax(logits / temperature, dim=0)
            ids.append(int(torch.multinomial(probs, 1, generator=g)))
    model.train(was_training)
    return bytes(ids[len(prompt) :] if prompt else ids[1:])


def show_sample(model: nn.Module, args, is_main: bool, log) -> str | None:
    """--sample N: on global rank 0, N bytes the trained `model` (a plain one, or inside
    DataParallel or DDP) writes after a newline, logged and returned as text (invalid UTF-8
    replaced); None elsewhere or when not asked. Deterministic: --temperature 0 is greedy,
    else sampled from --seed. Runs no collective: the other ranks need not wait for it."""
    if not args.sample or not is_main:
        return None
    model = getattr(model, "module", model)  # the module generate() reads .context from
    out = generate(model, b"\n", args.sample, temperature=args.temperature, seed=args.seed)
    text = out.decode("utf-8", errors="replace")
    log("sample of %d bytes (--temperature %g):\n%s", args.sample, args.temperature, text)
    return text
