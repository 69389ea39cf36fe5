"""Plugin points: drafter / controller registries (decorator and entry points), spec strings, controllers on
synthetic acceptance traces, and the CLI's config derivation."""

import argparse
import sys
from importlib.metadata import EntryPoint

import pytest

import specdec.controllers.base as controllers_base
import specdec.drafters.base as drafters_base
from specdec.config import GENERATE_PRESETS, GenerateConfig, add_config_arguments, config_from_arguments
from specdec.controllers import Budget, StepStats, make_controller
from specdec.drafters import make_drafter, parse_spec, registered_drafters
from specdec.drafters.ngram import NgramDrafter


def test_parse_spec_reads_literals_and_strings():
    assert parse_spec("ngram") == ("ngram", {})
    assert parse_spec("ngram:max_n=4, min_n=2") == ("ngram", {"max_n": 4, "min_n": 2})
    assert parse_spec("x:path=/tmp/a.bin,rate=0.5,flag=True") == ("x", {"path": "/tmp/a.bin", "rate": 0.5,
                                                                       "flag": True})
    with pytest.raises(ValueError, match="key=value"):
        parse_spec("ngram:4")


def test_make_drafter_by_name_spec_and_object():
    drafter = make_drafter("ngram:max_n=5,max_matches=2")
    assert isinstance(drafter, NgramDrafter) and drafter.max_n == 5 and drafter.max_matches == 2
    assert make_drafter(drafter) is drafter


def test_unknown_names_list_the_registered_ones():
    with pytest.raises(ValueError, match="ngram"):
        make_drafter("no-such-drafter")
    with pytest.raises(ValueError, match="heuristic"):
        make_controller("no-such-controller")


def test_decorator_registration():
    @drafters_base.register_drafter("test-decorated")
    class Decorated:
        vocab_size = None

        def propose(self, ctx): ...

        def observe(self, result): ...

        def reset(self): ...

    try:
        assert isinstance(make_drafter("test-decorated"), Decorated)
        assert isinstance(make_drafter("test-decorated"), drafters_base.Drafter)  # satisfies the protocol
    finally:
        drafters_base._DRAFTERS.pop("test-decorated")


def test_entry_point_registration(tmp_path, monkeypatch):
    """A third-party package's drafter and controller, found through the entry-point groups."""
    (tmp_path / "thirdparty_plugins.py").write_text(
        "class EchoDrafter:\n    vocab_size = None\n    def __init__(self, depth=1): self.depth = depth\n"
        "    def propose(self, ctx): pass\n    def observe(self, result): pass\n    def reset(self): pass\n"
        "class FixedController:\n    def __init__(self, k=3): self.k = k\n"
        "    def budget(self, history): pass\n    def observe(self, step): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    points = {"specdec.drafters": [EntryPoint("echo", "thirdparty_plugins:EchoDrafter", "specdec.drafters")],
              "specdec.controllers": [EntryPoint("fixed", "thirdparty_plugins:FixedController",
                                                 "specdec.controllers")]}
    fake = lambda group: points.get(group, [])  # noqa: E731
    monkeypatch.setattr(drafters_base, "entry_points", fake)
    monkeypatch.setattr(controllers_base, "entry_points", fake)
    try:
        assert make_drafter("echo:depth=7").depth == 7
        assert make_controller("fixed:k=5").k == 5
        assert "ngram" in registered_drafters()
    finally:
        drafters_base._DRAFTERS.pop("echo", None)
        controllers_base._CONTROLLERS.pop("fixed", None)
        sys.modules.pop("thirdparty_plugins", None)


def _steps(controller, accepted_lens):
    """Feed a synthetic acceptance trace; return the budgets the controller gave before each step."""
    budgets, history = [], []
    for accepted in accepted_lens:
        budget = controller.budget(history)
        budgets.append(budget)
        step = StepStats(drafted_nodes=budget.max_nodes, draft_depth=budget.max_depth,
                         accepted_len=min(accepted, budget.max_depth))
        history.append(step)
        controller.observe(step)
    return budgets


def test_static_controller_never_changes():
    budgets = _steps(make_controller("static:max_depth=5,max_nodes=9"), [0, 5, 5, 1, 0])
    assert all(b == Budget(max_nodes=9, max_depth=5) for b in budgets)


def test_heuristic_controller_follows_hf_schedule():
    """+2 after a fully accepted draft, -1 otherwise, never below 1 nor above max_depth."""
    controller = make_controller("heuristic:start_depth=4,max_depth=9,tree_width=1")
    depths = [b.max_depth for b in _steps(controller, [99, 99, 99, 0, 2, 0, 0, 0, 0, 0, 0, 0])]
    assert depths == [4, 6, 8, 9, 8, 7, 6, 5, 4, 3, 2, 1]
    assert controller.budget([]).max_depth == 4  # a new generation starts over: seeded runs are reproducible


def test_heuristic_ignores_steps_without_a_draft():
    controller = make_controller("heuristic:start_depth=4")
    assert controller.budget([StepStats(drafted_nodes=0, draft_depth=0, accepted_len=0)]).max_depth == 4


def test_budget_rejects_negative_sizes():
    with pytest.raises(ValueError, match=">= 0"):
        Budget(max_nodes=-1, max_depth=2)


def test_cli_flags_come_from_the_config_dataclass():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset")
    add_config_arguments(parser, GenerateConfig)
    args = parser.parse_args(["--max-new-tokens", "7", "--stop", "\n\n", "--stop", "END", "--chat",
                              "off", "--preset", "sample"])
    config = config_from_arguments(GenerateConfig, args, GENERATE_PRESETS)
    assert config.max_new_tokens == 7 and config.stop == ("\n\n", "END") and config.chat == "off"
    assert config.temperature == 0.8 and config.top_p == 0.95  # from the preset
    args = parser.parse_args(["--preset", "sample", "--temperature", "0.3"])
    assert config_from_arguments(GenerateConfig, args, GENERATE_PRESETS).temperature == 0.3  # flag beats preset
