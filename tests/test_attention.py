"""AttentionLogits: attention-logit and entropy statistics against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pytorch_lightning as pl
from models import Classifier, Recorder, TinyTransformer, classification_data, loader, mlp, trainer
from observer import assert_same_weights

from dynscope.attention import attention_logits, capture_attention, logit_stats, qk_stats, summarize
from dynscope.callbacks import AttentionLogits

transformers = pytest.importorskip("transformers")


def entropy_of(probs: torch.Tensor) -> torch.Tensor:
    """Row entropies from probabilities (0 log 0 = 0), float64."""
    p = probs.double()
    return -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(-1)


def test_logit_stats_by_hand():
    logits = torch.tensor([[[[0.0, 0.0, 5.0], [2.0, -4.0, 1.0]]]])
    valid = torch.tensor([[True, True, False], [True, True, True]])
    s = logit_stats(logits, valid)
    p2 = torch.softmax(torch.tensor([2.0, -4.0, 1.0], dtype=torch.float64), 0)
    h = [math.log(2), float(-(p2 * p2.log()).sum())]
    assert float(s.max_logit) == 4.0  # 5.0 is masked
    assert float(s.entropy_min) == pytest.approx(min(h), rel=1e-6)
    assert float(s.entropy_mean) == pytest.approx(sum(h) / 2, rel=1e-6)


def test_multihead_attention_against_its_own_weights_and_a_hand_projection():
    torch.manual_seed(0)
    e, h, b, t = 8, 2, 3, 5
    mha = nn.MultiheadAttention(e, h, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.mul_(4)  # larger logits
    x = torch.randn(b, t, e)
    pad = torch.zeros(b, t, dtype=torch.bool)
    pad[1, 3:] = True
    with torch.no_grad(), capture_attention(mha) as found:
        _, weights = mha(x, x, x, key_padding_mask=pad, need_weights=True, average_attn_weights=False)
    s = found[""]
    # hand computation: q, k per head from the packed projection, masked keys left out
    w, bias = mha.in_proj_weight.detach().double(), mha.in_proj_bias.detach().double()
    xd = x.double()
    d = e // h
    for head in range(h):
        rows = slice(head * d, (head + 1) * d)
        q = xd @ w[:e][rows].T + bias[:e][rows]
        k = xd @ w[e : 2 * e][rows].T + bias[e : 2 * e][rows]
        logits = q @ k.transpose(1, 2) / math.sqrt(d)  # [b, t, t]
        keep = (~pad)[:, None, :].expand_as(logits)
        assert float(s.max_logit[head]) == pytest.approx(float(logits.abs()[keep].max()), rel=1e-5)
        ent = entropy_of(weights[:, head])  # torch's own attention probabilities
        assert float(s.entropy_min[head]) == pytest.approx(float(ent.min()), rel=1e-4, abs=1e-6)
        assert float(s.entropy_mean[head]) == pytest.approx(float(ent.mean()), rel=1e-4)
    assert s.rows.tolist() == [b * t] * h


def test_multihead_attention_fast_path_and_causal_mask_are_seen():
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(8, 4, batch_first=True).eval()  # eval + no_grad: torch's fused fast path
    x = torch.randn(2, 6, 8)
    causal = nn.Transformer.generate_square_subsequent_mask(6)  # float -inf above the diagonal
    with torch.no_grad():
        found = attention_logits(mha, lambda: mha(x, x, x, attn_mask=causal, need_weights=False))
        _, weights = mha(x, x, x, attn_mask=causal, need_weights=True, average_attn_weights=False)
    s = found[""]
    ent = entropy_of(weights)[:, :, 1:]  # the first query sees one key: left out
    assert torch.allclose(s.entropy_mean, ent.mean((0, 2)), rtol=1e-4)
    assert torch.allclose(s.entropy_min, ent.amin((0, 2)), rtol=1e-4)
    assert s.rows.tolist() == [2 * 5] * 4


class SDPABlock(nn.Module):
    """A hand-written causal attention block calling F.scaled_dot_product_attention."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        b, t, e = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.7).transpose(1, 2).reshape(b, t, e)


def test_scaled_dot_product_attention_with_causal_mask_and_scale():
    torch.manual_seed(2)
    model = nn.Sequential(SDPABlock(), nn.Linear(8, 3))
    x = torch.randn(4, 5, 8) * 3
    found = attention_logits(model, lambda: model(x))
    assert list(found) == ["0"] and found["0"].kind == "scaled_dot_product_attention"
    q, k, _ = model[0].qkv(x).detach().double().reshape(4, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) * 0.7
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    probs = torch.softmax(logits.masked_fill(~causal, -math.inf), -1)
    for head in range(2):
        assert float(found["0"].max_logit[head]) == pytest.approx(float(logits[:, head].abs()[:, causal].max()), rel=1e-5)
        ent = entropy_of(probs[:, head])[:, 1:]  # rows with at least two keys
        assert float(found["0"].entropy_mean[head]) == pytest.approx(float(ent.mean()), rel=1e-4)
    # a boolean mask and grouped-query attention take SDPA's conventions
    mask = torch.rand(4, 1, 5, 5) > 0.3
    mask[..., 0] = True
    kk = k[:, :1]  # one key head for two query heads
    s = qk_stats(q, kk.expand_as(q), mask)
    ref = (q @ kk.transpose(-1, -2) / 2.0).abs().masked_fill(~mask, -1).amax((0, 2, 3))
    assert torch.allclose(s.max_logit, ref, rtol=1e-5)


def gpt2(impl: str, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=4,
                                     attn_implementation=impl, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hugging_face_gpt2_layer_against_a_hand_computation(impl):
    model = gpt2(impl)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(5)
    x = torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(0))
    inputs = {}
    hook = model.transformer.h[0].attn.register_forward_hook(lambda m, a, kw, out: inputs.update(h=a[0] if a else kw["hidden_states"]), with_kwargs=True)
    found = attention_logits(model, lambda: model(x))
    hook.remove()
    assert list(found) == ["transformer.h.0.attn", "transformer.h.1.attn"]
    attn = model.transformer.h[0].attn
    with torch.no_grad():
        q, k, _ = attn.c_attn(inputs["h"]).double().split(16, dim=2)
    q, k = (t.reshape(3, 9, 4, 4).transpose(1, 2) for t in (q, k))
    logits = q @ k.transpose(-1, -2) / 2.0  # sqrt(head_dim = 4)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    probs = torch.softmax(logits.masked_fill(~causal, -math.inf), -1)
    s = found["transformer.h.0.attn"]
    for head in range(4):
        assert float(s.max_logit[head]) == pytest.approx(float(logits[:, head][:, causal].abs().max()), rel=1e-4)
        ent = entropy_of(probs[:, head])[:, 1:]
        assert float(s.entropy_mean[head]) == pytest.approx(float(ent.mean()), rel=1e-4)
        assert float(s.entropy_min[head]) == pytest.approx(float(ent.min()), rel=1e-4)


def test_hugging_face_bert_with_padding_against_its_attention_probabilities():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, attn_implementation="eager")
    model = transformers.BertModel(config).eval()
    x = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 4:] = 0
    found = attention_logits(model, lambda: model(input_ids=x, attention_mask=mask))
    with torch.no_grad():
        probs = model(input_ids=x, attention_mask=mask, output_attentions=True).attentions
    assert list(found) == [f"encoder.layer.{i}.attention.self" for i in range(2)]
    for layer, p in zip(found.values(), probs):
        ent = entropy_of(p)  # [B, H, T]
        assert torch.allclose(layer.entropy_mean, ent.mean((0, 2)), rtol=1e-4)
        assert torch.allclose(layer.entropy_min, ent.amin((0, 2)), rtol=1e-4)
    assert float(found["encoder.layer.0.attention.self"].entropy_min.max()) <= math.log(7) + 1e-5


class LMModule(pl.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def test_callback_on_gpt2_inside_lightning_logs_per_layer_and_head():
    module = LMModule(gpt2("sdpa"))
    module.model.train()
    data = torch.randint(0, 40, (32, 8), generator=torch.Generator().manual_seed(0))
    recorder = Recorder()
    callback = AttentionLogits(every_n_steps=2, per_head=True)
    trainer(max_steps=4, callbacks=[callback], logger=recorder).fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    tags = set(recorder.scalars)
    assert {"dynscope/attention/max_logit", "dynscope/attention/entropy_min", "dynscope/attention/entropy_mean"} <= tags
    assert "dynscope/attention/max_logit/model.transformer.h.1.attn" in tags
    assert "dynscope/attention/head_max_logit/model.transformer.h.0.attn.h3" in tags
    assert [s for s, _ in recorder.scalars["dynscope/attention/max_logit"]] == [1, 2, 4]  # the schedule also measures the first step
    # the logged value is the measurement on the last batch at the final weights
    last = data[24:32]
    module.eval()  # the callback measures in eval mode (dropout off)
    expected = summarize(attention_logits(module, lambda: module.model(input_ids=last)))
    assert recorder.scalars["dynscope/attention/max_logit"][-1][1] == pytest.approx(expected["max_logit"], rel=1e-5)


def test_measuring_attention_leaves_training_bit_identical():
    def run(callbacks):
        torch.manual_seed(0)
        module = Classifier(TinyTransformer(dropout=0.2), lr=0.1, momentum=0.9)
        x, y = classification_data(64, (5,), vocab=11)
        trainer(max_steps=12, callbacks=callbacks).fit(module, loader(x, y, shuffle=True))
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    assert_same_weights(run([]), run([AttentionLogits(every_n_steps=1, per_head=True, mode="train")]))


def test_a_model_without_attention_warns_and_logs_nothing():
    recorder = Recorder()
    x, y = classification_data(32)
    callback = AttentionLogits(every_n_steps=1)
    with pytest.warns(RuntimeWarning, match="no attention layer"):
        trainer(max_steps=2, callbacks=[callback], logger=recorder).fit(Classifier(mlp()), loader(x, y))
    assert not any(t.startswith("dynscope/attention") for t in recorder.scalars)
    assert callback.disabled and callback.num_measurements == 1  # switched off after the first look


def test_inside_dynscope_as_an_extra_diagnostic():
    from dynscope.callbacks import DynScope, OutputLogits

    recorder = Recorder()
    scope = DynScope(budget=None, curvature=False, noise=False, collapse=False, regions=False,
                     extra={"attention": AttentionLogits(every_n_steps=2), "logits": OutputLogits(every_n_steps=2)})
    x, y = classification_data(32, (5,), vocab=11)
    trainer(max_steps=4, callbacks=[scope], logger=recorder).fit(Classifier(TinyTransformer()), loader(x, y))
    assert [s for s, _ in recorder.scalars["dynscope/attention/max_logit/net.attn"]] == [1, 2, 4]
    assert [s for s, _ in recorder.scalars["dynscope/logits/log_z_mean"]] == [1, 2, 4]
