"""The run's seed formulas are part of its results: pinned to the values every committed
number was measured with (the main job's report, the results table)."""
from sail.engine import seeds


def test_combine_is_the_62_bit_polynomial_of_its_parts():
    assert seeds.combine() == 0
    assert seeds.combine(0) == 1
    assert seeds.combine(5, 1) == (6 * 1_000_003 + 2) % 2 ** 62
    big = seeds.combine(*range(40))
    assert 0 <= big < 2 ** 62 and big != seeds.combine(*range(39))


def test_per_iteration_and_per_stage_seeds_keep_their_values():
    assert [seeds.stage_training(3, i) for i in range(3)] == [3, 1003, 2003]
    assert seeds.pairing(3, 2) == 5 and seeds.mixing(3, 2) == 95
    assert seeds.candidate(0, 1, 2, 3) == seeds.combine(0, 1, 2, 3) == ((1 * 1_000_003 + 2) * 1_000_003 + 3) * 1_000_003 + 4
    assert seeds.ranking_draws(0, 1, 2) == seeds.combine(0, 1, 2, 99)
    assert seeds.random_pair(4, 9) == seeds.combine(4, 9, 7)
    assert seeds.pair_order(2, 5) == 2 * 7919 + 5
    assert seeds.pair_draw(2, 3, 4) == (2 * 1_000_003 + 3) * 65_537 + 4
    assert seeds.encode_shard(7, 2) == ([7, 2], 7 * 100003 + 2)
    # distinct streams: a prompt's candidates, its ranking draws and its random pair never share a seed
    assert len({seeds.candidate(0, 1, 2, n) for n in range(8)} | {seeds.ranking_draws(0, 1, 2)}) == 9
