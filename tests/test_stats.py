"""stats.py: Student's t intervals over paired seeds, against hand-computed cases."""

import math

import pytest

import stats


def test_t_quantiles_match_the_tables():
    assert stats.t975(1) == 12.706 and stats.t975(2) == 4.303 and stats.t975(9) == 2.262
    assert stats.t975(31) == pytest.approx(2.0395, abs=1e-3)  # tables: 2.0395
    assert stats.t975(120) == pytest.approx(1.9799, abs=1e-3)  # tables: 1.9799
    assert stats.t975(10 ** 6) == pytest.approx(1.95996, abs=1e-4)  # the normal quantile
    with pytest.raises(ValueError):
        stats.t975(0)


def test_paired_difference_by_hand():
    # d = a - b = [2.0, 2.2, 2.4]: mean 2.2, sd 0.2, n 3, t(0.975, 2) = 4.303
    # half width 4.303 * 0.2 / sqrt(3) = 0.49687 -> [1.70313, 2.69687]: excludes 0
    iv = stats.paired_difference([22.0, 22.7, 23.4], [20.0, 20.5, 21.0])
    assert (iv.mean, iv.low, iv.high, iv.n) == pytest.approx((2.2, 1.70313, 2.69687, 3), abs=1e-5)
    assert iv.excludes_zero
    # d = [1, 2, 3] - 0: mean 2, sd 1, half width 4.303 / sqrt(3) = 2.48434 -> [-0.48434, 4.48434]: holds 0
    iv = stats.paired_difference([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert (iv.low, iv.high) == pytest.approx((-0.48434, 4.48434), abs=1e-5) and not iv.excludes_zero
    # pairing matters: the same numbers unpaired would be one shifted cloud; paired, the shift is exact
    iv = stats.paired_difference([10.0, 20.0, 30.0], [9.0, 19.0, 29.0])
    assert (iv.low, iv.high) == pytest.approx((1.0, 1.0)) and iv.excludes_zero
    assert stats.paired_difference([1.0], [0.0]) is None  # one pair: no spread, no interval
    with pytest.raises(ValueError):
        stats.paired_difference([1.0, 2.0], [1.0])


def test_paired_ratio_by_hand():
    # ratios 2.0, 2.1, 1.9 -> logs 0.693147, 0.741937, 0.641854: mean 0.692313, sd 0.050047
    # half width 4.303 * 0.050047 / sqrt(3) = 0.124335 -> factors exp(.): 1.99833 [1.76471, 2.26288]
    iv = stats.paired_ratio([200.0, 210.0, 190.0], [100.0, 100.0, 100.0])
    assert (iv.mean, iv.low, iv.high) == pytest.approx((1.99833, 1.76471, 2.26288), abs=1e-4)
    with pytest.raises(ValueError):
        stats.paired_ratio([1.0, -1.0], [1.0, 1.0])


def test_loss_noise_is_zero_on_a_smooth_decay_and_the_step_size_on_a_zigzag():
    smooth = [0.1 * math.exp(-0.01 * i) for i in range(100)]  # log-linear: the moving average is the curve
    assert stats.loss_noise(smooth) == pytest.approx(0.0, abs=1e-12)
    # log(loss) = trend +- 0.05 alternately: a centred window of 9 holds 5 of one sign and 4 of the other, so the
    # average strays 0.05/9 towards the centre's sign; residuals are +-8/9 * 0.05 = +-0.04444
    zigzag = [0.1 * math.exp(-0.01 * i + 0.05 * (-1) ** i) for i in range(100)]
    assert stats.loss_noise(zigzag) == pytest.approx(0.04444, rel=0.02)
    assert stats.loss_noise([0.1] * 5) is None  # too short for a window
