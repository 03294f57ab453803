"""Stage two network: the transformer that predicts p_theta(x_0 | x_t) (docs/method.md section 2), or, made
causal, p_theta(x_i | x_<i) of the autoregressive baseline (paper section 4.2, Table 4).

The network maps a grid of N tokens, some of which hold the mask id K, to K logits per position:

    forward(x: LongTensor[B, N]) -> logits FloatTensor[B, N, K]

It is a GPT-2 style stack without the causal mask ("GPT-2 scaled down to 80M parameters", paper
section 3.2): token embedding of K+1 entries (the mask included), a learned positional embedding,
pre-LayerNorm blocks (x = x + attn(ln1(x)); x = x + mlp(ln2(x))), a final LayerNorm and a linear
head to K logits without bias. It is not conditioned on t: the authors' code ignores t and the
paper reports that conditioning made no difference. The absorbing process (masking, losses, the
ELBO) lives apart, in `uvq.prior.absorbing`.

Causal (`causal=True`, recipe key `model.prior.causal`): the same stack with a causal attention
mask, over the paper's raster order, so that the autoregressive baseline uses "exactly the same
transformer" (paper section 4.2). Its input is the grid shifted right by one behind a start token,
so output i is p_theta(x_i | x_<i) for every i in one pass:

    forward(x: LongTensor[B, N]) -> logits FloatTensor[B, N, K], logits[:, i] a function of x[:, :i] only

The start token is the mask id K: its embedding row, which a causal network never otherwise sees,
is a learned start vector, so the parameters (and the checkpoint layout) equal the absorbing
network's. The authors' transformer keeps a separate `start_tok` parameter for this, and taming-
transformers' GPT prepends a conditioning token; both amount to a learned embedding at position 0.
`forward_cached` runs the causal network incrementally over a `KVCache` (taming-transformers'
`forward_with_past` idea, with preallocated buffers instead of concatenation), for the token-by-
token sampler in `uvq.sampling.autoregressive`. The process (next-token cross-entropy, exact NLL)
lives in `uvq.prior.autoregressive`.

Parameter names follow the authors' released checkpoints (`tok_emb`, `pos_emb`, `blocks.<i>.ln1`,
`attn.proj`, `mlp.0`, `mlp.2`, `ln_f`, `head`), except that query, key and value are fused into
one `attn.qkv` Linear whose output rows are ordered [query; key; value] (one matrix product
instead of three). `uvq.interop.layouts.map_official_prior` performs that one mapping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from uvq.config import PriorConfig
from uvq.registry import register
from uvq.runtime import UserError

# ---------------------------------------------------------------------------------------------
# Blocks (section 3.2: pre-LayerNorm transformer blocks, bidirectional attention)
# ---------------------------------------------------------------------------------------------


class KVCache:
    """Keys and values of the positions seen so far, per layer: k, v FloatTensor[L, B, H, N, C/H].

    Allocated on the first write (with the dtype autocast gives the keys); `length` positions are
    filled. One cache serves one batch of B sequences decoded together.
    """

    def __init__(self, n_layer: int, n_tokens: int) -> None:
        self.n_layer = n_layer
        self.n_tokens = n_tokens
        self.length = 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B,H,n,C/H] at positions length..length+n-1; return the keys and values so far."""
        B, H, n, D = k.shape
        if self.k is None:
            self.k = k.new_zeros(self.n_layer, B, H, self.n_tokens, D)  # [L,B,H,N,C/H]
            self.v = v.new_zeros(self.n_layer, B, H, self.n_tokens, D)
        end = self.length + n
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # [B,H,length+n,C/H]


class SelfAttention(nn.Module):
    """Multi-head self-attention over all positions (no causal mask), or over earlier ones (causal).

    The authors' layer computes softmax(q k^T / sqrt(head_dim)) v with separate key, query and
    value projections; here the three are one Linear (rows: query, key, value) and the product
    runs through `scaled_dot_product_attention`, whose default scale is the same 1/sqrt(head_dim).
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, causal: bool = False) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.n_head = n_head
        self.dropout = dropout
        self.causal = causal
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.n_head, C // self.n_head)  # [B,N,3,H,C/H]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B,H,N,C/H]
        causal = self.causal
        if cache is not None:
            # The new positions attend to every cached one; among themselves causally (a prefill
            # from position 0), and a single new position needs no mask at all.
            if cache.length and N > 1:
                raise ValueError("a KV cache extends one position at a time after its first call")
            k, v = cache.write(layer, k, v)  # [B,H,length+N,C/H]
            causal = N > 1
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=causal)
        y = y.transpose(1, 2).reshape(B, N, C)  # [B,N,C]
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    """x = x + attn(ln1(x)); x = x + mlp(ln2(x)). MLP: Linear(C, 4C), GELU (erf), Linear(4C, C)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, causal: bool = False) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.ln2 = nn.LayerNorm(n_embd)
        self.attn = SelfAttention(n_embd, n_head, dropout, causal)
        # Indices 0 and 2 hold the Linears, as in the authors' checkpoints (mlp.0, mlp.2).
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd),
            nn.GELU(),
            nn.Linear(4 * n_embd, n_embd),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache, layer)
        return x + self.mlp(self.ln2(x))


# ---------------------------------------------------------------------------------------------
# The network p_theta(x_0 | x_t) (section 3.2)
# ---------------------------------------------------------------------------------------------


class AbsorbingTransformer(nn.Module):
    """Bidirectional transformer over N tokens with vocabulary K+1 (mask id K), K logits out.

    With `causal=True`, the autoregressive network of the paper's baseline (module docstring).

    Args:
        codebook_size: K, the number of VQGAN codes; the mask token has id K.
        n_tokens: N = h*w, the number of positions (the learned positional embedding's length).
        n_embd: width C. n_head: attention heads (C must divide by it). n_layer: blocks.
        dropout: on the embeddings, attention weights, and both residual branches (the authors'
            placement); 0 by default.
        causal: attend to earlier raster positions only, input shifted behind the start token K.
    """

    def __init__(self, codebook_size: int, n_tokens: int, n_embd: int = 512, n_head: int = 8,
                 n_layer: int = 24, dropout: float = 0.0, causal: bool = False) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.mask_id = codebook_size
        self.n_tokens = n_tokens
        self.n_layer = n_layer
        self.causal = causal
        self.tok_emb = nn.Embedding(codebook_size + 1, n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(1, n_tokens, n_embd))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[Block(n_embd, n_head, dropout, causal) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, codebook_size, bias=False)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: LongTensor[B, N] with values in 0..K (K = masked) -> logits FloatTensor[B, N, K]."""
        if x.shape[1] != self.n_tokens:
            raise ValueError(f"the prior was built for {self.n_tokens} tokens, got a grid of {x.shape[1]}")
        if self.causal:  # input i is x_{i-1}, the start token K at i = 0: output i predicts x_i
            x = torch.cat([torch.full_like(x[:, :1], self.mask_id), x[:, :-1]], 1)  # [B,N]
        h = self.drop(self.tok_emb(x) + self.pos_emb)  # [B,N,C]
        h = self.blocks(h)
        return self.head(self.ln_f(h))  # [B,N,K]

    def new_cache(self) -> KVCache:
        """An empty KV cache for `forward_cached` (causal networks only)."""
        if not self.causal:
            raise ValueError("a KV cache needs a causal prior: every position of a bidirectional one sees all others")
        return KVCache(self.n_layer, self.n_tokens)

    def forward_cached(self, inputs: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Incremental causal forward: inputs LongTensor[B, n] are the *input* tokens of positions
        cache.length .. cache.length+n-1 (position 0's is the start token K; position i's is x_{i-1}).
        -> logits [B, n, K] of x at those positions, the same as forward's there. Advances the cache."""
        start, n = cache.length, inputs.shape[1]
        if start + n > self.n_tokens:
            raise ValueError(f"the cache holds {start} of {self.n_tokens} positions; {n} more do not fit")
        h = self.drop(self.tok_emb(inputs) + self.pos_emb[:, start:start + n])  # [B,n,C]
        for i, block in enumerate(self.blocks):
            h = block(h, cache, i)
        cache.length = start + n
        return self.head(self.ln_f(h))  # [B,n,K]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _init_weights(module: nn.Module) -> None:
    # GPT-2 / minGPT initialisation, the one the authors' Transformer defines: N(0, 0.02) weights,
    # zero biases, unit LayerNorms. The positional embedding starts at zero, as theirs.
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ---------------------------------------------------------------------------------------------
# Registry entry and presets
# ---------------------------------------------------------------------------------------------


@register("priors", "absorbing_transformer.v1")
def build_absorbing_transformer(cfg: PriorConfig) -> AbsorbingTransformer:
    return AbsorbingTransformer(codebook_size=cfg.codebook_size, n_tokens=cfg.n_tokens, n_embd=cfg.n_embd,
                                n_head=cfg.n_head, n_layer=cfg.n_layer, dropout=cfg.dropout, causal=cfg.causal)


@dataclass(frozen=True)
class PriorPreset:
    n_embd: int
    n_head: int
    n_layer: int
    codebook_size: int
    latent_shape: tuple[int, int]

    def config(self) -> PriorConfig:
        return PriorConfig(n_embd=self.n_embd, n_head=self.n_head, n_layer=self.n_layer,
                           codebook_size=self.codebook_size, latent_shape=list(self.latent_shape))


PRESETS: dict[str, PriorPreset] = {
    # The paper's network: 24 blocks of width 512 with 8 heads of 64, 16x16 tokens, 1024 codes;
    # 76,838,400 parameters (the paper's "76.8M"; the authors' unused start_tok adds 512).
    "paper": PriorPreset(n_embd=512, n_head=8, n_layer=24, codebook_size=1024, latent_shape=(16, 16)),
    # recipes/demo.yaml's prior: 8x8 tokens from a 64-entry codebook.
    "demo": PriorPreset(n_embd=128, n_head=4, n_layer=4, codebook_size=64, latent_shape=(8, 8)),
    # For unit tests: runs a training step in milliseconds.
    "debug": PriorPreset(n_embd=32, n_head=2, n_layer=2, codebook_size=16, latent_shape=(4, 4)),
}


def preset(name: str) -> PriorConfig:
    """The PriorConfig of a named preset ('paper', 'demo', 'debug')."""
    if name not in PRESETS:
        raise UserError(f"unknown prior preset {name!r}; valid: {', '.join(PRESETS)}")
    return PRESETS[name].config()


def flops_per_token(n_embd: int, n_layer: int, n_tokens: int, codebook_size: int) -> float:
    """Forward FLOPs per token (2 per multiply-add): the matrix products plus attention scores."""
    linear = n_layer * 12 * n_embd * n_embd + n_embd * codebook_size  # qkv 3C^2, proj C^2, mlp 8C^2; head
    attention = n_layer * 2 * n_tokens * n_embd  # q k^T and att v
    return 2.0 * (linear + attention)


__all__ = ["AbsorbingTransformer", "Block", "KVCache", "SelfAttention", "PRESETS", "preset", "build_absorbing_transformer",
           "flops_per_token"]
