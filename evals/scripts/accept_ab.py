"""A/B of greedy acceptance on the device vs on the host, through `specdec bench` (issue 4's end-to-end goal).

    python3 evals/scripts/accept_ab.py device BENCH_FLAGS...   # as `specdec bench` runs today
    python3 evals/scripts/accept_ab.py host BENCH_FLAGS...     # the same, with verify's host path (argmax read,
                                                               # `greedy_walk`, host-launched KV move)
    python3 evals/scripts/accept_ab.py --summary DIR           # one line per run found under DIR/*/results.json

The summary gives, per speculative method: tokens/s, speedup over the run's own `ar`, tau, the per-forward split
(t_verify, t_draft, t_other; prefill's share of t_other from the phase split) and efficiency = S / S_step.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path


def summary(root: Path) -> None:
    for path in sorted(root.glob("*/results.json")):
        payload = json.loads(path.read_text())
        phases: dict[str, Counter] = {}
        for record in payload["records"]:
            phases.setdefault(record["method"], Counter()).update(record["phase_seconds"])
            phases[record["method"]]["forwards"] += record["forwards"]
        for method, entry in payload["summary"].items():
            if method == "ar":
                continue
            metric = {name: value["mean"] for name, value in entry["overall"].items() if isinstance(value, dict)
                      and "mean" in value}
            prefill = phases[method]["prefill"] / max(phases[method]["forwards"], 1)
            print(f"{path.parent.name:24s} {method:10s} {metric['tokens_per_s']:7.0f} tok/s  speedup "
                  f"{metric['speedup']:.2f}x  tau {metric['tau']:.2f}  t_verify {metric['t_verify'] * 1e3:.3f}  "
                  f"t_draft {metric['t_draft'] * 1e3:.3f}  t_other {metric['t_other'] * 1e3:.3f} ms (prefill "
                  f"{prefill * 1e3:.3f})  efficiency {metric['efficiency']:.3f}")


def main() -> int:
    if sys.argv[1] == "--summary":
        summary(Path(sys.argv[2]))
        return 0
    mode, argv = sys.argv[1], sys.argv[2:]
    if mode not in ("device", "host"):
        raise SystemExit(f"mode must be device or host, got {mode!r}")
    if mode == "host":
        from specdec.backends.graph import GraphBackend

        GraphBackend.verify_greedy = None  # `verify` then finds no device path and takes the host one
    from specdec.evals.bench import main as bench

    return bench(argv)


if __name__ == "__main__":
    sys.exit(main())
