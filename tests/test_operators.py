"""The operator type: a user's own operator with every estimator, wrappers, directional sharpness."""

import pytest
import torch
import torch.nn.functional as F

from dynscope import (HessianOperator, MatrixOperator, Objective, Operator, OperatorWrapper, directional_sharpness,
                      hessian_trace, lambda_min, spectral_density, top_eigenvalues)
from dynscope.kernel_choice import default_chunk_size, kernel_plan, loop_footprint, probe_bytes
from dynscope.spectrum import BlockOperator, NegatedOperator
from dynscope.stability import IndexOperator, StabilityOperator
from dynscope.trace import RademacherProbes
from models import classification_data, mlp
from reference import exact_hessian


class LowRankPlusDiagonal(Operator):
    """``U diag(s) U^T + d I`` without forming the matrix: a user's own operator."""

    def __init__(self, u: torch.Tensor, s: torch.Tensor, d: float) -> None:
        self.u, self.s, self.d = u, s, d
        self.size, self.dtype, self.device = u.shape[0], u.dtype, u.device

    def _matmat(self, vectors):
        return (vectors @ self.u) * self.s @ self.u.T + self.d * vectors

    def dense(self):
        return self.u @ torch.diag(self.s) @ self.u.T + self.d * torch.eye(self.size, dtype=self.dtype)


@pytest.fixture
def user_op():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(40, 3, generator=g, dtype=torch.float64))
    return LowRankPlusDiagonal(u, torch.tensor([9.0, 4.0, -6.0], dtype=torch.float64), 0.0)


def test_a_user_operator_works_with_every_estimator_and_counts_its_matvecs(user_op):
    eig = torch.linalg.eigvalsh(user_op.dense())
    top = top_eigenvalues(user_op, which="LA", tol=1e-10, max_iter=40)
    assert top.value == pytest.approx(float(eig[-1]), rel=1e-9)
    assert user_op.num_matvecs == top.num_matvecs > 0
    before = user_op.num_matvecs
    assert lambda_min(user_op, tol=1e-10, max_iter=40).value == pytest.approx(float(eig[0]), rel=1e-9)
    assert user_op.num_matvecs > before
    # Hutch++ and XTrace are exact when the rank (3) is at most m/3, below m/2
    exact = float(eig.sum())
    assert hessian_trace(user_op, 9, method="hutch++", seed=0).value == pytest.approx(exact, abs=1e-9)
    assert hessian_trace(user_op, 8, method="xtrace", seed=0).value == pytest.approx(exact, abs=1e-9)
    # the base class's quadratic forms: z^T A z per probe and block
    probes = RademacherProbes(64, 40, seed=1)
    z = probes.rows(0, 64).double()
    forms = user_op.quadratic_forms(probes, [slice(0, 10), slice(10, 40)])
    assert torch.allclose(forms.sum(1), ((z @ user_op.dense()) * z).sum(1))
    assert torch.allclose(forms[:, 0], ((z @ user_op.dense())[:, :10] * z[:, :10]).sum(1))
    density = spectral_density(user_op, num_probes=2, num_steps=8, seed=0)
    assert density.mass() == pytest.approx(1.0)
    assert density.nodes.max() == pytest.approx(9.0, rel=1e-6)  # 8 Lanczos steps on a rank-3 matrix


def test_hutchinson_on_a_user_operator_matches_the_dense_matrix_with_the_same_probes(user_op):
    ours = hessian_trace(user_op, 16, seed=3)
    dense = hessian_trace(MatrixOperator(user_op.dense()), 16, seed=3)
    assert ours.value == pytest.approx(dense.value, rel=1e-12)
    assert ours.stderr == pytest.approx(dense.stderr, rel=1e-9)
    assert user_op.num_matvecs == 16


def test_wrappers_do_only_their_math_and_delegate_counting_and_measuring(user_op):
    A = user_op.dense()
    x = torch.randn(3, 40, dtype=torch.float64)
    scale = torch.rand(40, dtype=torch.float64) + 0.1
    shift = torch.rand(40, dtype=torch.float64)
    index = torch.tensor([1, 5, 7, 30])
    cases = [
        (NegatedOperator(user_op), -A, x),
        (BlockOperator(user_op, slice(4, 10)), A[4:10, 4:10], x[:, 4:10]),
        (IndexOperator(user_op, index), A[index][:, index], x[:, index]),
        (StabilityOperator(user_op, scale, shift), scale.sqrt()[:, None] * A * scale.sqrt() + torch.diag(shift), x),
    ]
    for op, dense, v in cases:
        count = user_op.num_matvecs
        assert isinstance(op, OperatorWrapper) and op.size == dense.shape[0]
        assert torch.allclose(op.matmat(v), v @ dense.T)
        assert op.num_matvecs == user_op.num_matvecs == count + v.shape[0]
    entered = []

    class Held(LowRankPlusDiagonal):
        def measuring(self):
            import contextlib

            @contextlib.contextmanager
            def hold():
                entered.append(True)
                yield
            return hold()

    inner = Held(user_op.u, user_op.s, user_op.d)
    with NegatedOperator(NegatedOperator(inner)).measuring():
        pass
    assert entered == [True]


def test_directional_sharpness_of_an_operator_an_objective_and_a_reduced_operator():
    torch.manual_seed(0)
    net = mlp((3, 5, 2))
    obj = Objective(net, F.cross_entropy, classification_data(8, (3,), classes=2))
    H = exact_hessian(obj).double()
    u = {n: torch.randn_like(p) for n, p in net.named_parameters()}
    flat = obj.layout.flatten(u, batch_dims=0).double()
    expected = float(flat @ H @ flat / (flat @ flat))
    assert directional_sharpness(obj, u) == pytest.approx(expected, rel=1e-5)
    op = HessianOperator(obj)
    assert directional_sharpness(op, u) == pytest.approx(expected, rel=1e-5)
    assert directional_sharpness(op, flat.float()) == pytest.approx(expected, rel=1e-5)
    assert op.num_matvecs == 2
    # a reduction over data-parallel ranks is applied to the product (here: two ranks with the
    # same batch summed, i.e. the Hessian of the summed objective): twice the sharpness
    calls = []

    def reduce(t):
        calls.append(t.shape)
        return 2 * t

    assert directional_sharpness(HessianOperator(obj, reduce=reduce), u) == pytest.approx(2 * expected, rel=1e-5)
    assert calls == [(1, obj.layout.numel)]
    assert directional_sharpness(H, flat) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="zero"):
        directional_sharpness(op, torch.zeros(obj.layout.numel))
    with pytest.raises(ValueError, match="entries"):
        directional_sharpness(op, torch.ones(3))


def test_the_default_chunk_keeps_a_batched_call_within_the_loops_footprint():
    torch.manual_seed(0)
    small = Objective(mlp((4, 6, 3)), F.cross_entropy, classification_data(12, (4,)))
    assert kernel_plan(small, 16) == ("reverse", 16)  # tiny: the whole batch within the 16 MiB floor
    big = Objective(mlp((64, 512, 512, 10)), F.cross_entropy, classification_data(2048, (64,), classes=10))
    chunk = default_chunk_size(big, 64)
    assert chunk * probe_bytes(big) <= max(loop_footprint(big), 16 * 2**20)
    assert default_chunk_size(big, 64, memory_cap=2**34) == 64  # the user raises the cap
    big._hvp_method = "reverse"  # as on an accelerator
    assert chunk == 1 and kernel_plan(big, 64) == ("loop", 64)  # one probe per call: the loop, with less memory
    assert kernel_plan(big, 64, "reverse") == ("reverse", default_chunk_size(big, 64))  # asked for: kept
