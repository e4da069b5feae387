"""The shared mitigation trigger: streaks per condition, patience, the order of conditions, checkpoint state."""

import pytest

from dynscope.callbacks.trigger import Trigger


def test_each_condition_keeps_its_own_streak_and_the_first_listed_wins():
    trigger = Trigger("stablemax", patience=2, conditions=("sc", "nlm"))
    assert trigger.update({"sc": True, "nlm": True}) is None
    assert trigger.update({"sc": None, "nlm": False}) is None  # sc not measured: its streak stays at 1
    assert trigger.streaks == {"sc": 1, "nlm": 0}
    assert trigger.update({}) is None and trigger.streaks == {"sc": 1, "nlm": 0}  # a failed check does not count
    assert trigger.update({"sc": True, "nlm": True}) == "sc"  # both could fire later; sc has held 2 checks
    both = Trigger("stablemax", patience=1, conditions=("sc", "nlm"))
    assert both.update({"sc": True, "nlm": True}) == "sc" and both.update({"sc": False, "nlm": True}) == "nlm"
    assert Trigger("ema", 3, ("ema",), unit="evaluation").held == "3 consecutive evaluations"
    with pytest.raises(ValueError, match="patience"):
        Trigger("ema", 0, ("ema",))


def test_fire_records_the_event_and_the_state_round_trips():
    trigger = Trigger("stablemax", patience=1, conditions=("sc", "nlm"))
    assert trigger.update({"sc": True}) == "sc"
    trigger.fire(7, "softmax collapse", {"sc_fraction": 0.5, "other": 2.0, "nlm_cos": 0.1}, keys=("sc_fraction", "nlm_cos"))
    assert (trigger.active, trigger.triggered_step, trigger.reason) == (True, 7, "softmax collapse")
    assert trigger.trigger_values == {"sc_fraction": 0.5, "nlm_cos": 0.1}
    state = trigger.state_dict()
    assert state["sc_streak"] == 1 and state["nlm_streak"] == 0  # the keys AutoStableMax checkpoints always had
    again = Trigger("stablemax", patience=1, conditions=("sc", "nlm"))
    again.load_state_dict(state)
    assert again.state_dict() == state
