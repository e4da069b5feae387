"""Tiny models and Lightning modules shared by the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import pytorch_lightning as pl
from pytorch_lightning.loggers.logger import Logger


def mlp(sizes=(4, 8, 3), act=nn.ReLU, dropout: float = 0.0) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """Conv-BatchNorm-ReLU-pool-Linear on 1x8x8 images."""

    def __init__(self, channels: int = 4, classes: int = 3, dropout: float = 0.0):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(channels * 4 * 4, classes)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc(self.drop(h.flatten(1)))


class TinyTransformer(nn.Module):
    """Embedding, one pre-LN attention block (nn.MultiheadAttention), GELU MLP, mean-pool head."""

    def __init__(self, vocab: int = 11, dim: int = 8, heads: int = 2, seq: int = 5, classes: int = 3, dropout=0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(seq, dim) * 0.1)
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True, dropout=dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        a = self.ln1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.ff(self.ln2(h))
        return self.head(h.mean(1))


class _Encoder(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, h):
        return self.rnn(h)[0]


class SeqFirstTagger(nn.Module):
    """Batch-first data, sequence-first inside: the Embedding and the head see ``[T, B, ...]``."""

    def __init__(self, rnn=nn.LSTM, vocab: int = 7, dim: int = 4, hidden: int = 5, tags: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.encoder = _Encoder(rnn(dim, hidden))  # one level down: no batch_first on the tagger's children
        self.head = nn.Linear(hidden, tags)

    def forward(self, tokens):  # [B, T] -> [B, T, tags]
        return self.head(self.encoder(self.embed(tokens.T))).transpose(0, 1)


def tagging_loss(model, batch):
    tokens, tags = batch
    logits = model(tokens)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tags.reshape(-1), reduction="none").view(tags.shape).mean(1)


class Classifier(pl.LightningModule):
    """A LightningModule around any network, with cross-entropy and SGD."""

    def __init__(self, net: nn.Module, lr: float = 0.05, momentum: float = 0.0, optimizer: str = "sgd"):
        super().__init__()
        self.net = net
        self.lr = lr
        self.momentum = momentum
        self.optimizer_name = optimizer
        self.criterion = nn.CrossEntropyLoss()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.criterion(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def classification_data(n: int = 64, shape=(4,), classes: int = 3, seed: int = 0, vocab: int | None = None):
    g = torch.Generator().manual_seed(seed)
    if vocab is not None:
        x = torch.randint(0, vocab, (n, *shape), generator=g)
    else:
        x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


# The kernels' test models (tests/test_hvp.py, and on a GPU tests/test_gpu.py): a model and its batch.
KERNEL_CASES = {
    "mlp": lambda: (mlp((4, 6, 3)), classification_data(12, (4,))),
    "cnn-batchnorm": lambda: (SmallCNN(channels=2), classification_data(6, (1, 8, 8))),
    "transformer": lambda: (TinyTransformer(dim=4, heads=2), classification_data(6, (5,), vocab=11)),
    "mlp-dropout": lambda: (mlp((4, 6, 3), dropout=0.5), classification_data(12, (4,))),
}


def kernel_case(name: str, device="cpu", dtype=None):
    """``(model, batch)`` of :data:`KERNEL_CASES` (seeded), moved to ``device``; float tensors to ``dtype``."""
    torch.manual_seed(0)
    model, batch = KERNEL_CASES[name]()
    model = model.to(device=device, dtype=dtype)
    batch = tuple(t.to(device=device, dtype=dtype if t.is_floating_point() else None) for t in batch)
    return model, batch


def loader(x, y, batch_size: int = 16, shuffle: bool = False):
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle)


def trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, deterministic=True,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


class Recorder(Logger):
    """A logger that keeps everything it is sent: ``scalars[tag] = [(step, value), ...]``, ``rows``
    (one ``(step, metrics)`` per call) and ``texts`` (a stand-in for TensorBoard's writer)."""

    name, version = "recorder", 0

    def __init__(self):
        super().__init__()
        self.scalars, self.rows, self.texts = {}, [], []

    @property
    def experiment(self):
        return self

    def add_text(self, tag, text, global_step=None):
        self.texts.append((tag, text, global_step))

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))
        for k, v in metrics.items():
            self.scalars.setdefault(k, []).append((step, v))

    def log_hyperparams(self, *args, **kwargs):
        pass
