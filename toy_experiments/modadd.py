"""Modular addition (a + b mod p) with Nanda et al.'s 1-layer transformer.

Data: every pair (a, b) as the sequence (a, b, =) with '=' the token p; the label is (a + b) mod p.
Model: learned token + positional embeddings, one attention layer (4 heads of 32, no LayerNorm),
a ReLU MLP (d_mlp 512), an unembedding; the loss is taken at the last position only, so only the
last position's query, MLP and unembedding are computed (exactly the same loss, ~3x cheaper).

The audited weight matrices (fused over heads): embed.weight (p+1, d), attn.W_Q/W_K/W_V.weight
(H*dh, d), attn.W_O.weight (d, H*dh), mlp.W_in.weight (d_mlp, d), mlp.W_out.weight (d, d_mlp),
unembed.weight (p, d).

``stacked_logits`` is the same forward for E models at once (every parameter stacked (E, ...),
``STACKED_NAMES``), the ensemble trainer's; ``member_model`` takes one member out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class ModAddData:
    train_x: torch.Tensor  # (n_train, 3) int64 tokens (a, b, p)
    train_y: torch.Tensor  # (n_train,) int64 (a + b) mod p
    test_x: torch.Tensor  # (n_test, 3)
    test_y: torch.Tensor  # (n_test,)
    p: int


def make_data(p: int, train_frac: float, generator: torch.Generator,
              device: torch.device | str = "cpu") -> ModAddData:
    """All p² pairs, split at random (seeded) into train_frac for training and the rest for test."""
    a = torch.arange(p).repeat_interleave(p)  # (p²,)
    b = torch.arange(p).repeat(p)  # (p²,)
    x = torch.stack([a, b, torch.full_like(a, p)], dim=1)  # (p², 3)
    y = (a + b) % p  # (p²,)
    perm = torch.randperm(p * p, generator=generator)
    n_train = int(round(train_frac * p * p))
    tr, te = perm[:n_train], perm[n_train:]
    return ModAddData(x[tr].to(device), y[tr].to(device), x[te].to(device), y[te].to(device), p)


@dataclass(frozen=True)
class ModelConfig:
    p: int = 113
    d_model: int = 128
    n_heads: int = 4
    d_head: int = 32
    d_mlp: int = 512
    n_ctx: int = 3


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hd = cfg.n_heads * cfg.d_head
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        self.W_Q = nn.Linear(cfg.d_model, hd, bias=False)  # weight (H*dh, d)
        self.W_K = nn.Linear(cfg.d_model, hd, bias=False)
        self.W_V = nn.Linear(cfg.d_model, hd, bias=False)
        self.W_O = nn.Linear(hd, cfg.d_model, bias=False)  # weight (d, H*dh)

    def forward(self, table: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Attention output at the last position (B, d).

        table (V, S, d): the residual stream of every token at every position (embedding +
        positional); x (B, S) tokens. Keys and values depend on (token, position) only, and the
        last token is always '=', so K and V are computed once per table row and gathered, and
        the query is one vector: the same numbers as the per-example computation, far cheaper.
        """
        V, S, _ = table.shape
        H, dh = self.n_heads, self.d_head
        k_tab = self.W_K(table).view(V, S, H, dh)  # (V, S, H, dh)
        v_tab = self.W_V(table).view(V, S, H, dh)  # (V, S, H, dh)
        q = self.W_Q(table[x[0, -1], -1]).view(H, dh)  # (H, dh): the '=' token at the last slot
        pos = torch.arange(S, device=x.device)
        k, v = k_tab[x, pos], v_tab[x, pos]  # (B, S, H, dh)
        scores = torch.einsum("hd,bshd->bhs", q, k) / math.sqrt(dh)  # (B, H, S)
        pattern = scores.softmax(dim=-1)  # the last position sees every position (causal)
        z = torch.einsum("bhs,bshd->bhd", pattern, v).reshape(x.shape[0], H * dh)  # (B, H*dh)
        return self.W_O(z)  # (B, d)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_in = nn.Linear(cfg.d_model, cfg.d_mlp)  # weight (d_mlp, d)
        self.W_out = nn.Linear(cfg.d_mlp, cfg.d_model)  # weight (d, d_mlp)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.W_in(x))  # (B, d_mlp)


class ModAddTransformer(nn.Module):
    """Nanda et al.'s 1-layer transformer, evaluated at the last position only."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.p + 1, cfg.d_model)  # weight (p+1, d)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.n_ctx, cfg.d_model))  # (3, d)
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.unembed = nn.Linear(cfg.d_model, cfg.p, bias=False)  # weight (p, d)

    def forward_with_hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 3) tokens with x[:, -1] == p -> (logits (B, p), MLP activations (B, d_mlp))."""
        table = self.embed.weight[:, None, :] + self.pos_embed  # (p+1, 3, d)
        r = table[x[0, -1], -1] + self.attn(table, x)  # (B, d)
        h = self.mlp.hidden(r)  # (B, d_mlp)
        r = r + self.mlp.W_out(h)  # (B, d)
        return self.unembed(r), h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_hidden(x)[0]


AUDITED = ("embed.weight", "attn.W_Q.weight", "attn.W_K.weight", "attn.W_V.weight",
           "attn.W_O.weight", "mlp.W_in.weight", "mlp.W_out.weight", "unembed.weight")


def init_model(cfg: ModelConfig, generator: torch.Generator, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> ModAddTransformer:
    """Nanda's init: every weight ~ N(0, 1/d_model) (unembedding 1/d_vocab), biases 0."""
    model = ModAddTransformer(cfg)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if name.endswith(".bias"):
                prm.zero_()
                continue
            fan = cfg.p + 1 if name == "unembed.weight" else cfg.d_model
            prm.copy_(torch.randn(prm.shape, generator=generator) / math.sqrt(fan))
    return model.to(device=device, dtype=dtype)


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in float64 (Nanda's high-precision loss): logits (B, p), y (B,)."""
    return F.cross_entropy(logits.to(torch.float64), y)


def forward_with_hiddens(model: ModAddTransformer,
                         x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits, [MLP activations]): the ``measure.Forward`` of this model."""
    logits, h = model.forward_with_hidden(x)
    return logits, [h]


def audited_weights(model: ModAddTransformer) -> dict[str, torch.Tensor]:
    """The weight matrices the audit sees (fused over heads), by state-dict name."""
    state = model.state_dict()
    return {name: state[name] for name in AUDITED}


@torch.no_grad()
def evaluate(model: ModAddTransformer, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy, cross-entropy) of the model on (x, y)."""
    logits = model(x)
    return float((logits.argmax(-1) == y).double().mean()), float(loss_fn(logits, y))


def reference_logits(model: ModAddTransformer, x: torch.Tensor) -> torch.Tensor:
    """The textbook per-example, all-positions computation (for tests): logits at the last
    position (B, p). Must equal ``model(x)``."""
    a = model.attn
    B, S = x.shape
    H, dh = a.n_heads, a.d_head
    resid = model.embed(x) + model.pos_embed  # (B, S, d)
    q = a.W_Q(resid).view(B, S, H, dh)  # (B, S, H, dh)
    k = a.W_K(resid).view(B, S, H, dh)
    v = a.W_V(resid).view(B, S, H, dh)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)  # (B, H, S, S)
    causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
    pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    z = torch.einsum("bhqk,bkhd->bqhd", pattern, v).reshape(B, S, H * dh)  # (B, S, H*dh)
    resid = resid + a.W_O(z)
    resid = resid + model.mlp.W_out(model.mlp.hidden(resid))  # (B, S, d)
    return model.unembed(resid)[:, -1]  # (B, p)


# ---------------------------------------------------------------- E models at once

#: the parameters of ``ModAddTransformer``, stacked over members by the ensemble trainer
STACKED_NAMES = ("embed.weight", "pos_embed", "attn.W_Q.weight", "attn.W_K.weight",
                 "attn.W_V.weight", "attn.W_O.weight", "mlp.W_in.weight", "mlp.W_in.bias",
                 "mlp.W_out.weight", "mlp.W_out.bias", "unembed.weight")


def stacked_logits(P: dict[str, torch.Tensor], x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Logits (E, B, p) at the last position of the E members on their batches x (E, B, 3):
    ``ModAddTransformer.forward`` with a leading member dimension."""
    E, B, S = x.shape
    H, dh = cfg.n_heads, cfg.d_head
    table = P["embed.weight"][:, :, None, :] + P["pos_embed"][:, None]  # (E, V, S, d)
    eq = table[:, cfg.p, S - 1]  # (E, d): the '=' token in the last slot
    q = torch.einsum("ed,efd->ef", eq, P["attn.W_Q.weight"]).view(E, H, dh)
    k_tab = torch.einsum("evsd,efd->evsf", table, P["attn.W_K.weight"])  # (E, V, S, H*dh)
    v_tab = torch.einsum("evsd,efd->evsf", table, P["attn.W_V.weight"])
    ei = torch.arange(E, device=x.device)[:, None, None]
    si = torch.arange(S, device=x.device)[None, None, :]
    k = k_tab[ei, x, si].view(E, B, S, H, dh)  # (E, B, S, H, dh)
    v = v_tab[ei, x, si].view(E, B, S, H, dh)
    scores = torch.einsum("ehd,ebshd->ebhs", q, k) / math.sqrt(dh)
    z = torch.einsum("ebhs,ebshd->ebhd", scores.softmax(-1), v).reshape(E, B, H * dh)
    r = eq[:, None] + torch.einsum("ebf,edf->ebd", z, P["attn.W_O.weight"])  # (E, B, d)
    h = F.relu(torch.einsum("ebd,emd->ebm", r, P["mlp.W_in.weight"])
               + P["mlp.W_in.bias"][:, None])  # (E, B, d_mlp)
    r = r + torch.einsum("ebm,edm->ebd", h, P["mlp.W_out.weight"]) + P["mlp.W_out.bias"][:, None]
    return torch.einsum("ebd,epd->ebp", r, P["unembed.weight"])  # (E, B, p)


def member_model(P: dict[str, torch.Tensor], e: int, cfg: ModelConfig) -> ModAddTransformer:
    """Member e as an ``nn.Module`` (a copy), for measurements."""
    m = ModAddTransformer(cfg).to(P["embed.weight"].device, P["embed.weight"].dtype)
    m.load_state_dict({n: t[e].detach() for n, t in P.items()})
    return m.requires_grad_(False)
