import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynscope import NonFiniteError, NotPerSampleError, Objective
from models import SmallCNN, TinyTransformer, classification_data, mlp


def test_loss_equals_the_models_own_loss():
    torch.manual_seed(0)
    net = mlp((4, 8, 3))
    x, y = classification_data(16, (4,))
    obj = Objective(net, F.cross_entropy, (x, y))
    assert torch.allclose(obj.value(), F.cross_entropy(net(x), y))


@pytest.mark.parametrize("loss_fn", [F.cross_entropy, nn.CrossEntropyLoss(), lambda o, t: F.cross_entropy(o, t)])
def test_sample_losses_match_a_per_sample_loop(loss_fn):
    torch.manual_seed(0)
    net = mlp((4, 8, 3))
    x, y = classification_data(10, (4,))
    obj = Objective(net, loss_fn, (x, y))
    expected = torch.stack([F.cross_entropy(net(x[i : i + 1]), y[i : i + 1]) for i in range(10)])
    assert torch.allclose(obj.sample_losses(), expected, atol=1e-6)


def test_mse_sample_losses_average_the_feature_dims():
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    obj = Objective(net, F.mse_loss, (x, y))
    expected = ((net(x) - y) ** 2).mean(1)
    assert torch.allclose(obj.sample_losses(), expected, atol=1e-6)
    assert torch.allclose(obj.sample_losses().mean(), obj.value(), atol=1e-6)


def test_gradient_matches_autograd_and_leaves_grad_untouched():
    torch.manual_seed(0)
    net = SmallCNN(dropout=0.5)
    x, y = classification_data(8, (1, 8, 8))
    obj = Objective(net, F.cross_entropy, (x, y))
    grads = obj.gradient()
    assert all(p.grad is None for p in net.parameters())
    net.eval()
    F.cross_entropy(net(x), y).backward()
    for name, p in net.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-6), name


def test_measuring_restores_modes_buffers_and_rng():
    torch.manual_seed(0)
    net = SmallCNN(dropout=0.5).train()
    x, y = classification_data(8, (1, 8, 8))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    for mode in ("eval", "train"):
        obj = Objective(net, F.cross_entropy, (x, y), mode=mode)
        obj.value(), obj.gradient(), obj.sample_losses()
    assert net.training and all(m.training for m in net.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_train_mode_uses_batch_statistics():
    torch.manual_seed(0)
    net = SmallCNN()
    x, y = classification_data(8, (1, 8, 8))
    net.train()
    expected = F.cross_entropy(net(x), y)  # updates the real running stats: fine, we compare losses
    obj = Objective(net, F.cross_entropy, (x, y), mode="train")
    assert torch.allclose(obj.value(), expected, atol=1e-6)


def test_sample_loss_fn_for_other_batch_structures():
    torch.manual_seed(0)
    net = TinyTransformer()
    tokens, y = classification_data(6, (5,), vocab=11)
    batch = {"tokens": tokens, "label": y}
    obj = Objective(net, batch=batch, sample_loss_fn=lambda m, b: F.cross_entropy(m(b["tokens"]), b["label"], reduction="none"))
    assert obj.batch_size == 6
    assert torch.allclose(obj.value(), F.cross_entropy(net.eval()(tokens), y), atol=1e-6)


def test_forward_fn_for_dict_inputs():
    net = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    obj = Objective(net, F.cross_entropy, ({"input": x}, y), forward_fn=lambda m, inp: m(inp["input"]))
    assert torch.allclose(obj.value(), F.cross_entropy(net(x), y))


def test_batch_level_loss_is_reported_as_not_per_sample():
    net = nn.Linear(3, 1)
    batch = (torch.randn(4, 3), torch.randn(4, 1))
    obj = Objective(net, batch=batch, sample_loss_fn=lambda m, b: F.mse_loss(m(b[0]), b[1]))
    assert torch.isfinite(obj.value())
    with pytest.raises(NotPerSampleError, match="per-sample"):
        obj.sample_losses()


def test_bad_input_gives_clear_errors():
    net = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="empty"):
        Objective(net, F.cross_entropy, (torch.randn(0, 3), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"\(inputs, targets\)"):
        Objective(net, F.cross_entropy, torch.randn(4, 3))
    with pytest.raises(ValueError, match="loss_fn"):
        Objective(net, batch=(torch.randn(4, 3), torch.zeros(4)))
    x = torch.randn(4, 3)
    x[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="loss"):
        Objective(net, F.cross_entropy, (x, torch.zeros(4, dtype=torch.long))).value()
    frozen = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Objective(frozen, F.cross_entropy, (torch.randn(4, 3), torch.zeros(4, dtype=torch.long)))


def test_measuring_restores_modes_that_the_measured_code_changed():
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).eval()
    obj = Objective(net, F.mse_loss, (torch.randn(4, 2), torch.randn(4, 2)))  # measures in eval: no switch
    with obj.measuring():
        net.train()  # e.g. a dynscope_loss that calls model.train()
    assert not any(m.training for m in net.modules())


@pytest.mark.parametrize("kind", ["aliased", "tied"])
def test_every_measurement_leaves_every_attribute_the_same_object(kind):
    # functional_call(tie_weights=True) used to leave plain tensors (or functorch wrappers) in the
    # second slot of a tensor held twice: the optimizer then updated orphaned Parameters
    import copy

    from identity import Aliased, TiedLM, attribute_identity

    from dynscope import hessian_trace, local_complexity, per_sample_grads, per_sample_moments, top_eigenvalues
    from dynscope.hvp import hvp

    torch.manual_seed(0)
    if kind == "aliased":
        net, (x, y) = Aliased().eval(), classification_data(8, (4,))
    else:
        net, (x, y) = TiedLM(), classification_data(8, (3,), classes=7, vocab=7)
    before = attribute_identity(net)
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    steps = {
        "value": lambda o: o.value(),
        "gradient": lambda o: o.gradient(),
        "sample_losses": lambda o: o.sample_losses(),
        "hvp": lambda o: hvp(o, o.gradient()),
        "trace": lambda o: hessian_trace(o, num_matvecs=4, seed=0),
        "eigen": lambda o: top_eigenvalues(o, max_iter=5),
        "moments": lambda o: per_sample_moments(o),
        "moments_vmap": lambda o: per_sample_moments(o, "vmap"),
        "per_sample_grads": lambda o: per_sample_grads(o, chunk_size=3),
    }
    if kind == "aliased":
        steps["local_complexity"] = lambda o: local_complexity(net, x, 0.1, num_directions=2)
    for mode in ("eval", "train"):
        for what, step in steps.items():
            if mode == "train" and what.startswith(("moments", "per_sample")) and kind == "aliased":
                continue  # BatchNorm in train mode has no per-sample gradients
            step(Objective(net, F.cross_entropy, (x, y), mode=mode))
            assert attribute_identity(net) == before, f"{what} ({mode}) replaced a module attribute"
    for n, p in net.named_parameters():
        assert type(p) is nn.Parameter and torch.equal(p, params[n]), n
    copy.deepcopy(net)  # a leaked functorch wrapper cannot be deep-copied
    torch.save(net.state_dict(), __import__("io").BytesIO())
