"""Linefit / Linefit+: exact on lines, equal to numpy's weighted polyfit, Linefit+ favours later points."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nino_fast.baselines import Linefit, LinefitPlus, linefit_coefficients, make_baseline


class _Graph:
    num_params = 7


@pytest.mark.parametrize("weights", ["uniform", "linear", [0.5, 3.0, 1.0, 2.0, 0.1]])
@pytest.mark.parametrize("k", [1, 3, 40])
def test_exact_on_linear_trajectories(weights, k):
    a, b = torch.randn(50, 1, dtype=torch.float64), torch.randn(50, 1, dtype=torch.float64)
    t = torch.arange(5, dtype=torch.float64)
    states = a + b * t  # (50, 5), oldest first
    out = Linefit(weights=weights).nowcast(None, states, k)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, (a + b * (4 + k)).squeeze(1), rtol=0, atol=1e-10)


@pytest.mark.parametrize("ctx", [2, 5, 8])
@pytest.mark.parametrize("plus", [False, True])
def test_matches_numpy_weighted_polyfit(ctx, plus):
    """Against an independent solver: np.polyfit weights multiply residuals, so it gets sqrt of ours."""
    states = torch.randn(20, ctx, dtype=torch.float64)
    k = 6
    model = LinefitPlus(ctx) if plus else Linefit(ctx)
    w = np.arange(1, ctx + 1, dtype=np.float64) if plus else np.ones(ctx)
    t = np.arange(ctx, dtype=np.float64)
    expected = [np.polyval(np.polyfit(t, row, 1, w=np.sqrt(w)), ctx - 1 + k) for row in states.numpy()]
    torch.testing.assert_close(model.nowcast(None, states, k), torch.tensor(expected, dtype=torch.float64))


def test_linefit_plus_weights_later_points_more():
    """Moving the newest snapshot moves the Linefit+ prediction more than Linefit's, the oldest less; the
    weights are exactly 1..ctx."""
    c, c_plus = linefit_coefficients(5, 1, "uniform"), linefit_coefficients(5, 1, "linear")
    assert c_plus[-1] > c[-1] and abs(c_plus[0]) < abs(c[0])
    torch.testing.assert_close(c_plus, linefit_coefficients(5, 1, [1, 2, 3, 4, 5]))
    torch.testing.assert_close(c_plus, linefit_coefficients(5, 1, [2, 4, 6, 8, 10]))  # scale-free
    # on a decelerating trajectory (training flattening out) Linefit+ follows the recent, flatter slope
    t = torch.arange(5, dtype=torch.float64)
    states = (1 - torch.exp(-t / 2)).unsqueeze(0)
    lf, lfp = Linefit().nowcast(None, states, 5), LinefitPlus().nowcast(None, states, 5)
    assert states[0, -1] < lfp[0] < lf[0]


def test_dtypes_and_interface():
    states = torch.randn(7, 5).to(torch.bfloat16)
    out = make_baseline("Linefit+").nowcast(_Graph(), states, 2)
    assert out.dtype == torch.bfloat16 and out.shape == (7,)
    ref = states.float() @ linefit_coefficients(5, 2, "linear").float()
    torch.testing.assert_close(out, ref.to(torch.bfloat16))
    assert isinstance(make_baseline("linefit"), Linefit) and not isinstance(make_baseline("linefit"), LinefitPlus)
    assert Linefit.needs_graph is False


def test_bad_inputs():
    lf = Linefit()
    with pytest.raises(ValueError, match="ctx=5"):
        lf.nowcast(None, torch.randn(7, 4), 1)
    with pytest.raises(ValueError, match="graph has 7"):
        lf.nowcast(_Graph(), torch.randn(6, 5), 1)
    with pytest.raises(ValueError, match="k must be"):
        lf.nowcast(None, torch.randn(7, 5), 0)
    with pytest.raises(ValueError, match="NaN"):
        lf.nowcast(None, torch.tensor([[0.0, 1.0, float("nan"), 1.0, 2.0]]), 1)
    with pytest.raises(ValueError, match="prediction has 1 NaN/Inf"):  # float32 overflow of the extrapolation
        lf.nowcast(None, torch.tensor([[-3e38, -1e38, 0.0, 1e38, 3e38]]), 40)
    with pytest.raises(ValueError, match="ctx must be >= 2"):
        Linefit(ctx=1)
    with pytest.raises(ValueError, match="positive"):
        Linefit(weights=[1, 2, 3, 4, -1])
    with pytest.raises(ValueError, match="unknown baseline"):
        make_baseline("linefit++")


def test_same_bits_at_any_thread_count():
    """The filter is applied column by column (elementwise ops), not as a BLAS product whose split depends on the
    thread count: the same bits at 1 and 2 threads, within float32 rounding of ``states @ c``."""
    from nino_fast._env import torch_threads

    states = torch.randn(6922, 5, generator=torch.Generator().manual_seed(3))
    runs = []
    for threads in (1, 2):
        with torch_threads(threads):
            runs.append(LinefitPlus().nowcast(None, states, 7))
    assert torch.equal(runs[0], runs[1])
    torch.testing.assert_close(runs[0], states @ linefit_coefficients(5, 7, "linear").float())
