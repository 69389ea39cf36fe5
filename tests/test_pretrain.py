"""specdec.train.pretrain on a corpus of a few dozen generated .py files: builds, loads, splits, caches, prompts."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from specdec.train import pretrain as pretrain_module
from specdec.train.pretrain import (
    METADATA_FILE,
    PRESETS,
    PretrainConfig,
    completion_prompt,
    default_model_dir,
    ensure_model,
    heldout_code_prompts,
    main,
    pretrain,
    python_sources,
    split_files,
)

HELD_OUT_EVERY = 4  # a few dozen files: hold out enough of them to test the split
MICRO = dataclasses.replace(PRESETS["test-micro"], held_out_every=HELD_OUT_EVERY)

FUNCTION = '''
def scale_{i}_{j}(values, factor={j}):
    """Multiply every value by factor (module {i}, function {j})."""
    result = []
    for value in values:
        result.append(value * factor + {i})
    return result
'''


def write_corpus(root: Path, n_files: int = 40) -> Path:
    """n_files modules of ~1.3 KB under root/pkg{0,1,2}, each with a unique first line; plus files to ignore."""
    for i in range(n_files):
        package = root / f"pkg{i % 3}"
        package.mkdir(parents=True, exist_ok=True)
        functions = "".join(FUNCTION.format(i=i, j=j) for j in range(6))
        (package / f"module_{i}.py").write_text(f'"""Module {i}."""\nimport os\n' + functions)
    (root / "tiny.py").write_text("x = 1\n")  # < 500 B
    (root / "notes.txt").write_text("not python\n" * 100)
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "cached.py").write_text("y = 2\n" * 200)
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def built(tmp_path_factory, corpus) -> Path:
    """test-micro built into a dir that already holds a stale, metadata-less build (it must be replaced)."""
    out_dir = tmp_path_factory.mktemp("models") / "micro"
    out_dir.mkdir()
    (out_dir / "stale.bin").write_bytes(b"half-written")
    return pretrain(MICRO, out_dir, roots=[corpus], progress=False)


def test_python_sources_keeps_only_py_files_of_the_right_size(corpus):
    names = {path.name for path in python_sources([corpus])}
    assert names == {f"module_{i}.py" for i in range(40)}


def test_split_is_deterministic_disjoint_and_independent_of_where_the_root_lies(corpus, tmp_path):
    files = python_sources([corpus])
    train, held_out = split_files(files, HELD_OUT_EVERY, [corpus])
    assert held_out and train
    assert set(train).isdisjoint(held_out) and set(train) | set(held_out) == set(files)
    assert split_files(list(reversed(files)), HELD_OUT_EVERY, [corpus]) == (train, held_out)

    moved = shutil.copytree(corpus, tmp_path / "elsewhere")
    _, moved_held_out = split_files(python_sources([moved]), HELD_OUT_EVERY, [moved])
    assert [path.relative_to(moved) for path in moved_held_out] == [path.relative_to(corpus) for path in held_out]


def test_build_loads_with_auto_classes_and_records_metadata(built):
    model = AutoModelForCausalLM.from_pretrained(built)
    tokenizer = AutoTokenizer.from_pretrained(built)
    assert model.config.vocab_size == len(tokenizer) == MICRO.vocab_size
    assert model.config.eos_token_id == tokenizer.eos_token_id is not None
    ids = tokenizer("def f(x):\n    return x\n", return_tensors="pt").input_ids
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], MICRO.vocab_size)

    metadata = json.loads((built / METADATA_FILE).read_text())
    assert metadata["config"] == dataclasses.asdict(MICRO)
    assert metadata["steps"] == MICRO.max_steps
    assert metadata["corpus"]["train_tokens"] > 0 and metadata["held_out_loss"] > 0
    assert not (built / "stale.bin").exists()
    assert [path.name for path in built.parent.iterdir()] == ["micro"]  # no staging dir left behind


def test_tokenizer_round_trips_python_source_exactly(built):
    tokenizer = AutoTokenizer.from_pretrained(built)
    source = (
        "class Point:\n"
        '    """A point; unicode: é ✓."""\n\n'
        "    def norm(self,  p=2):\n"
        "\tif p:   # tab, runs of spaces\n"
        "        return (self.x ** p + self.y ** p) ** (1 / p)\n\n\n"
        "    \n"
    )
    ids = tokenizer(source).input_ids
    assert tokenizer.bos_token_id not in ids and tokenizer.eos_token_id not in ids
    assert tokenizer.decode(ids) == source


def test_ensure_model_builds_once_and_rebuilds_a_dir_without_metadata(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    builds = []

    def record_build(config: PretrainConfig, out_dir: Path, roots=None, progress=True) -> Path:
        builds.append(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / METADATA_FILE).write_text(json.dumps({"config": dataclasses.asdict(config)}))
        return out_dir

    monkeypatch.setattr(pretrain_module, "pretrain", record_build)
    model_dir = default_model_dir("test-micro")
    assert model_dir == tmp_path / "cache" / "models" / "test-micro"

    assert ensure_model("test-micro", progress=False) == model_dir
    assert ensure_model("test-micro", progress=False) == model_dir
    assert builds == [model_dir]

    (model_dir / METADATA_FILE).unlink()
    ensure_model("test-micro", progress=False)
    assert builds == [model_dir, model_dir]


def test_ensure_model_rejects_unknown_presets():
    with pytest.raises(ValueError, match="unknown pretrain preset 'nope'"):
        ensure_model("nope", progress=False)


def test_heldout_prompts_come_from_held_out_files_only(corpus):
    train, held_out = split_files(python_sources([corpus]), HELD_OUT_EVERY, [corpus])
    prompts = heldout_code_prompts(100, roots=[corpus], held_out_every=HELD_OUT_EVERY)
    assert prompts == heldout_code_prompts(100, roots=[corpus], held_out_every=HELD_OUT_EVERY)
    assert len(prompts) == len(held_out)
    held_out_sources = {path.read_text() for path in held_out}
    train_sources = {path.read_text() for path in train}
    for prompt in prompts:
        assert prompt.endswith('"""\n')  # up to and including the first function's docstring
        assert sum(source.startswith(prompt) for source in held_out_sources) == 1
        assert not any(source.startswith(prompt) for source in train_sources)
    assert len(heldout_code_prompts(2, roots=[corpus], held_out_every=HELD_OUT_EVERY)) == 2


SOURCE = '''import os

@decorator
def parse(text: str,
          table={"a": 1},  # a ':' inside brackets
          key=lambda item: item) -> dict[str, int]:
    # the body starts here
    return {}


def documented(x):
    """Doc
    string."""
    return x
'''


@pytest.mark.parametrize(
    "source, max_lines, expected_lines",
    [
        (SOURCE, 40, 6),  # signature without a docstring: up to its closing ':' line
        (SOURCE.replace("    # the body starts here\n", '    """Parse."""\n'), 40, 7),  # + the docstring
        (SOURCE, 5, 5),  # the signature ends past max_lines: the first max_lines lines
        ("x = (\n" * 3, 2, 2),  # not parsable: the first max_lines lines
    ],
)
def test_completion_prompt_stops_after_the_first_signature_and_docstring(source, max_lines, expected_lines):
    lines = source.splitlines(keepends=True)
    assert completion_prompt(source, max_lines) == "".join(lines[:expected_lines])


def test_cli_overrides_preset_fields(corpus, tmp_path):
    out_dir = tmp_path / "cli"
    main(["--preset", "test-micro", "--out", str(out_dir), "--root", str(corpus), "--max-steps", "3",
          "--held-out-every", str(HELD_OUT_EVERY)])  # fmt: skip
    metadata = json.loads((out_dir / METADATA_FILE).read_text())
    assert metadata["config"] == dataclasses.asdict(dataclasses.replace(MICRO, max_steps=3))
    assert metadata["steps"] == 3


def test_config_needs_a_budget():
    with pytest.raises(ValueError, match="needs a budget"):
        dataclasses.replace(PRESETS["test-micro"], max_steps=None)


def test_training_is_reproducible(corpus, tmp_path, monkeypatch):
    """Same seed, same corpus, same max_steps, same thread count: bitwise-equal weights."""
    monkeypatch.setattr(pretrain_module, "free_cores", lambda: 1)
    first = AutoModelForCausalLM.from_pretrained(pretrain(MICRO, tmp_path / "a", roots=[corpus], progress=False))
    second = AutoModelForCausalLM.from_pretrained(pretrain(MICRO, tmp_path / "b", roots=[corpus], progress=False))
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
