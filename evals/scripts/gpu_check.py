"""Issue 4's GPU checks at real sizes (the CPU tests' equalities, compiled Triton instead of the interpreter):

1. tree attention == the float64 torch reference within 2x the same-dtype torch error, over real shapes (1.1B: 4 kv
   heads x GQA 8, D 64; 7B: 32 kv heads, D 128; GQA 4, D 128), T in 1, 3, 63, 64, 256 and P in 0, 1, 97, 1025,
   4096, 16384, bf16 and fp16 -- and the static-cache form (P as a device tensor, a tail of stale keys);
2. kv_compact and greedy_accept (acceptance + compaction on the device) == their references on a 1.1B-shaped cache;
3. the fast path (static cache + CUDA graphs + tree attention): AR through it equals our AR decoder on the HF
   backend token for token, and so does step-by-step verification of random trees around the true continuation
   (1 to ~130 queries, every bucket; each step's accepted length checked) -- float32 random-init Llama, 6 prompts;
   and the model drafter and early_exit with their KV on graphs (`graphs=True`) equal to AR too;
4. the native forward (`NativeBackend`): its kernels in bf16 at real widths (2x the torch error), and the same AR and
   tree-verification equalities as 3.

    python3 evals/scripts/gpu_check.py [OUT_FILE]      # prints PASS/FAIL lines; exit 1 on any failure
"""

import itertools
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from test_kernels import random_tree, tree_block  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from specdec.backends.graph import GraphBackend  # noqa: E402
from specdec.backends.hf import HFBackend  # noqa: E402
from specdec.backends.native import NativeBackend  # noqa: E402
from specdec.kernels.greedy_accept import greedy_accept, greedy_accept_reference  # noqa: E402
from specdec.kernels.gemv import gemv, gemv_gated, gemv_qkv_rope  # noqa: E402
from specdec.kernels.kv_compact import kv_compact, kv_compact_reference  # noqa: E402
from specdec.kernels.rmsnorm import add_rmsnorm, add_rmsnorm_reference  # noqa: E402
from specdec.kernels.rope_cache import rope_cache, rope_cache_reference  # noqa: E402
from specdec.kernels.silu_mul import silu_mul, silu_mul_reference  # noqa: E402
from specdec.kernels.tree_attention import tree_attention, tree_attention_reference  # noqa: E402
from specdec.reference import reference_decode  # noqa: E402
from specdec.sampling import SamplingParams  # noqa: E402
from specdec.stopping import StopRule  # noqa: E402
from specdec.tree import DraftTree  # noqa: E402
from specdec.verify import verify  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run under TRITON_INTERPRET=1, small sizes
QUICK = DEVICE == "cpu"
VOCAB = 4096
GREEDY = SamplingParams()
FLOOR = {torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float32: 1e-6}
lines: list[str] = []
failures = 0


def report(ok: bool, text: str) -> None:
    global failures
    failures += not ok
    lines.append(f"{'PASS' if ok else 'FAIL'} {text}")
    print(lines[-1], flush=True)


def attention_case(kv_heads, group, head_dim, tree_size, prefix_len, dtype, static_tail=0, seed=0) -> None:
    generator = torch.Generator(device=DEVICE).manual_seed(seed)  # noqa: F841 (below: on the device)
    q = torch.randn(1, kv_heads * group, tree_size, head_dim, device=DEVICE, generator=generator).to(dtype)
    keys = prefix_len + tree_size + static_tail
    k, v = (torch.randn(1, kv_heads, keys, head_dim, device=DEVICE, generator=generator).to(dtype) for _ in "kv")
    mask = tree_block(random_tree(tree_size - 1, torch.Generator().manual_seed(seed))).to(DEVICE)
    prefix = torch.tensor(prefix_len, device=DEVICE) if static_tail else None
    out = tree_attention(q, k, v, mask, prefix_len=prefix)
    exact = tree_attention_reference(q, k, v, prefix_len, mask, dtype=torch.float64)
    same = tree_attention_reference(q, k, v, prefix_len, mask, dtype=dtype)
    baseline = (same.double() - exact).abs().max().item()
    error = (out.double() - exact).abs().max().item()
    report(error <= 2 * baseline + FLOOR[dtype],
           f"tree_attention Hkv={kv_heads} G={group} D={head_dim} T={tree_size} P={prefix_len} {dtype} "
           f"tail={static_tail}: error {error:.2e}, torch {dtype} error {baseline:.2e}")


def attention_checks() -> None:
    shapes = [(4, 8, 64), (32, 1, 128), (8, 4, 128)][: 1 if QUICK else 3]
    for index, (kv_heads, group, head_dim) in enumerate(shapes):
        for tree_size in (1, 3, 63) if QUICK else (1, 3, 63, 64, 256):
            for prefix_len in (0, 97) if QUICK else (0, 1, 97, 1025, 4096, 16384):
                if kv_heads == 32 and tree_size == 256 and prefix_len == 16384:
                    continue  # the float64 reference alone would need ~10 GB
                dtype = (torch.bfloat16, torch.float16)[(tree_size + prefix_len + index) % 2]
                attention_case(kv_heads, group, head_dim, tree_size, prefix_len, dtype)
    for tree_size, prefix_len in ((1, 2047), (64, 2000), (256, 8000)):  # static cache: P on the device, stale tail
        attention_case(4, 8, 64, tree_size, prefix_len, torch.bfloat16, static_tail=333)


def greedy_advance_checks() -> None:
    """The greedy-advance kernel's pick == torch.argmax on bf16 logits with ties (the first maximum)."""
    from specdec.kernels.greedy import greedy_advance

    generator = torch.Generator(device=DEVICE).manual_seed(3)
    for vocab in (32000, 128256):
        logits = torch.randn(vocab, device=DEVICE, generator=generator).bfloat16()
        logits[[vocab // 3, vocab - 5, 7]] = 30.0
        picks = torch.zeros(2, dtype=torch.long, device=DEVICE)
        inputs = torch.tensor([1, 10, 10, 10], device=DEVICE)
        greedy_advance(logits, picks, 1, inputs[:1], inputs[1:2], inputs[2], inputs[3:])
        report(int(picks[1]) == int(logits.argmax()) == 7 and inputs.tolist() == [7, 11, 11, 11],
               f"greedy_advance V={vocab} bf16 with three equal maxima: picks {int(picks[1])}, torch.argmax "
               f"{int(logits.argmax())}; inputs advanced {inputs.tolist()}")


def compaction_check() -> None:
    torch.manual_seed(0)
    kv = torch.randn(22, 2, 1, 4, 4096, 64, device=DEVICE, dtype=torch.bfloat16)
    source = torch.tensor([1000, 1003, 1004, 1010], device=DEVICE)
    expected = kv.clone()
    kv_compact_reference(expected, source, 1000)
    kv_compact(kv, source, 1000)
    report(torch.equal(kv, expected), "kv_compact 22 layers x (4, 4096, 64) bf16: equal to the reference")


def greedy_accept_check() -> None:
    """The device-side greedy acceptance + compaction == its reference on a 1.1B-shaped cache, random trees."""
    from test_greedy_accept import _case

    for seed, size in itertools.product(range(4), (16, 64, 128)):
        tree, best, tokens, parent_rows = (x.to(DEVICE) if torch.is_tensor(x) else x for x in _case(seed, size))
        kv = torch.randn(22, 2, 1, 4, 1024, 64, device=DEVICE, dtype=torch.bfloat16)
        expected, expected_result = kv.clone(), torch.zeros(2 * size, dtype=torch.long, device=DEVICE)
        greedy_accept_reference(best, tokens, parent_rows, torch.tensor(300), expected, expected_result)
        result = torch.zeros_like(expected_result)
        greedy_accept(best, tokens, parent_rows, torch.tensor(300, device=DEVICE), kv, result)
        report(torch.equal(kv, expected) and torch.equal(result, expected_result),
               f"greedy_accept {size} rows, {len(tree)} nodes, 22 layers x (4, 1024, 64) bf16: accepted "
               f"{int(result[0])}, equal to the reference")


def tree_around(truth: list[int], rng: random.Random, true_len: int, branches: int) -> DraftTree:
    """The first `true_len` true tokens among `branches` wrong branches that leave the truth at random depths."""
    paths = [truth[:true_len]] if true_len else []
    for _ in range(branches):
        leave = rng.randrange(0, true_len + 1)
        wrong = (truth[leave] + 1 + rng.randrange(VOCAB - 1)) % VOCAB
        paths.append(truth[:leave] + [wrong] + [rng.randrange(VOCAB) for _ in range(rng.randrange(0, 4))])
    return DraftTree.from_paths(paths or [[(truth[0] + 1) % VOCAB]])


def within_twice_torch(out: torch.Tensor, exact: torch.Tensor, same: torch.Tensor) -> tuple[bool, str]:
    baseline = (same.double() - exact).abs().max().item()
    error = (out.double() - exact).abs().max().item()
    ok = error <= 2 * baseline + FLOOR[out.dtype] * max(1.0, exact.abs().max().item())
    return ok, f"error {error:.2e}, torch {out.dtype} error {baseline:.2e}"


def native_kernel_checks() -> None:
    """The native forward's kernels in bf16 at the 1.1B / 7B widths, and attention over a block longer than T."""
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    for hidden_size, inner in ((2048, 5632), (4096, 11008)):
        hidden, delta = (torch.randn(64, hidden_size, device=DEVICE, generator=generator).bfloat16() for _ in "hd")
        weight = (1 + torch.randn(hidden_size, device=DEVICE, generator=generator) / 4).bfloat16()
        exact = add_rmsnorm_reference(hidden.double(), weight.double(), 1e-5, delta.double())
        same = add_rmsnorm_reference(hidden.clone(), weight, 1e-5, delta)
        ok, text = within_twice_torch(add_rmsnorm(hidden.clone(), weight, 1e-5, delta), exact, same)
        report(ok, f"add_rmsnorm (64, {hidden_size}) bf16: {text}")
        gate_up = torch.randn(64, 2 * inner, device=DEVICE, generator=generator).mul(3).bfloat16()
        ok, text = within_twice_torch(silu_mul(gate_up), silu_mul_reference(gate_up.double()),
                                      silu_mul_reference(gate_up))
        report(ok, f"silu_mul (64, {2 * inner}) bf16: {text}")
    for q_heads, kv_heads, head_dim in ((32, 4, 64), (32, 32, 128)):
        qkv = torch.randn(64, (q_heads + 2 * kv_heads) * head_dim, device=DEVICE, generator=generator).bfloat16()
        angles = torch.arange(4096, device=DEVICE)[:, None] * torch.rand(head_dim // 2, device=DEVICE)
        cos, sin = (torch.cat([f(angles)] * 2, dim=1).bfloat16() for f in (torch.cos, torch.sin))
        positions = torch.randint(0, 4096, (64,), device=DEVICE)
        slots = torch.randperm(4096, device=DEVICE)[:64]
        caches = [torch.zeros(kv_heads, 4096, head_dim, device=DEVICE, dtype=torch.bfloat16) for _ in range(4)]
        mine, expected = qkv.clone(), qkv.clone()
        rope_cache(mine, positions, slots, cos, sin, caches[0], caches[1], q_heads)
        rope_cache_reference(expected, positions, slots, cos, sin, caches[2], caches[3], q_heads)
        ulps = max(((mine.float() - expected.float()).abs() / expected.float().abs().clamp(min=1e-3)).max().item(),
                   ((caches[0].float() - caches[2].float()).abs() / caches[2].float().abs().clamp(min=1e-3)).max()
                   .item()) * 2 ** 7  # in units of a bf16 ulp at each value's magnitude (at most)
        report(ulps <= 1.0 and torch.equal(caches[1], caches[3]),
               f"rope_cache Hq={q_heads} Hkv={kv_heads} D={head_dim} bf16: at most {ulps:.2f} bf16 ulp from the "
               f"reference (float32 FMA vs mul-add, one rounding), values copied exactly")
    gemv_checks(generator)
    q = torch.randn(1, 32, 16, 64, device=DEVICE, generator=generator).bfloat16()
    k, v = (torch.randn(1, 4, 4096, 64, device=DEVICE, generator=generator).bfloat16() for _ in "kv")
    block = tree_block(random_tree(40, torch.Generator().manual_seed(1)))[25:].to(DEVICE)  # 16 queries, 41 keys
    out = tree_attention(q, k, v, block, prefix_len=torch.tensor(3000, device=DEVICE), block_len=41)
    ok, text = within_twice_torch(out, *(tree_attention_reference(q, k, v, 3000, block, dtype=dtype, block_len=41)
                                         for dtype in (torch.float64, torch.bfloat16)))
    report(ok, f"block attention: tree_attention, 16 queries inside a block of 41 keys after P=3000, bf16: {text}")


def gemv_checks(generator: torch.Generator) -> None:
    """The one-token GEMVs with their fused ops, bf16 at the 1.1B / 7B shapes, vs the unfused torch ops."""
    eps = 1e-5
    for hidden, q_heads, kv_heads, inner in ((2048, 32, 4, 5632), (4096, 32, 32, 11008)):
        head_dim = hidden // q_heads

        def rand(*shape, scale=1.0):
            return (torch.randn(*shape, device=DEVICE, generator=generator) * scale).bfloat16()

        x, norm, stream = rand(1, hidden), 1 + rand(hidden, scale=0.25), rand(1, hidden)
        for name, rows, size in (("o", hidden, hidden), ("down", hidden, inner)):
            weight, source = rand(rows, size, scale=size ** -0.5), rand(1, size)
            exact = stream.double() + F.linear(source.double(), weight.double())
            same = stream + F.linear(source, weight)
            ok, text = within_twice_torch(gemv(source, weight, residual=stream.clone()), exact, same)
            report(ok, f"gemv {name} + residual ({rows}x{size}) bf16: {text}")

        def normed(t, w):
            return add_rmsnorm_reference(t.clone(), w, eps)

        gate_up = rand(2 * inner, hidden, scale=hidden ** -0.5)
        exact = silu_mul_reference(F.linear(normed(x.double(), norm.double()), gate_up.double()))
        same = silu_mul_reference(F.linear(normed(x, norm), gate_up))
        ok, text = within_twice_torch(gemv_gated(x, gate_up, norm, eps), exact, same)
        report(ok, f"gemv_gated norm + gate_up ({2 * inner}x{hidden}) + silu*up bf16: {text}")
        qkv = rand((q_heads + 2 * kv_heads) * head_dim, hidden, scale=hidden ** -0.5)
        angles = torch.arange(4096, device=DEVICE)[:, None] * torch.rand(head_dim // 2, device=DEVICE)
        cos, sin = (torch.cat([f(angles)] * 2, dim=1).bfloat16() for f in (torch.cos, torch.sin))
        where = torch.tensor([3001], device=DEVICE)
        results = []
        for dtype in (None, torch.float64, torch.bfloat16):  # the kernel, then the unfused torch ops
            caches = [torch.zeros(kv_heads, 4096, head_dim, device=DEVICE, dtype=dtype or torch.bfloat16)
                      for _ in "kv"]
            if dtype is None:
                queries = gemv_qkv_rope(x, qkv, where, where, cos, sin, *caches, q_heads, norm, eps)
            else:
                projected = F.linear(normed(x.to(dtype), norm.to(dtype)), qkv.to(dtype))
                rope_cache_reference(projected, where, where, cos.to(dtype), sin.to(dtype), *caches, q_heads)
                queries = projected[:, : q_heads * head_dim]
            results.append(torch.cat([queries.flatten(), caches[0][:, 3001].flatten(), caches[1][:, 3001].flatten()]))
        ok, text = within_twice_torch(*results)
        report(ok, f"gemv_qkv_rope norm + qkv ({qkv.shape[0]}x{hidden}) + rotary + KV write bf16: {text}")


def backend_check(backend: GraphBackend, name: str, prompt: list[int], truth: list[int], rng: random.Random,
                  seed: int) -> None:
    """AR through `backend` == AR on HF, and so is the verification of random trees (1 to ~130 queries: every
    bucket) around the truth, step after step, each accepted length checked."""
    ar = reference_decode(backend, prompt, GREEDY, StopRule(260))
    state, committed, wrong_accepts, sizes = backend.prefill(prompt[:-1]), list(prompt), 0, set()
    while len(committed) - len(prompt) < 200:
        done = len(committed) - len(prompt)
        true_len = rng.randrange(0, 8)
        tree = tree_around(truth[done:], rng, true_len, rng.choice([0, 2, 10, 30]))
        sizes.add(backend.bucket(len(tree) + 1, state.length))
        result = verify(backend, state, committed[-1], tree.to(DEVICE), GREEDY, None)
        wrong_accepts += result.accepted_len != true_len
        committed += result.committed_tokens
    got = committed[len(prompt):]
    report(ar == truth and got == truth[: len(got)] and wrong_accepts == 0,
           f"fast path ({name}), prompt {seed} ({len(prompt)} tokens): AR through {name} == AR on HF "
           f"({ar == truth}); tree verification through {name} == AR on HF ({got == truth[: len(got)]}, {len(got)} "
           f"tokens, buckets {sorted(s for s in sizes if s)}, wrong accepted lengths {wrong_accepts}, eager steps "
           f"{backend.eager_steps})")


def fast_path_checks() -> None:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
                         initializer_range=0.1, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(DEVICE).float().eval()
    model.generation_config.eos_token_id = None
    graph = GraphBackend(model)
    native = NativeBackend(model)  # the same weights (HF's modules now view its fused ones), its own cache
    for seed in range(2 if QUICK else 6):
        rng = random.Random(seed)
        prompt = [rng.randrange(VOCAB) for _ in range(100 + 150 * seed)]
        truth = reference_decode(HFBackend(model), prompt, GREEDY, StopRule(260))
        for name, backend in (("graphs", graph), ("native", native)):
            backend_check(backend, name, prompt, truth, random.Random(seed), seed)
    # the model drafter with its own KV on graphs (self-drafting: the target drafts for itself, so deep trees)
    from specdec import SpeculativeGenerator
    from specdec.drafters.model import ModelDrafter

    rng = random.Random(7)
    prompt = [rng.randrange(VOCAB) for _ in range(300)]
    truth = reference_decode(HFBackend(model), prompt, GREEDY, StopRule(200))
    for mode, (name, backend) in itertools.product(("chain", "tree"), (("graph", graph), ("native", native))):
        drafter = ModelDrafter(model, mode=mode, graphs=True)  # its draft steps on the native forward (CUDA)
        out = SpeculativeGenerator(model, drafter=drafter, backend=backend).generate(prompt, max_new_tokens=200)
        report(out.token_ids == truth and out.stats.drafter_errors == 0,
               f"model drafter on graphs ({mode}, self-drafting) through the {name} backend == AR on HF "
               f"({out.token_ids == truth}), tau {out.stats.tau:.2f}, drafter errors {out.stats.drafter_errors}, "
               f"draft graphs {len(drafter.kv.runner._steps)}, eager draft steps {drafter.kv.runner.eager_steps}")
    from specdec.drafters.early_exit import EarlyExitDrafter
    from specdec.train.early_exit import ExitHead, ExitHeadConfig

    torch.manual_seed(1)
    head = ExitHead(ExitHeadConfig.for_target(model, 3, "linear"))  # random head: exercises the path, not tau
    drafter = EarlyExitDrafter(head, threshold=0.0, mode="tree", topk=2, graphs=True)
    out = SpeculativeGenerator(model, drafter=drafter, backend=graph).generate(prompt, max_new_tokens=200)
    report(out.token_ids == truth and out.stats.drafter_errors == 0,
           f"early_exit on graphs (3 of 6 layers, tree) through the graph backend == AR on HF "
           f"({out.token_ids == truth}), tau {out.stats.tau:.2f}, cache layers {drafter.kv.state.buffer.shape[0]}")
    expected = "specdec_tree" if DEVICE == "cuda" else None
    report(graph.attention == expected and model.config._attn_implementation == "sdpa",
           f"graphs captured with {graph.attention!r}; the model kept {model.config._attn_implementation!r}")


if __name__ == "__main__":
    print(torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", torch.__version__, flush=True)
    attention_checks()
    greedy_advance_checks()
    compaction_check()
    greedy_accept_check()
    native_kernel_checks()
    fast_path_checks()
    summary = f"{len(lines) - failures} passed, {failures} failed"
    print(summary)
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text("\n".join(lines + [summary]) + "\n")
    sys.exit(1 if failures else 0)
