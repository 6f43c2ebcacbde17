"""Joining a side's features onto rows: the id-only shortcut must give the three-key join's result."""

from __future__ import annotations

import pandas as pd
import pytest
from pandas.errors import MergeError

from mtrec.features.training_set import _join_side

ON = ["user_id", "scenario", "feature_time"]
T = pd.Timestamp("2024-05-01 23:59:59", tz="UTC")


def _rows(scenarios, times):
    return pd.DataFrame({"user_id": ["u1", "u2", "u3", "u1"], "scenario": scenarios, "feature_time": times,
                         "item_id": ""})


def _got(scenario="home", time=T):
    return pd.DataFrame({"user_id": ["u3", "u1", "u9"], "scenario": scenario, "feature_time": time,
                         "f": [3.0, 1.0, 9.0], "c": ["z", "x", "q"]})


@pytest.mark.parametrize("rows, got", [
    (_rows("home", T), _got()),  # one scenario, one time: joined on the id alone
    (_rows(["home", "home", "feed", "home"], T), _got()),  # mixed scenarios: the three keys
    (_rows("home", [T, T, T, T - pd.Timedelta(days=1)]), _got()),  # mixed times
    (_rows("home", T), _got(scenario="feed")),  # constant, but another scenario: nothing matches
    (_rows("home", T), _got().iloc[:0]),  # nothing retrieved
])
def test_join_equals_the_three_key_merge(rows, got):
    expected = rows.merge(got, on=ON, how="left", validate="many_to_one")
    pd.testing.assert_frame_equal(_join_side(rows, got, ON), expected)


def test_duplicate_feature_rows_are_refused():
    got = pd.concat([_got(), _got().iloc[:1]])
    with pytest.raises(MergeError):
        _join_side(_rows("home", T), got, ON)
