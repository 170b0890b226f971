"""GPU placement: disjoint devices when they fit, an explicit, validated memory split when models share."""

from __future__ import annotations

import pytest

from app.errors import ConfigError
from app.serving.gpus import Demand, Gpu, _visible_devices, place


def gpus(n: int) -> list[Gpu]:
    return [Gpu(i, "H200", 139.8) for i in range(n)]


def test_models_that_fit_get_their_own_devices():
    plan = place([Demand("a", 2, None), Demand("b", 1, None), Demand("c", 4, None)], gpus(8))
    assert [p.cuda_visible_devices for p in plan] == ["0,1", "2", "3,4,5,6"]
    assert all(p.memory_fraction is None and not p.shared for p in plan)


def test_models_that_do_not_fit_share_with_an_even_split():
    plan = place([Demand("a", 1, None), Demand("b", 1, None), Demand("c", 1, None)], gpus(2))
    assert [p.cuda_visible_devices for p in plan] == ["0", "1", "0"]
    assert [p.memory_fraction for p in plan] == [0.44, 0.88, 0.44]
    assert all(p.shared for p in plan)


def test_user_fractions_are_kept_and_checked():
    plan = place([Demand("a", 1, 0.6), Demand("b", 1, 0.2)], gpus(1))
    assert [p.memory_fraction for p in plan] == [0.6, 0.2]
    with pytest.raises(ConfigError) as info:
        place([Demand("a", 1, 0.6), Demand("b", 1, 0.5)], gpus(1))
    (problem,) = info.value.problems
    assert problem.field == "GPU 0" and "1.10" in problem.problem and "a 0.6, b 0.5" in problem.problem


def test_a_model_larger_than_the_machine_is_refused():
    with pytest.raises(ConfigError) as info:
        place([Demand("big", 4, None, "models[0].gpus")], gpus(2))
    assert info.value.problems[0].field == "models[0].gpus"
    assert "needs 4 GPUs; this machine has 2" in info.value.problems[0].problem


def test_too_many_sharers_leave_too_little_memory():
    with pytest.raises(ConfigError) as info:
        place([Demand(f"m{i}", 1, None) for i in range(20)], gpus(1))
    assert any("would get only" in p.problem for p in info.value.problems)


def test_models_that_sleep_share_as_two_residents_and_need_not_fit_together():
    plan = place([Demand(f"m{i}", 1, None) for i in range(20)], gpus(1), sleeping=True)
    assert all(p.cuda_visible_devices == "0" and p.shared and p.memory_fraction == 0.44 for p in plan)
    plan = place([Demand("a", 1, 0.6), Demand("b", 1, 0.5), Demand("c", 1, None)], gpus(1), sleeping=True)
    assert [p.memory_fraction for p in plan] == [0.6, 0.5, 0.44]  # the ledger, not the sum, keeps them apart
    plan = place([Demand("a", 1, None), Demand("b", 1, None)], gpus(2), sleeping=True)
    assert [(p.cuda_visible_devices, p.memory_fraction, p.shared) for p in plan] == [("0", None, False),
                                                                                      ("1", None, False)]


@pytest.mark.parametrize("value, expected", [
    (None, [0, 1, 2, 3]), ("", [0, 1, 2, 3]), ("2,3", [2, 3]), ("none", []), ("1,7", [1]),
    ("GPU-aaaa,GPU-bbbb", [0, 1, 2, 3]),
])
def test_visible_devices(value, expected):
    assert _visible_devices(value, 4) == expected
