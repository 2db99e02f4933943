"""Batch-shaping and L0 losses against independent numpy/scipy references."""
import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from mmgated.models import BatchShapingLoss, GateL0Loss
from mmgated.models.losses import PRIORS, Prior, build_prior


def reference_batch_shaping(x, cdf):
    """Eq. (2) with lambda = 1, summed over the features (columns)."""
    x = np.sort(np.asarray(x, dtype=np.float64), axis=0)
    n = x.shape[0]
    target = np.arange(1, n + 1)[:, None] / (n + 1)
    return float(np.sum(np.mean((target - cdf(x))**2, axis=0)))


PRIOR_CASES = [
    (dict(type='beta', a=0.6, b=0.4), lambda x: stats.beta.cdf(x, 0.6, 0.4),
     lambda n, c: np.random.rand(n, c)),
    (dict(type='beta', a=2.0, b=5.0), lambda x: stats.beta.cdf(x, 2.0, 5.0),
     lambda n, c: np.random.rand(n, c)),
    (dict(type='gaussian', mean=0.5, std=2.0),
     lambda x: stats.norm.cdf(x, 0.5, 2.0), lambda n, c: np.random.randn(
         n, c) * 3),
    (dict(type='uniform', low=-1.0, high=3.0),
     lambda x: stats.uniform.cdf(x, -1.0, 4.0),
     lambda n, c: np.random.rand(n, c) * 4 - 1),
]


@pytest.mark.parametrize('prior,cdf,sample', PRIOR_CASES)
def test_batch_shaping_matches_reference(prior, cdf, sample):
    np.random.seed(0)
    x = sample(37, 5)
    loss = BatchShapingLoss(prior=prior, loss_weight=0.3)
    value = loss(torch.tensor(x, dtype=torch.float64)).item()
    assert value == pytest.approx(
        0.3 * reference_batch_shaping(x, cdf), rel=1e-5, abs=1e-9)


def test_gradient_is_routed_back_through_the_sort():
    torch.manual_seed(0)
    n, c = 9, 3
    x = torch.rand(n, c, dtype=torch.float64, requires_grad=True)
    BatchShapingLoss(loss_weight=1.0)(x).backward()
    # Analytic gradient: the sample of rank i gets
    # -2 / N * (i / (N + 1) - F(x)) * f(x) at its original position.
    xs = x.detach().numpy()
    ranks = xs.argsort(0).argsort(0) + 1
    expected = -2 / n * (ranks / (n + 1) - stats.beta.cdf(
        xs, 0.6, 0.4)) * stats.beta.pdf(xs, 0.6, 0.4)
    np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-6)


def test_beta_pdf_is_scipys_on_eps_to_one_minus_eps():
    """BetaPrior.pdf, the derivative the CDF's backward uses, is scipy's
    pdf of x clamped to [eps, 1 - eps], also at and beyond the support's
    ends; and the CDF's gradient is that pdf."""
    prior = build_prior(dict(type='beta', a=0.6, b=0.4, eps=1e-6))
    x = torch.tensor([-0.5, 0.0, 1e-8, 0.3, 0.999, 1.0, 1.5],
                     dtype=torch.float64)
    expected = stats.beta.pdf(np.clip(x.numpy(), 1e-6, 1 - 1e-6), 0.6, 0.4)
    np.testing.assert_allclose(prior.pdf(x).numpy(), expected, rtol=1e-9)
    inside = x[1:-1].clone().requires_grad_(True)
    prior.cdf(inside).sum().backward()
    np.testing.assert_allclose(inside.grad.numpy(), expected[1:-1],
                               rtol=1e-9)


@pytest.mark.parametrize('prior', [p[0] for p in PRIOR_CASES])
def test_gradient_matches_finite_differences(prior):
    torch.manual_seed(1)
    if prior['type'] == 'gaussian':
        x = torch.randn(6, 2, dtype=torch.float64) * 2
    elif prior['type'] == 'uniform':
        x = torch.rand(6, 2, dtype=torch.float64) * 3.6 - 0.8
    else:
        x = torch.rand(6, 2, dtype=torch.float64) * 0.9 + 0.05
    x.requires_grad_(True)
    loss = BatchShapingLoss(prior=prior, loss_weight=0.7)
    assert torch.autograd.gradcheck(loss, (x, ), eps=1e-7, atol=1e-6)


@pytest.mark.parametrize('a,b', [(0.6, 0.4), (0.5, 0.5), (2.0, 3.0),
                                 (0.2, 7.0), (30.0, 1.5), (1.0, 1.0),
                                 (100.0, 100.0), (500.0, 2.0), (0.05, 0.05),
                                 (1000.0, 1000.0)])
def test_beta_cdf_matches_scipy_betainc(a, b):
    # Off-grid points too: the table's cubics are exact at their nodes only.
    x = torch.cat([torch.linspace(0, 1, 20001, dtype=torch.float64),
                   torch.rand(5000, dtype=torch.float64)])
    ours = build_prior(dict(type='beta', a=a, b=b))(x)
    np.testing.assert_allclose(
        ours.numpy(), special.betainc(a, b, x.numpy()), rtol=0, atol=1e-9)
    if max(a, b) <= 30:
        # float32 input; for steeper CDFs the rounding of x itself alone
        # moves the value by more than 1e-6.
        x32 = x.float()
        ours32 = build_prior(dict(type='beta', a=a, b=b))(x32)
        np.testing.assert_allclose(
            ours32.double().numpy(),
            special.betainc(a, b, x32.double().numpy()),
            atol=1e-6)


def test_beta_cdf_finite_values_and_gradients_at_support_ends():
    prior = build_prior(dict(type='beta', a=0.6, b=0.4))
    x = torch.tensor([0.0, 1.0, -0.5, 1.5, 0.5], requires_grad=True)
    cdf = prior(x)
    assert torch.isfinite(cdf).all()
    assert cdf[:4].tolist() == [0.0, 1.0, 0.0, 1.0]  # clamped to [0, 1]
    cdf.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad[0] > 0 and x.grad[1] > 0
    # Outside the support the value is clamped and gets no gradient.
    assert x.grad[2] == 0 and x.grad[3] == 0
    loss = BatchShapingLoss()
    gates = torch.tensor([[0.0], [1.0], [1.0], [0.0]], requires_grad=True)
    loss(gates).backward()
    assert torch.isfinite(gates.grad).all()


def test_prior_values_and_gradients_do_not_depend_on_other_values():
    """Whether or not other values lie beyond the support, values inside
    it (also exactly at its ends) keep their CDF and gradient; values
    beyond get none."""
    prior = build_prior(dict(type='beta', a=0.6, b=0.4))
    inside = torch.tensor([0.0, 1e-7, 0.3, 0.999, 1.0], requires_grad=True)
    outside = torch.cat([inside.detach(), torch.tensor([2.0])])
    outside.requires_grad_()
    prior(inside).sum().backward()
    prior(outside).sum().backward()
    torch.testing.assert_close(prior(inside), prior(outside)[:5])
    torch.testing.assert_close(inside.grad, outside.grad[:5])
    assert outside.grad[5] == 0


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast_low_precision(dtype):
    torch.manual_seed(0)
    x = torch.rand(16, 8)
    reference = BatchShapingLoss()(x)
    lin = torch.nn.Linear(8, 8)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(8))
        lin.bias.zero_()
    with torch.autocast('cpu', dtype=dtype):
        y = lin(x.requires_grad_(True))
        assert y.dtype == dtype
        value = BatchShapingLoss()(y)
    assert value.dtype == torch.float32
    assert torch.isfinite(value)
    assert value.item() == pytest.approx(reference.item(), abs=2e-2)
    value.backward()
    assert torch.isfinite(x.grad).all()


def test_user_registered_prior():

    @PRIORS.register_module('test_exponential', force=True)
    class ExponentialPrior(Prior):
        support = (0.0, math.inf)

        def __init__(self, rate=1.0):
            self.rate = rate

        def cdf(self, x):
            return 1 - torch.exp(-self.rate * x)

    np.random.seed(0)
    x = np.random.exponential(size=(20, 3))
    loss = BatchShapingLoss(prior=dict(type='test_exponential', rate=2.0))
    assert loss(torch.tensor(x)).item() == pytest.approx(
        reference_batch_shaping(x, lambda v: stats.expon.cdf(v, scale=0.5)),
        rel=1e-6)


@pytest.mark.parametrize('prior,match', [
    (dict(type='beta', a=0.0, b=0.4), 'a=0.0.*0 < a <= 1000'),
    (dict(type='beta', a=0.6, b=-1), 'b=-1.*0 < b <= 1000'),
    (dict(type='gaussian', std=0), 'std=0.*std > 0'),
    (dict(type='uniform', low=1.0, high=1.0), 'high=1.0.*high > low'),
    (dict(type='beta', a=float('nan')), 'a=nan'),
])
def test_invalid_prior_parameters(prior, match):
    with pytest.raises(ValueError, match=match):
        BatchShapingLoss(prior=prior)


def test_unknown_prior_type():
    with pytest.raises(KeyError, match="'gamma'.*beta"):
        BatchShapingLoss(prior=dict(type='gamma'))
    with pytest.raises(TypeError, match='prior must be'):
        BatchShapingLoss(prior='beta')


def test_sum_over_features_by_default_or_mean():
    """Eq. 2's text sums the loss over the features; 'mean' divides by
    their number."""
    np.random.seed(0)
    x = np.random.rand(11, 4)
    per_feature_sum = reference_batch_shaping(
        x, lambda v: stats.beta.cdf(v, 0.6, 0.4))
    loss = BatchShapingLoss(loss_weight=0.5)
    assert loss(torch.tensor(x)).item() == pytest.approx(
        0.5 * per_feature_sum, rel=1e-6)
    loss = BatchShapingLoss(reduction='mean', loss_weight=0.5)
    assert loss(torch.tensor(x)).item() == pytest.approx(
        0.5 * per_feature_sum / 4, rel=1e-6)
    with pytest.raises(ValueError, match="reduction 'max'"):
        BatchShapingLoss(reduction='max')


def test_input_checks():
    with pytest.raises(ValueError, match=r'\(N, C\).*\(4,\)'):
        BatchShapingLoss()(torch.rand(4))
    x = torch.rand(4, 3)
    x[2, 1] = float('nan')
    assert not torch.isfinite(BatchShapingLoss()(x))  # off by default
    assert torch.isnan(build_prior(dict(type='beta'))(x)[2, 1])
    with pytest.raises(ValueError, match='layer1.0.gate'):
        BatchShapingLoss(check_finite=True)(
            x, feature_names=['a', 'layer1.0.gate', 'c'])
    with pytest.raises(ValueError, match='feature 1'):
        BatchShapingLoss(check_finite=True)(x)


def test_l0_loss_matches_eq5():
    torch.manual_seed(0)
    probs = [torch.rand(4, 3), torch.rand(4, 5)]
    stacked = torch.cat(probs, 1).numpy()
    gamma = 0.2
    eq5_sum = gamma * stacked.sum(1).mean()  # sum over gates, mean samples
    assert GateL0Loss(gamma)(probs).item() == pytest.approx(
        eq5_sum, rel=1e-6)
    assert GateL0Loss(gamma, reduction='mean')(probs).item() == \
        pytest.approx(eq5_sum / 8, rel=1e-6)
    # MAC weighting: the expected fraction of gated MACs that run.
    macs = [10.0, 1.0]
    weighted = (stacked[:, :3] * 10).sum(1) + stacked[:, 3:].sum(1)
    expected = gamma * (weighted / (3 * 10 + 5 * 1)).mean()
    assert GateL0Loss(gamma, weighting='macs', reduction='mean')(
        probs, macs).item() == pytest.approx(expected, rel=1e-6)
    assert GateL0Loss(gamma, weighting='macs')(probs, macs).item() == \
        pytest.approx(expected * 8, rel=1e-6)


def test_l0_loss_follows_changed_macs_and_widths():
    """The per-gate weights are kept between calls; new MAC figures (a new
    input size) or layer widths give new ones."""
    torch.manual_seed(0)
    loss = GateL0Loss(weighting='macs')
    calls = [([torch.rand(4, 3), torch.rand(4, 5)], [10.0, 1.0]),
             ([torch.rand(4, 3), torch.rand(4, 5)], [1.0, 10.0]),
             ([torch.rand(4, 2), torch.rand(4, 6)], [1.0, 10.0]),
             ([torch.rand(4, 2).double(), torch.rand(4, 6).double()],
              [1.0, 10.0])]
    for probs, macs in calls:
        assert loss(probs, macs).item() == pytest.approx(
            GateL0Loss(weighting='macs')(probs, macs).item(), rel=1e-12)


def test_l0_loss_arguments():
    with pytest.raises(ValueError, match="reduction 'max'"):
        GateL0Loss(reduction='max')
    with pytest.raises(ValueError, match="weighting 'flops'"):
        GateL0Loss(weighting='flops')
    with pytest.raises(ValueError, match='one MAC figure per'):
        GateL0Loss(weighting='macs')([torch.rand(2, 2)], None)
    with pytest.raises(ValueError, match='no gates'):
        GateL0Loss()([])


def test_losses_registered_in_both_scopes():
    from mmpretrain.registry import MODELS as CLS_MODELS
    from mmseg.registry import MODELS as SEG_MODELS
    for registry in (SEG_MODELS, CLS_MODELS):
        assert registry.get('BatchShapingLoss') is BatchShapingLoss
        assert registry.get('GateL0Loss') is GateL0Loss
        loss = registry.build(
            dict(type='BatchShapingLoss', prior=dict(type='uniform')))
        assert isinstance(loss.prior, Prior)
