"""common/tabular.py, each ingredient of the network, and housing's loss; in-process."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def test_quantile_inputs_match_scikit_learns_quantile_transformer():
    from sklearn.preprocessing import QuantileTransformer

    from common.tabular import QUANTILES, QuantileNormal

    rng = np.random.default_rng(0)
    train = np.column_stack([rng.lognormal(size=2000), rng.integers(0, 2, 2000), rng.normal(size=2000)])
    new = np.column_stack([rng.lognormal(size=300) * 1.5, rng.integers(0, 2, 300), rng.normal(size=300) * 3])
    expected = (
        QuantileTransformer(n_quantiles=QUANTILES, output_distribution="normal", subsample=None)
        .fit(train)
        .transform(new)
    )
    module = QuantileNormal(torch.tensor(train, dtype=torch.float32), 3).double()
    got = module(torch.tensor(new)).numpy()
    # float32 quantiles against scikit-learn's float64 ones: agree to ~1e-4 in normal scores
    assert np.abs(got[:, [0, 2]] - expected[:, [0, 2]]).max() < 2e-3
    # A 0/1 column: scikit-learn sends its minimum and maximum to -5.2 and +5.2; here each value
    # goes to the middle of its run of quantiles, Phi^-1(share of zeros / 2) and above.
    zeros = (train[:, 1] == 0).mean()
    assert set(expected[:, 1].round(2)) == {-5.2, 5.2}
    assert got[new[:, 1] == 0, 1] == pytest.approx(scipy_norm_ppf(zeros / 2), abs=0.02)
    assert got[new[:, 1] == 1, 1] == pytest.approx(scipy_norm_ppf((1 + zeros) / 2), abs=0.02)


def scipy_norm_ppf(p: float) -> float:
    return float(np.sqrt(2) * torch.erfinv(torch.tensor(2 * p - 1, dtype=torch.float64)))


def test_piecewise_linear_encoding_fills_bins_up_to_the_value():
    from common.tabular import PiecewiseLinear

    ple = PiecewiseLinear(torch.arange(0.0, 5.0).unsqueeze(1), 1, n_bins=4, dim=2)  # edges 0,1,2,3,4
    assert ple.edges.tolist() == [[0.0, 1.0, 2.0, 3.0, 4.0]]
    codes = ple.encode(torch.tensor([[-1.0], [0.5], [2.25], [6.0]]))[:, 0]
    assert codes.tolist() == [
        [-1.0, 0.0, 0.0, 0.0],  # open below: extrapolates in the first bin
        [0.5, 0.0, 0.0, 0.0],
        [1.0, 1.0, 0.25, 0.0],
        [1.0, 1.0, 1.0, 3.0],
    ]  # open above: extrapolates in the last bin


@pytest.mark.parametrize(
    "options",
    [
        dict(quantile=True, embedding="ple", ensemble=4),
        dict(embedding="periodic", ensemble=3, ensemble_mode="packed"),
        dict(embedding="ple", ensemble=4, plain=(1, 3)),  # columns 1 and 3 skip the embedding
    ],
)
def test_every_ingredient_predicts_each_row_on_its_own(options):
    """k predictions per row that differ by member, whatever batch the row is in (no batch statistics),
    in float64 too; the buffers are saved with the weights."""
    from common.tabular import TabularArch, TabularMLP

    options = dict(options)
    plain = options.pop("plain", ())
    arch = TabularArch(width=16, depth=2, **options)
    torch.manual_seed(0)
    x = torch.randn(64, 5)
    model = TabularMLP(5, arch, plain=plain, train_x=x).eval()
    k = options["ensemble"]
    out = model(x)
    assert out.shape == (64, k) and (out.std(dim=1) > 0).all()
    double = model.double()
    whole = double(x.double())
    parts = torch.cat([double(x[i : i + 7].double()) for i in range(0, 64, 7)])
    assert torch.allclose(whole, parts, rtol=0, atol=1e-12)
    again = TabularMLP(5, arch, plain=plain).double()  # no train_x: buffers come from the state
    again.load_state_dict(double.state_dict())
    assert torch.equal(again(x.double()), whole)
    if plain:  # the embedding sees the other three columns only
        assert model.embed.edges.shape[0] == 3 and model.net[0].in_features == 3 * 8 + 2


def test_dollar_loss_adds_the_squared_error_in_dollars_of_each_member():
    """--dollar-loss w: log-space MSE + w * MSE of the clipped dollar predictions in $100k."""
    from housing.loss import loss_fn

    mean, std = 12.0, 0.5
    price = torch.tensor([100_000.0, 300_000.0])
    y = ((price.log() - mean) / std).float()
    # member 0 predicts each price 10% high, member 1 exactly, member 2 $1M for the second row
    # (clipped to $500,001 before its error counts, as decode_target does)
    pred = torch.tensor([[110_000.0, 100_000.0, 100_000.0], [330_000.0, 300_000.0, 1_000_000.0]])
    out = ((pred.log() - mean) / std).float()
    log_mse = float(((out - y.unsqueeze(-1)) ** 2).mean())
    dollars = torch.tensor([[0.1, 0.0, 0.0], [0.3, 0.0, 2.00001]])  # errors in $100k
    dollar_mse = float((dollars**2).mean())
    assert float(loss_fn(out, y)) == pytest.approx(log_mse, rel=1e-6)
    assert float(loss_fn(out, y, 0.0, (mean, std))) == pytest.approx(log_mse, rel=1e-6)
    assert float(loss_fn(out, y, 2.0, (mean, std))) == pytest.approx(log_mse + 2 * dollar_mse, rel=1e-5)
