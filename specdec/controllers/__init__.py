"""Draft-size policies. Import the modules that define controllers so their decorators register them."""

from specdec.controllers.base import (Budget, Controller, StepStats, make_controller, register_controller,
                                      registered_controllers)
from specdec.controllers import simple  # noqa: F401  (registers "static" and "heuristic")

__all__ = ["Budget", "Controller", "StepStats", "make_controller", "register_controller", "registered_controllers"]
