"""dynscope on architectures its authors did not write: Hugging Face GPT-2 (tied embeddings, padding
mask) and BERT with tiny random configs, sequence-first LSTM/GRU taggers and the PyTorch tutorial's
Transformer LM with T == B, a ResNet with BatchNorm, an aliased module. Every metric against a float64 reference (the exact Hessian; a
per-sample loop for GSNR and the noise scale), Parameter identity after every measurement, and
bit-identical training with the diagnostics on."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from identity import Aliased, attribute_identity
from models import Classifier, Recorder, SeqFirstTagger, classification_data, loader, tagging_loss, trainer
from observer import assert_same_weights
from reference import exact_hessian
from torch import nn

from dynscope import (
    GradientMoments,
    Objective,
    gradient_noise_scale,
    gradient_snr,
    hessian_trace,
    per_sample_moments,
    top_eigenvalues,
)
from dynscope.callbacks import DynScope
from dynscope.hvp import MatrixOperator, hvp

transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed (dev extra)")
transformers.logging.set_verbosity_error()


# -- the models ---------------------------------------------------------------------------------------


def gpt2():
    config = transformers.GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def bert():
    config = transformers.BertConfig(vocab_size=11, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=12, max_position_embeddings=8, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config)


def padded_tokens(batch: int = 6, length: int = 6, vocab: int = 11, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for i in range(batch):  # right padding of varying length
        mask[i, length - i % 3 :] = 0
    return tokens, mask


def lm_loss(model, batch):
    """Per-sample next-token cross-entropy over the non-padded positions."""
    tokens, mask = batch[0], batch[1]
    logits = model(input_ids=tokens, attention_mask=mask).logits[:, :-1]
    losses = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    weight = mask[:, 1:].to(losses.dtype)
    return (losses * weight).sum(1) / weight.sum(1)


def classification_loss(model, batch):
    tokens, mask, labels = batch
    return F.cross_entropy(model(input_ids=tokens, attention_mask=mask).logits, labels, reduction="none")


class TransformerLM(nn.Module):
    """The PyTorch tutorial's language model: sequence-first nn.TransformerEncoder, batch-first data."""

    def __init__(self, vocab: int = 7, dim: int = 4, heads: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=6, dropout=0.0)  # batch_first=False
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.decoder = nn.Linear(dim, vocab)

    def forward(self, tokens):  # [B, T] -> [B, T, vocab]
        h = self.embed(tokens.T)
        mask = nn.Transformer.generate_square_subsequent_mask(h.shape[0], dtype=h.dtype)
        return self.decoder(self.encoder(h, mask=mask, is_causal=True)).transpose(0, 1)


def next_token_loss(model, batch):
    tokens = batch[0]
    logits = model(tokens)[:, :-1]
    return F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none").mean(1)


class Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResNet(nn.Module):
    def __init__(self, channels: int = 3, classes: int = 3, dropout: float = 0.0):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())
        self.block = Block(channels)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        return self.fc(self.drop(self.block(self.stem(x)).mean((2, 3))))


def resnet_loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _cases():
    torch.manual_seed(0)
    tokens, mask = padded_tokens()
    labels = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(1))
    tags_tokens = torch.randint(0, 7, (5, 5), generator=torch.Generator().manual_seed(2))  # T == B
    tags = torch.randint(0, 3, (5, 5), generator=torch.Generator().manual_seed(3))
    images, image_labels = classification_data(6, (1, 4, 4), seed=4)
    aliased_x, aliased_y = classification_data(6, (4,), seed=5)
    # (model, sample_loss_fn, batch, parameters measured by the exact Hessian)
    return {
        "gpt2": (gpt2(), lm_loss, (tokens, mask),
                 ["transformer.wte.weight", "transformer.h.0.ln_2.weight", "transformer.h.0.mlp.c_proj.bias"]),
        "bert": (bert(), classification_loss, (tokens, mask, labels),
                 ["bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.output.dense.bias", "classifier.weight"]),
        "lstm": (SeqFirstTagger(nn.LSTM, dim=3, hidden=4), tagging_loss, (tags_tokens, tags), None),
        "gru": (SeqFirstTagger(nn.GRU, dim=3, hidden=4), tagging_loss, (tags_tokens, tags), None),
        "transformer_lm": (TransformerLM(), next_token_loss, (tags_tokens,),
                           ["embed.weight", "encoder.layers.0.linear2.weight", "decoder.bias"]),
        "resnet": (ResNet(), resnet_loss, (images, image_labels), ["block.conv2.weight", "block.bn2.weight", "fc.weight"]),
        "aliased": (Aliased(), lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"), (aliased_x, aliased_y), None),
    }


CASES = _cases()


@pytest.fixture(params=sorted(CASES))
def case(request):
    model, loss, batch, names = CASES[request.param]
    model = copy.deepcopy(model).double().eval()
    batch = tuple(t.double() if t.is_floating_point() else t for t in batch)
    return request.param, model, loss, batch, names


def loop_moments(model, sample_loss, batch, names):
    """float64 per-sample gradients by a plain loop over batches of one sample."""
    params = [p for n, p in model.named_parameters() if n in names]
    out = {n: [] for n in names}
    for i in range(batch[0].shape[0]):
        grads = torch.autograd.grad(sample_loss(model, tuple(t[i : i + 1] for t in batch))[0], params, allow_unused=True)
        for n, p, g in zip(names, params, grads):
            out[n].append(torch.zeros_like(p) if g is None else g)
    return GradientMoments.from_samples({n: torch.stack(v) for n, v in out.items()})


# -- the metrics against float64 references -----------------------------------------------------------


def test_curvature_matches_the_exact_hessian(case):
    kind, model, loss, batch, names = case
    before = attribute_identity(model)
    obj = Objective(model, sample_loss_fn=loss, batch=batch, param_names=names)
    H = exact_hessian(obj)
    assert torch.allclose(H, H.T, atol=1e-9)
    v = torch.randn(obj.layout.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    Hv = obj.layout.flatten(hvp(obj, obj.layout.unflatten(v)), batch_dims=0)
    assert torch.allclose(Hv, H @ v, rtol=1e-8, atol=1e-10 * float(H.abs().max()))
    # Hutchinson with the same probes on the operator and on the exact matrix: the same estimate
    ours = hessian_trace(obj, num_matvecs=8, seed=3)
    exact = hessian_trace(MatrixOperator(H, obj.layout), num_matvecs=8, seed=3)
    assert math.isclose(ours.value, exact.value, rel_tol=1e-8, abs_tol=1e-10 * float(H.abs().max()))
    eigenvalues = torch.linalg.eigvalsh(H)
    top = eigenvalues[eigenvalues.abs().argmax()]
    assert math.isclose(top_eigenvalues(obj, tol=1e-10, max_iter=300).value, float(top), rel_tol=1e-6)
    assert attribute_identity(model) == before, kind


def test_gradient_noise_matches_a_per_sample_loop(case):
    kind, model, loss, batch, _ = case
    before = attribute_identity(model)
    obj = Objective(model, sample_loss_fn=loss, batch=batch)
    names = list(obj.params)
    ref = loop_moments(model, loss, batch, names)
    fast = per_sample_moments(obj)
    assert attribute_identity(model) == before, kind
    for name in names:
        assert torch.allclose(fast.mean[name], ref.mean[name], rtol=1e-9, atol=1e-13), (kind, name)
        assert torch.allclose(fast.sq_dev[name], ref.sq_dev[name], rtol=1e-8, atol=1e-13), (kind, name)
    got, want = gradient_snr(fast), gradient_snr(ref)
    assert got.num_coordinates == want.num_coordinates
    assert math.isclose(got.value, want.value, rel_tol=1e-8)
    assert math.isclose(gradient_noise_scale(fast).value, gradient_noise_scale(ref).value, rel_tol=1e-8)
    if kind in ("lstm", "gru"):  # the embedding and the head see [T, B, ...] with T == B
        assert fast.methods["embed.weight"] == fast.methods["head.weight"] == "hooks"
    if kind == "transformer_lm":  # so do the embedding, the feed-forward layers and the decoder
        assert {n for n, m in fast.methods.items() if m == "hooks"} >= {
            "embed.weight", "encoder.layers.0.linear1.weight", "encoder.layers.0.linear2.weight", "decoder.weight"}
    if kind == "gpt2":  # the tied embedding is held by two modules: not hooked
        assert fast.methods["transformer.wte.weight"] != "hooks"


# -- training is untouched ----------------------------------------------------------------------------


class LM(Classifier):
    """GPT-2 with a padding mask as a LightningModule; dynscope gets per-sample losses from dynscope_loss."""

    def __init__(self):
        super().__init__(gpt2(), lr=0.05, momentum=0.9)
        del self.criterion

    def forward(self, batch):
        return self.net(input_ids=batch[0], attention_mask=batch[1]).logits

    def dynscope_loss(self, batch):
        return lm_loss(self.net, batch)

    def dynscope_logits(self, batch):
        tokens, mask = batch
        keep = mask[:, 1:].bool()
        return self(batch)[:, :-1][keep], tokens[:, 1:][keep]

    def training_step(self, batch, batch_idx):
        return self.dynscope_loss(batch).mean()


class TaggingModule(Classifier):
    """The sequence-first GRU tagger as a LightningModule (per-sample losses from dynscope_loss)."""

    def __init__(self):
        super().__init__(SeqFirstTagger(nn.GRU, dim=3, hidden=4), lr=0.05, momentum=0.9)
        del self.criterion

    def dynscope_loss(self, batch):
        return tagging_loss(self.net, batch)

    def dynscope_logits(self, batch):
        return self.net(batch[0]).reshape(-1, 3), batch[1].reshape(-1)

    def training_step(self, batch, batch_idx):
        return self.dynscope_loss(batch).mean()


def _fit(module, data, callbacks, steps=6):
    trainer(max_steps=steps, callbacks=callbacks, logger=Recorder()).fit(module, data)
    return module


def _scope():
    return DynScope(budget=None, strict=True, curvature={"every_n_steps": 2, "num_matvecs": 2, "eigen_max_iter": 3},
                    noise={"every_n_steps": 2}, collapse={"every_n_steps": 2}, regions=False)


@pytest.mark.parametrize("kind", ["aliased", "gpt2", "gru", "resnet"])
def test_training_with_every_diagnostic_is_bit_identical_and_keeps_the_parameters(kind):
    def build():
        torch.manual_seed(0)
        if kind == "aliased":
            x, y = classification_data(48, (4,), seed=0)
            return Classifier(Aliased(), lr=0.05, momentum=0.9), loader(x, y, batch_size=8)
        if kind == "resnet":  # BatchNorm statistics and dropout masks must come out the same too
            x, y = classification_data(48, (1, 4, 4), seed=0)
            return Classifier(ResNet(dropout=0.3), lr=0.05, momentum=0.9), loader(x, y, batch_size=8, shuffle=True)
        if kind == "gru":  # sequence-first inside, T == B
            tokens, tags = torch.randint(0, 7, (30, 6)), torch.randint(0, 3, (30, 6))
            return TaggingModule(), loader(tokens, tags, batch_size=6)
        tokens, mask = padded_tokens(batch=24, length=6)
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens, mask), batch_size=6)
        return LM(), data

    plain, data = build()
    _fit(plain, data, [])
    measured, data = build()
    params = {n: p for n, p in measured.named_parameters()}
    identity = attribute_identity(measured)
    recorder = Recorder()
    trainer(max_steps=6, callbacks=[_scope()], logger=recorder).fit(measured, data)
    assert_same_weights(plain.state_dict(), measured.state_dict())
    assert attribute_identity(measured) == identity
    assert all(p is params[n] and type(p) is nn.Parameter for n, p in measured.named_parameters())
    assert {"dynscope/noise/gsnr", "dynscope/curvature/hessian_trace"} <= set(recorder.scalars)
    assert all(math.isfinite(v) for _, v in recorder.scalars["dynscope/noise/gsnr"])
    copy.deepcopy(measured)
    torch.save(measured.state_dict(), io.BytesIO())


def test_per_sample_gradients_of_models_vmap_cannot_trace():
    from dynscope import per_sample_grads

    model, loss, batch, _ = CASES["bert"]
    model = copy.deepcopy(model).double().eval()
    obj = Objective(model, sample_loss_fn=loss, batch=batch)
    names = list(obj.params)
    grads = per_sample_grads(obj, chunk_size=4)
    ref = loop_moments(model, loss, batch, names)
    got = GradientMoments.from_samples(grads)
    for name in names:
        assert grads[name].shape == (6, *obj.params[name].shape)
        assert torch.allclose(got.mean[name], ref.mean[name], rtol=1e-9, atol=1e-13), name
        assert torch.allclose(got.sq_dev[name], ref.sq_dev[name], rtol=1e-8, atol=1e-13), name
