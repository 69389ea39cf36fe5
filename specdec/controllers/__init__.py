"""Draft-size policies. Import the modules that define controllers so their decorators register them."""

from specdec.controllers.base import (Budget, Controller, Frontier, StepStats, make_controller, register_controller,
                                      registered_controllers)
from specdec.controllers import simple  # noqa: F401  (registers "static" and "heuristic")
from specdec.controllers import adaptive  # noqa: F401  (registers "goodput", "tree_size" and "threshold")
from specdec.controllers import acceptance_head  # noqa: F401  (registers "acceptance_head")

__all__ = ["Budget", "Controller", "Frontier", "StepStats", "make_controller", "register_controller",
           "registered_controllers"]
