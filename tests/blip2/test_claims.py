"""Claims' statistics and the verdict rule (plain arithmetic, checked by hand)."""

import dataclasses
import math

import pytest

from blip2.claims import (CLAIMS, FACTORS, mean_ci, paired_difference, render_markdown, summarise, summarise_factor, t95,
                          verdict)


def test_mean_ci_is_students_t():
    stat = mean_ci([1.0, 2.0, 3.0])
    half = 4.303 * 1.0 / math.sqrt(3)  # sd 1, df 2
    assert stat["mean"] == 2.0 and stat["n"] == 3 and stat["sd"] == pytest.approx(1.0)
    assert stat["ci"] == pytest.approx([2.0 - half, 2.0 + half])
    assert mean_ci([0.5]) == {"mean": 0.5, "sd": None, "ci": None, "n": 1}
    assert t95(4) == 2.776 and t95(100) == 1.96
    with pytest.raises(ValueError):
        mean_ci([])


def test_paired_difference_pairs_by_seed():
    a, b = {0: 0.9, 1: 0.8, 2: 0.95, 7: 0.5}, {0: 0.7, 1: 0.7, 2: 0.75}
    difference = paired_difference(a, b)
    assert difference["seeds"] == [0, 1, 2]  # seed 7 has no partner
    assert difference["mean"] == pytest.approx((0.2 + 0.1 + 0.2) / 3)
    with pytest.raises(ValueError, match="share no seed"):
        paired_difference({0: 1.0}, {1: 1.0})


@pytest.mark.parametrize(("ci", "direction", "n", "expected"), [
    ([0.01, 0.2], 1, 5, "holds"),
    ([-0.2, -0.01], 1, 5, "does not hold"),
    ([-0.2, -0.01], -1, 5, "holds"),
    ([-0.05, 0.2], 1, 5, "inconclusive"),
    ([0.01, 0.2], 1, 2, "not enough seeds"),
    ([0.01, 0.2], 0, 5, "reported"),
])
def test_verdict_rule(ci, direction, n, expected):
    assert verdict({"ci": ci, "n": n}, direction, min_seeds=5) == expected


def test_every_claim_c1_to_c8_is_listed_with_two_arms():
    assert list(CLAIMS) == [f"C{i}" for i in range(1, 9)]
    for claim in CLAIMS.values():
        assert len(claim.arms) == 2 and claim.arms[0].name != claim.arms[1].name
        assert {arm.stage for arm in claim.arms} <= {"stage1", "stage2", "instruct"}
    assert CLAIMS["C8"].direction == 0  # reported, not judged
    assert [c for c, claim in CLAIMS.items() if claim.needs] == []  # every claim's switch and harness step exist
    # C1 and C6 train on the web split as the seed's CapFilt step keeps it; C1's CapFilt arm is C6's nucleus arm
    assert CLAIMS["C1"].arms[0].data == CLAIMS["C6"].arms[0].data == ("clean", "capfilt:nucleus")
    assert CLAIMS["C1"].arms[1].data == ("clean", "web") and CLAIMS["C6"].arms[1].data == ("clean", "capfilt:beam")
    assert CLAIMS["C8"].arms[1].build == ("excluded_tasks=[existence]",) and not CLAIMS["C8"].arms[0].build


def _trials(claim, values):
    """``values[arm index][seed]`` as trials of ``claim``."""
    return [{"arm": arm.name, "seed": seed, "key": f"k{i}{seed}", "seconds": 1.0, "node": "abcdef0123",
             "values": {"test": v, "novel": v - 0.5}} for i, arm in enumerate(claim.arms) for seed, v in values[i].items()]


def test_summary_and_markdown_list_every_trial():
    claim = CLAIMS["C3"]
    trials = _trials(claim, [{0: 0.9, 1: 0.91, 2: 0.92}, {0: 0.8, 1: 0.81, 2: 0.82}])
    summary = summarise(claim, trials, min_seeds=3)
    assert summary["difference"]["test"]["mean"] == pytest.approx(0.1)
    assert summary["difference"]["test"]["ci"] == pytest.approx([0.1, 0.1])
    assert summary["verdict"] == "holds" and summary["holds"]
    assert summary["arms"]["ITC+ITM"]["novel"]["mean"] == pytest.approx(0.31)
    # the ablation ahead on every seed: the claim does not hold, and says so
    reversed_ = summarise(claim, _trials(claim, [{0: 0.7, 1: 0.72, 2: 0.71}, {0: 0.8, 1: 0.81, 2: 0.83}]), 3)
    assert reversed_["verdict"] == "does not hold" and not reversed_["holds"]
    report = {"command": "blip2 reproduce", "finished": "now", "wall_seconds": 3.0, "trials": ["a"] * 6,
              "trials_run": 6, "trials_reused": 0, "seeds": [0, 1, 2], "machine": "m", "verdict_rule": "rule",
              "min_seeds": 3, "claims": {"C3": {"claim": {**claim.__dict__, "arms": [a.__dict__ for a in claim.arms]},
                                                "summary": summary, "trials": trials, "seconds": 6.0}}}
    text = render_markdown(report)
    assert "**Verdict: holds.**" in text and text.count("| ITC+ITM+ITG | ") == 4  # arm row + 3 trials
    assert "`loss.itg_weight=0`" in text and "0.900" in text


def test_a_claim_without_its_switch_is_not_runnable_and_says_what_it_needs():
    summary = summarise(dataclasses.replace(CLAIMS["C8"], needs="a backbone build per arm"), [], min_seeds=5)
    assert summary["verdict"] == "not runnable: needs a backbone build per arm"
    assert not summary["holds"]


def test_a_value_the_set_could_not_score_is_left_out():
    claim = CLAIMS["C2"]
    trials = _trials(claim, [{0: 0.9, 1: 0.8}, {0: 0.85, 1: 0.7}])
    trials[0]["values"]["novel"] = None
    summary = summarise(claim, trials, min_seeds=2)
    assert summary["arms"][claim.arms[0].name]["novel"]["n"] == 1
    assert summary["difference"]["novel"]["seeds"] == [1]


def test_a_factor_sets_the_builds_spread_beside_the_seeds_spread():
    factor = FACTORS["F1"]
    assert [arm.build for arm in factor.arms] == [(), ("seed=1",), ("seed=2",), ("seed=3",)] and factor.seeds == (0,)
    reference = [{"arm": "shipped set", "seed": s, "key": f"r{s}", "seconds": 1.0, "node": "n",
                  "values": {"test": v, "novel": v}} for s, v in enumerate([0.9, 0.92, 0.94])]
    builds = [{"arm": f"LM build seed {b}", "seed": 0, "key": f"b{b}", "seconds": 1.0, "node": "n",
               "values": {"test": v, "novel": None}} for b, v in ((1, 0.5), (2, 0.7), (3, 0.9))]
    summary = summarise_factor(factor, reference + builds)
    assert summary["spread"]["test"]["across_arms"]["sd"] == pytest.approx(0.2)  # the builds: 0.5, 0.7, 0.9
    assert summary["spread"]["test"]["across_seeds"]["sd"] == pytest.approx(0.02)  # the shipped set's seeds
    assert summary["spread"]["novel"]["across_arms"] is None and summary["verdict"] == "reported"
    assert summary["arms"]["LM build seed 2"]["test"]["n"] == 1
    report = {"command": "c", "finished": "now", "wall_seconds": 1.0, "trials": [], "trials_run": 0, "trials_reused": 0,
              "seeds": [0, 1, 2], "machine": "m", "verdict_rule": "rule", "min_seeds": 5, "claims": {},
              "factors": {"F1": {"factor": dataclasses.asdict(factor), "summary": summary,
                                 "trials": reference + builds, "seconds": 6.0}}}
    text = render_markdown(report)
    assert "## F1:" in text and "| LM build seed 2 | `seed=2` | [0] | 0.700 (n=1) | – |" in text
    assert "| spread across the fresh builds | | | 0.700 ± 0.200" in text
