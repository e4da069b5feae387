"""Models that hold a tensor under several names, and a fingerprint of what every module attribute holds."""

from __future__ import annotations

from torch import nn


def attribute_identity(model: nn.Module):
    """``(module, kind, attribute) -> (id, type)`` of every parameter and buffer slot of every module.

    Measuring must leave this exactly as it was: the same objects (not equal copies, not plain
    tensors in place of Parameters, no functorch wrappers).
    """
    out = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for kind, store in (("param", module._parameters), ("buffer", module._buffers)):
            for attr, t in store.items():
                out[(name, kind, attr)] = (id(t), type(t))
        for k, t in enumerate(getattr(module, "_flat_weights", ())):  # nn.LSTM/GRU's weight cache
            out[(name, "flat", k)] = (id(t), type(t))
    return out


class Aliased(nn.Module):
    """``self.head = self.body.fc``: one Linear (and its BatchNorm neighbour) reachable under two names."""

    def __init__(self, d_in: int = 4, hidden: int = 6, classes: int = 3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.Tanh())
        self.body.fc = nn.Linear(hidden, classes)
        self.head = self.body.fc
        self.norm = self.body[1]

    def forward(self, x):
        return self.head(self.body[2](self.norm(self.body[0](x))))


class TiedLM(nn.Module):
    """Token embedding tied to the output projection (GPT-2 style) and a shared block used twice."""

    def __init__(self, vocab: int = 7, dim: int = 5):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.block = nn.Sequential(nn.Linear(dim, dim), nn.Tanh())
        self.blocks = nn.ModuleList([self.block, self.block])
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, tokens):  # [B, T] -> logits of the next token, [B, vocab]
        h = self.wte(tokens).mean(1)
        for block in self.blocks:
            h = h + block(h)
        return self.lm_head(h)
