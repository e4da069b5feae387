"""The overhead budget's arithmetic, kept importable here: it lives in :mod:`dynscope.budget` (no Lightning)."""

from dynscope.budget import Allowance, BudgetController, near_event, power_of_two_at_least, share_budget

__all__ = ["Allowance", "BudgetController", "near_event", "power_of_two_at_least", "share_budget"]
