import math

import numpy as np

from sail.engine.toy.plugin import kendall_tau


def test_kendall_tau_against_hand_counts():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert kendall_tau(a, a * 10) == 1.0 and kendall_tau(a, -a) == -1.0
    # b swaps the last two: 5 concordant, 1 discordant of 6 pairs -> 4/6
    assert math.isclose(kendall_tau(a, np.array([1.0, 2.0, 4.0, 3.0])), 4 / 6)
    # a tie in b: pairs (i, j) with b_i == b_j count for neither; tau-b = (5 - 0) / sqrt(6 * 5)
    assert math.isclose(kendall_tau(a, np.array([1.0, 2.0, 3.0, 3.0])), 5 / math.sqrt(30))
    assert math.isnan(kendall_tau(a, np.zeros(4)))
