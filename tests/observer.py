"""The observer-effect check: training with dynscope callbacks gives bit-identical weights."""

from __future__ import annotations

import torch

from models import Classifier, SmallCNN, classification_data, loader, trainer


def trained_weights(callbacks, steps: int = 30, seed: int = 0, net_factory=None, **trainer_kwargs):
    """Weights after ``steps`` SGD steps of a CNN with BatchNorm and dropout, with ``callbacks``."""
    torch.manual_seed(seed)
    net = net_factory() if net_factory else SmallCNN(dropout=0.3)
    module = Classifier(net, lr=0.05, momentum=0.9)
    x, y = classification_data(160, (1, 8, 8), seed=seed)
    trainer(max_steps=steps, callbacks=list(callbacks), **trainer_kwargs).fit(module, loader(x, y, batch_size=16, shuffle=True))
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"
