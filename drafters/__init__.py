"""Drafters: each file defines one and registers it by decorator. Importing this package registers the built-ins."""

from specdec.drafters.base import (DraftContext, Drafter, TargetView, make_drafter, parse_spec, register_drafter,
                                   registered_drafters)
from specdec.drafters import copyspec, early_exit, fused, model, ngram, recycling, retrieval  # noqa: F401  (registers them)

__all__ = ["DraftContext", "Drafter", "TargetView", "make_drafter", "parse_spec", "register_drafter",
           "registered_drafters"]
