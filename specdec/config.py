"""Typed run configurations with named presets; the CLI's flags are derived from these dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field


def option(default, help: str, **extra):
    """A dataclass field that carries its CLI help text."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class GenerateConfig:
    model: str = option("smollm2-135m-instruct", "a catalogue model (`specdec models list`; pulled on first use), a "
                                                 ".gguf file, an HF folder or id, or zoo:<preset> (trained here)")
    prompt: str | None = option(None, "the prompt text (default: a question for a chat model, else a Python "
                                      "function head)")
    drafter: str = option("ngram", "drafter name or spec, e.g. 'ngram:max_n=4'")
    controller: str = option("heuristic", "draft-size controller, e.g. 'static:max_depth=6'")
    max_new_tokens: int = option(128, "generate at most this many tokens")
    temperature: float = option(0.0, "0 = greedy (output identical to plain decoding)")
    top_p: float = option(1.0, "nucleus sampling mass in (0, 1]")
    top_k: int = option(0, "keep the k most likely tokens (0 = off)")
    seed: int = option(0, "seed of every random draw")
    stop: tuple[str, ...] = option((), "stop strings (repeatable)")
    chat: str = option("auto", "apply the tokenizer's chat template: auto (when it has one), on, off")
    dtype: str = option("auto", "model dtype: auto (bfloat16 on a GPU and on a CPU with AMX / AVX512-BF16, else "
                                "float32), float32, bfloat16, float16")
    device: str | None = option(None, "cpu, cuda, cuda:1 ... (default: cuda if available)")
    backend: str = option("hf", "how the target runs: hf, static, graph (static cache + CUDA graphs: the fast "
                                "path on a GPU) or native (graph with specdec's own Llama-family forward)")


GENERATE_PRESETS: dict[str, dict[str, typing.Any]] = {
    "greedy": {},
    "sample": {"temperature": 0.8, "top_p": 0.95},
    "long-draft": {"controller": "static:max_depth=12,max_nodes=24", "drafter": "ngram:max_n=4,max_matches=4"},
}

DEFAULT_QUESTION = "What is the capital of France, and what is it famous for?"
DEFAULT_PROMPT = "import os\nimport json\n\n\ndef load_config(path):\n    \"\"\"Read a JSON config file.\"\"\"\n"


def add_config_arguments(parser: argparse.ArgumentParser, config_cls) -> None:
    """One `--flag` per dataclass field, typed and documented from the field."""
    hints = typing.get_type_hints(config_cls)
    for item in dataclasses.fields(config_cls):
        flag = "--" + item.name.replace("_", "-")
        kind = hints[item.name]
        help_text = item.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(flag, action="append", default=None, help=help_text)
        else:
            scalar = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
            parser.add_argument(flag, type=scalar, default=None, help=f"{help_text} (default: {item.default})")


def config_from_arguments(config_cls, args: argparse.Namespace, presets: dict[str, dict]):
    """Defaults, then the preset named by `args.preset`, then the flags given on the command line."""
    values = dict(presets.get(getattr(args, "preset", None) or "", {}))
    for item in dataclasses.fields(config_cls):
        given = getattr(args, item.name, None)
        if given is not None:
            values[item.name] = tuple(given) if isinstance(given, list) else given
    return config_cls(**values)
