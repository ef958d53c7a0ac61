import json

import numpy as np
import pytest

from sail.engine.toy.rank_study import RankStudyConfig, adaptive_draws, analyse


def test_analyse_counts_agreement_pairs_and_forwards_from_prefixes():
    # prompt 0: two draws rank 0 > 1 > 2, later draws confirm; prompt 1: the first draw ranks
    # candidate 2 first, the full set of draws ranks candidate 0 first.
    d0 = np.tile(np.array([[3.0], [2.0], [1.0]]), (1, 4)) + np.array([0.0, 0.1, -0.1, 0.05])
    d1 = np.array([[0.0, 9.0, 9.0, 9.0], [1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    oracle = [np.array([1.0, 0.5, 0.0]), np.array([1.0, 0.5, 0.0])]
    cfg = RankStudyConfig(max_draws=4, ks=[1, 4], block=2, settle_z=[1e9])
    rows = {r["setting"]: r for r in analyse([d0, d1], oracle, cfg)}
    one, four, never = rows["K=1"], rows["K=4"], rows["adaptive block 2, z 1000000000.0"]
    assert one["agreement"] == 0.5 and one["same_pair_as_max"] == 0.5 and one["forwards_fraction"] == 0.25
    assert four["agreement"] == 1.0 and four["same_pair_as_max"] == 1.0
    # prompt 1 ranks 0 > 2 > 1 against the oracle's 0 > 1 > 2: tau 1/3; prompt 0: tau 1
    assert np.isclose(four["kendall_tau"], (1 + 1 / 3) / 2)
    mu2 = rows["best vs mu - 2 sigma, K=4"]         # the other pair choice: its own K = max pair, same tau
    assert mu2["same_pair_as_max"] == 1.0 and mu2["kendall_tau"] == four["kendall_tau"]
    assert mu2["agreement"] == 1.0 and mu2["forwards_fraction"] == 1.0
    # prompt 0's gaps are the same on every draw (infinitely many standard errors): it settles
    # after one block even at z 1e9; prompt 1 never does and uses all 4 draws
    assert never["draws_mean"] == 3 and never["forwards_fraction"] == 0.75
    assert adaptive_draws(d0, 2, 1e9) == 2 and adaptive_draws(d1, 2, 1e9) == 4
    assert adaptive_draws(d0, 2, 1e9, min_draws=4) == 4       # no settle test before 4 draws
    rows = analyse([d0, d1], oracle, RankStudyConfig(max_draws=4, ks=[4], block=2, settle_z=[1e9], min_draws=[0, 4]))
    assert [r["draws_mean"] for r in rows if r["setting"].startswith("adaptive")] == [3, 4]


@pytest.mark.slow
def test_rank_study_of_a_finished_run(tmp_path, toy_model, one_thread):
    from sail.engine.config import config_from_dict
    from sail.engine.controller import Controller
    from sail.launch.rank_study import main
    from click.testing import CliRunner
    from tests.engine.test_controller import mini_config

    data = mini_config(tmp_path, toy_model)
    data["eval"]["enabled"] = False
    Controller(config_from_dict(data)).run()
    result = CliRunner().invoke(main, ["--run", str(tmp_path / "run"), "--out", str(tmp_path / "study"),
                                       "--set", "max_draws=4", "--set", "ks=[1,4]", "--set", "settle_z=[2.0]"])
    assert result.exit_code == 0, result.output
    study = json.loads((tmp_path / "study" / "rank_study.json").read_text())
    assert study["prompts"] == 4 and study["candidates"] == 3 and len(study["rows"]) == 4   # + best vs mu - 2 sigma
    assert study["rows"][1]["same_pair_as_max"] == 1.0                           # K = max_draws
    assert (tmp_path / "study" / "rank_study.png").stat().st_size > 1000
    from safetensors.torch import load_file

    raw = load_file(str(tmp_path / "study" / "per_draw.safetensors"))
    assert raw["draws_0"].shape == (3, 4) and raw["oracle_3"].shape == (3,)
    # another ranking reference on the same candidates; at iteration 1 the anchor is the ranked model itself
    base_ref = CliRunner().invoke(main, ["--run", str(tmp_path / "run"), "--out", str(tmp_path / "study_b"),
                                         "--set", "max_draws=4", "--set", "ks=[4]", "--set", "settle_z=[2.0]",
                                         "--set", 'reference="base"'])
    assert base_ref.exit_code == 0, base_ref.output
    again = json.loads((tmp_path / "study_b" / "rank_study.json").read_text())["rows"][0]
    assert again["agreement"] == study["rows"][1]["agreement"]      # the run's own reference is base
    anchor = CliRunner().invoke(main, ["--run", str(tmp_path / "run"), "--out", str(tmp_path / "study_a"),
                                       "--set", "max_draws=4", "--set", "ks=[4]", "--set", 'reference="anchor"'])
    assert anchor.exit_code == 2 and "the 'anchor' reference is the ranked model itself" in anchor.output
