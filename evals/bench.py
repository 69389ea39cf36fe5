"""`specdec bench`: a Spec-Bench-style run over one target, every method in the same process, and its report.

Exit codes: 0 = every method's output equals `ar`'s (temperature 0); 3 = an algorithmic mismatch; 4 = only near-tie
flips (the target's two competing logits within --tie-tolerance: rounding, not a bug); 130 = interrupted (what
finished is still written); 2 = bad input.

Several GPUs: `accelerate launch -m specdec.evals ...` shards the questions across processes and merges the results
on the main process."""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from specdec.backends.cpu_linear import LinearKernel
from specdec.config import option
from specdec.drafters.base import parse_spec
from specdec.evals.controllers import best_static, compare, expand_methods
from specdec.evals.data import load_questions
from specdec.evals.methods import BenchContext
from specdec.evals.metrics import summarize
from specdec.evals.runner import BenchSettings, check_lossless, run_bench
from specdec.sampling import SamplingParams

console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

EXIT_ALGORITHMIC, EXIT_NEAR_TIE, EXIT_INTERRUPTED = 3, 4, 130


@dataclass(frozen=True)
class BenchConfig:
    target: str | None = option(None, "a catalogue model (specdec models list), a .gguf file, an HF folder or id, "
                                      "or zoo:<preset> (a locally trained target; default zoo:cpu-tiny)")
    data: str = option("code", "spec_bench, code[:N] (held-out code prompts), a .jsonl path, or a datasets name")
    field: str = option("turns", "the record field holding the prompt (a string or a list of turns)")
    categories: tuple[str, ...] = option((), "only these categories (repeatable)")
    limit: int | None = option(None, "at most this many questions per category")
    shuffle_seed: int | None = option(None, "shuffle the questions with this seed before --limit")
    methods: str = option("ar,ngram,hf,hf-lookup", "comma-separated: ar, hf, hf-lookup, hf-assisted, or drafter "
                                                   "specs such as ngram:max_n=4,min_n=2; SPEC@CONTROLLER gives a "
                                                   "drafter its own controller (ngram@static:max_depth=8)")
    controller: str = option("heuristic", "the draft-size controller of the specdec methods without their own")
    controllers: str | None = option(None, "cross every drafter method with these controllers (comma-separated, "
                                           "e.g. goodput,heuristic,tree_size,threshold): DRAFTER@CONTROLLER each")
    static_sweep: str | None = option(None, "also run each drafter with static budgets of these depths (e.g. "
                                            "1,2,4,8) and report the best beside the controllers")
    static_width: int = option(2, "static sweep: max_nodes = width * depth")
    dev_limit: int = option(0, "pick the mixed workload's best static budget on this many more questions per "
                               "category (a dev split, run first, untimed in the results); 0 = on the timed ones")
    backend: str = option("hf", "how ar and the specdec methods run the target: hf (DynamicCache), static "
                                "(preallocated cache), graph (static cache + CUDA graphs + Triton tree attention) or "
                                "native (graph with specdec's own Llama-family forward)")
    assistant: str | None = option(None, "draft model for hf-assisted (any source --target takes)")
    max_new_tokens: int = option(128, "new tokens per turn")
    runs: int = option(1, "timed repetitions (mean ± std over them; --batch-size: the median, methods in turn)")
    warmup: int = option(1, "untimed questions per method before timing")
    temperature: float = option(0.0, "0 = greedy, where outputs are checked against ar")
    top_p: float = option(1.0, "nucleus mass")
    top_k: int = option(0, "top-k (0 = off)")
    seed: int = option(0, "sampling seed")
    template: str = option("auto", "prompt format: auto, chat, plain, none (raw text)")
    dtype: str = option("auto", "auto (bfloat16 on a GPU and on a CPU with AMX / AVX512-BF16, else float32), "
                                "float32, bfloat16, float16")
    device: str | None = option(None, "default: cuda if available")
    tie_tolerance: float = option(0.0, "a mismatch whose logit gap is within this is a near-tie flip (default 0: "
                                       "by the dtype, two ulps at the logits' magnitude, at least 0.125 on "
                                       "bf16/fp16 and 1e-4 on fp32)")
    stream: bool = option(False, "prequential: the questions once, in order (--data a+b: a shift), each answered "
                                 "before a learning drafter (online=True) learns from it; tau and tokens/s per window")
    window: int = option(25, "--stream: questions per window")
    batch_size: str | None = option(None, "batched decoding at these batch sizes (e.g. 1,4,16): each method over "
                                          "the questions' first turns, speedup over batched ar at the same size")
    out: str | None = option(None, "write results.json, results.md and chart.png here")
    num_processes: int = option(1, "shard the questions over this many processes (GPUs) via accelerate launch")


BENCH_PRESETS = {
    "smoke": {"limit": 2, "max_new_tokens": 32, "methods": "ar,ngram"},
    "code": {"data": "code:20", "max_new_tokens": 128},
    "spec-bench": {"data": "spec_bench", "max_new_tokens": 256, "limit": 10},
}


_OPTION = re.compile(r"[A-Za-z_]\w*\s*=")  # "max_n=4", not "ngram:max_n=4"


def split_methods(methods: str) -> list[str]:
    """'ar,ngram:max_n=4,min_n=2,hf' -> ['ar', 'ngram:max_n=4,min_n=2', 'hf']: a part that starts with `key=` joins
    the last method's options (its value may hold ':' or '@': 'model:path=D,mode=tree@static:max_depth=7,max_nodes=15'
    is one method, a drafter with a controller of its own)."""
    out: list[str] = []
    for part in filter(None, (p.strip() for p in methods.split(","))):
        if _OPTION.match(part) and out:
            out[-1] += "," + part
        else:
            out.append(part)
    if len(set(out)) != len(out):
        raise ValueError(f"a method is listed twice in {methods!r}")
    return out


def load_target(config: BenchConfig):
    """(model, tokenizer, description, dtype note) for `--target` (default zoo:cpu-tiny)."""
    from specdec.models import load_model

    target = config.target or "zoo:cpu-tiny"
    model, tokenizer, dtype_note = load_model(target, config.dtype, config.device)
    return model, tokenizer, target, dtype_note


def environment(model, target: str) -> dict:
    import transformers

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else platform.processor() or "cpu"
    return {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
            "triton": triton_version, "python": platform.python_version(), "dtype": str(model.dtype).split(".")[-1],
            "target": target, "target_params": sum(p.numel() for p in model.parameters()),
            "threads": torch.get_num_threads(), "linear": LinearKernel(model).name}


def run(config: BenchConfig, argv: list[str] | None = None, show_progress: bool = True) -> tuple[dict, int]:
    """Run the benchmark; returns (payload, exit code). On several processes only the main one gets the payload."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    methods, groups = _crossed_methods(config)
    settings = BenchSettings(methods, config.max_new_tokens, config.runs, config.warmup, config.template)
    params = SamplingParams(config.temperature, config.top_k, config.top_p, config.seed)
    questions = load_questions(config.data, config.categories, config.limit, config.shuffle_seed, config.field)
    dev_questions = _dev_split(config, questions) if groups and config.dev_limit else []
    state = PartialState()
    model, tokenizer, target, dtype_note = load_target(dataclasses.replace(config, device=config.device or (
        str(state.device) if state.device.type == "cuda" else None)))
    if state.is_main_process and show_progress:
        console.print(f"target {target}: {dtype_note}")
    assistant = None
    if config.assistant:
        from specdec.models import load_model

        assistant = load_model(config.assistant, model.dtype, str(model.device))[0]
    from specdec.backends import BACKENDS

    if config.backend not in BACKENDS:
        raise ValueError(f"unknown backend {config.backend!r}; choose one of {', '.join(BACKENDS)}")
    context = BenchContext(model, tokenizer, params, config.controller, assistant, config.backend)
    dev_best = {}
    if dev_questions:  # the static sweep on the dev split picks each drafter's mixed-workload budget
        sweep = ["ar", *(m for group in groups.values() for m in group["static"])]
        dev = run_bench(context, dev_questions, dataclasses.replace(settings, methods=sweep),
                        show_progress and state.is_main_process)
        dev_summary = summarize([r.as_dict() for r in dev.records])
        dev_best = {drafter: best_static(dev_summary, group["static"]) for drafter, group in groups.items()}
    with state.split_between_processes(questions) as shard:
        bench = run_bench(context, shard, settings, show_progress and state.is_main_process)
    tolerance = config.tie_tolerance or "auto"  # auto: each mismatch's own, by the dtype (runner.near_tie_tolerance)
    compared, mismatches = check_lossless(bench.records, model, config.tie_tolerance) if params.greedy else (0, [])
    gathered = gather_object([{"records": [r.as_dict() for r in bench.records], "compared": compared,
                               "mismatches": [dataclasses.asdict(m) for m in mismatches],
                               "interrupted": bench.interrupted}])
    if not state.is_main_process:
        return {}, 0
    payload, code = _payload(config, argv, model, target, gathered, tolerance)
    if groups:
        payload["controllers"] = compare(payload["summary"], groups, dev_best)
        payload["dev_questions"] = [q.question_id for q in dev_questions]
    return payload, code


def _crossed_methods(config: BenchConfig) -> tuple[list[str], dict]:
    """The run's methods after --controllers and --static-sweep (evals.controllers)."""
    from specdec.drafters import registered_drafters

    controllers = split_methods(config.controllers) if config.controllers else []
    try:
        sweep = [int(depth) for depth in config.static_sweep.split(",")] if config.static_sweep else []
    except ValueError:
        raise ValueError(f"--static-sweep takes comma-separated depths, got {config.static_sweep!r}") from None
    known = registered_drafters()
    return expand_methods(split_methods(config.methods), controllers, sweep, config.static_width,
                          lambda method: parse_spec(method)[0] in known)


def _dev_split(config: BenchConfig, questions: list) -> list:
    """--dev-limit more questions per category, none of them among the timed ones."""
    if config.dev_limit < 0:
        raise ValueError(f"--dev-limit must be >= 0, got {config.dev_limit}")
    timed = {q.question_id for q in questions}
    limit = None if config.limit is None else config.limit + config.dev_limit
    more = load_questions(config.data, config.categories, limit, config.shuffle_seed, config.field)
    dev = [q for q in more if q.question_id not in timed]
    if not dev:
        raise ValueError("--dev-limit found no questions beyond the timed ones: lower --limit or add data")
    return dev


def _payload(config: BenchConfig, argv, model, target: str, shards: list[dict],
             tolerance: float | str) -> tuple[dict, int]:
    records = [r for shard in shards for r in shard["records"]]
    mismatches = [m for shard in shards for m in shard["mismatches"]]
    kinds = [m["kind"] for m in mismatches]
    interrupted = any(shard["interrupted"] for shard in shards)
    payload = {"schema": "specdec.bench/1", "command": " ".join(["specdec bench", *(argv or [])]),
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "env": environment(model, target), "config": {**dataclasses.asdict(config), "tie_tolerance": tolerance},
               "interrupted": interrupted, "records": records, "summary": summarize(records),
               "lossless": {"checked": sum(shard["compared"] for shard in shards), "mismatches": mismatches,
                            "near_ties": kinds.count("near-tie"), "algorithmic": kinds.count("algorithmic")}}
    code = (EXIT_INTERRUPTED if interrupted else EXIT_ALGORITHMIC if "algorithmic" in kinds
            else EXIT_NEAR_TIE if kinds else 0)
    return payload, code


def report(payload: dict, out: str | None) -> None:
    """Print the summary and the lossless verdict; write the files when `out` is given."""
    from specdec.evals.report import controllers_table, summary_table, write_results

    console.print(summary_table(payload))
    if payload.get("controllers"):
        console.print(controllers_table(payload))
    lossless = payload["lossless"]
    for mismatch in lossless["mismatches"]:
        console.print(f"[bold red]MISMATCH[/] {mismatch['method']} question {mismatch['question_id']} turn "
                      f"{mismatch['turn']}: first differing token at {mismatch['position']} "
                      f"(expected {mismatch['expected']}, got {mismatch['got']}; {mismatch['kind']}, "
                      f"logit gap {mismatch['logit_gap']})")
    if not lossless["mismatches"] and lossless["checked"]:
        console.print(f"lossless: all {lossless['checked']} answers identical to ar")
    if payload["interrupted"]:
        console.print("[yellow]interrupted: the results cover what finished[/]")
    if out:
        for path in write_results(payload, Path(out)):
            console.print(f"wrote {path}")


def _launch(num_processes: int, argv: list[str]) -> int:
    """Re-run this command under `accelerate launch` with `num_processes` workers (one per GPU, or CPU processes)."""
    import subprocess

    rest = [a for i, a in enumerate(argv) if a != "--num-processes" and (i == 0 or argv[i - 1] != "--num-processes")]
    device = [] if torch.cuda.is_available() else ["--cpu"]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *device,
               "-m", "specdec.evals", *rest]
    return subprocess.call(command)


def main(argv: list[str] | None = None) -> int:
    """`python -m specdec.evals` / `accelerate launch -m specdec.evals`: the same flags as `specdec bench`."""
    import argparse

    from specdec.config import add_config_arguments

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="specdec bench")
    parser.add_argument("--preset", choices=sorted(BENCH_PRESETS))
    add_config_arguments(parser, BenchConfig)
    args = parser.parse_args(argv)
    return bench_command(args, argv)


def bench_command(args, argv: list[str]) -> int:
    from specdec.config import config_from_arguments

    config = config_from_arguments(BenchConfig, args, BENCH_PRESETS)
    if config.num_processes > 1 and "WORLD_SIZE" not in os.environ:
        return _launch(config.num_processes, argv)
    if config.stream:
        return stream_command(config, argv)
    if config.batch_size:
        return batch_command(config, argv)
    payload, code = run(config, argv)
    if payload:
        report(payload, config.out)
    return code


def _write_side_run(config: BenchConfig, argv: list[str], model, target: str, result: dict, kind: str,
                    markdown: str) -> Path:
    """`--out`'s KIND.json (the result with the command, environment and config) and KIND.md -> the folder."""
    import json

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"schema": f"specdec.{kind}/1", "command": " ".join(["specdec bench", *argv]),
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "env": environment(model, target), "config": dataclasses.asdict(config), **result}
    (out / f"{kind}.json").write_text(json.dumps(payload, indent=1) + "\n")
    (out / f"{kind}.md").write_text(markdown)
    console.print(f"wrote {out / kind}.json, {kind}.md")
    return out


def batch_command(config: BenchConfig, argv: list[str]) -> int:
    """`specdec bench --batch-size 1,4,16`: every method at every batch size (`specdec.evals.batch_bench`)."""
    from specdec.backends.hf import context_window
    from specdec.evals import batch_bench
    from specdec.evals.runner import BenchSettings, first_turn_ids

    try:
        sizes = [int(size) for size in config.batch_size.split(",")]
    except ValueError:
        raise ValueError(f"--batch-size takes comma-separated integers, got {config.batch_size!r}") from None
    model, tokenizer, target, dtype_note = load_target(config)
    console.print(f"target {target}: {dtype_note}")
    params = SamplingParams(config.temperature, config.top_k, config.top_p, config.seed)
    context = BenchContext(model, tokenizer, params, config.controller, None, config.backend)
    questions = load_questions(config.data, config.categories, config.limit, config.shuffle_seed, config.field)
    window = context_window(model.config)
    room = window - config.max_new_tokens if window else None
    template = BenchSettings(["ar"], template=config.template).template
    prompts = []
    for question in questions:
        ids = first_turn_ids(tokenizer, question, template)
        prompts.append(ids[-room:] if room else ids)
    result = batch_bench.run_batches(context, prompts, split_methods(config.methods), sizes, config.max_new_tokens,
                                     config.tie_tolerance, config.runs)
    console.print(batch_bench.batch_table(result))
    if config.out:
        _write_side_run(config, argv, model, target, result, "batch", batch_bench.markdown(result))
    if not result["greedy"]:
        return 0
    speculative = [r for r in result["rows"] if r["method"] not in ("ar", "hf", "hf-static")]  # (HF's flips: its own)
    return (EXIT_ALGORITHMIC if any(r["algorithmic"] for r in speculative) else
            EXIT_NEAR_TIE if any(r["near_ties"] for r in speculative) else 0)


def stream_command(config: BenchConfig, argv: list[str]) -> int:
    """`specdec bench --stream`: one process, the questions in order, learning drafters beside frozen ones."""
    from specdec.backends.hf import context_window
    from specdec.evals import stream

    if config.num_processes > 1:
        raise ValueError("--stream runs in one process: a stream's order is the experiment")
    model, tokenizer, target, dtype_note = load_target(config)
    console.print(f"target {target}: {dtype_note}")
    params = SamplingParams(config.temperature, config.top_k, config.top_p, config.seed)
    context = BenchContext(model, tokenizer, params, config.controller, None, config.backend)
    questions = stream.load_stream(config.data, config.categories, config.limit, config.field)
    window = context_window(model.config)
    result = stream.run_stream(context, questions, split_methods(config.methods), config.max_new_tokens,
                               config.template, config.window, prompt_room=window and window - config.max_new_tokens)
    console.print(stream.window_table(result, "tau"))
    console.print(stream.window_table(result, "tokens_per_s"))
    lossless = result["lossless"]
    bad = [m for m in lossless["mismatches"] if m["kind"] == "algorithmic"]
    console.print(f"lossless: {lossless['checked'] - len(lossless['mismatches'])}/{lossless['checked']} answers "
                  f"identical to {lossless['reference']} ({len(lossless['mismatches']) - len(bad)} near-tie flips, "
                  f"{len(bad)} algorithmic)")
    if config.out:
        out = _write_side_run(config, argv, model, target, result, "stream", stream.markdown(result))
        stream.write_chart(result, out / "stream.png")
    return EXIT_ALGORITHMIC if bad else EXIT_NEAR_TIE if lossless["mismatches"] else 0
