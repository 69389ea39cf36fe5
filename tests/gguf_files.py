"""Tiny but complete GGUF files, written offline, that transformers loads as a model and as a tokenizer.

    path = write_tiny_gguf(tmp_path / "tiny.gguf", arch="qwen2", quantized=True)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    reference = reference_model("qwen2")            # the numbers the load must give, built from a config

Each file holds a 2-layer decoder (hidden 64, 4 query / 2 key-value heads of 16, FFN 128, context 256) in the
layout llama.cpp writes (GGUF tensor names; q/k rows permuted for "llama", which transformers undoes on load), and
a byte-level BPE tokenizer ("gpt2" in GGUF terms): the 256 byte tokens (token id == byte value), a few merges that
spell "hello world" and some common English pieces, and the ChatML specials <|endoftext|> (BOS/pad),
<|im_start|>, <|im_end|> (EOS), with a ChatML chat template. No BOS is added when encoding.

Weights are random (std 0.02; norms 1 + N(0, 0.02)) from torch.Generator().manual_seed(seed), and are projected
beforehand onto the grid of the type each tensor is stored in when quantized=True (Q8_0 for the FFN and the output
projection, F16 for the attention projections and the embedding, F32 for norms and biases). Storing them
(quantized or all-F32) and dequantizing is therefore exact, so `reference_model(arch, seed)` holds exactly the
values transformers loads from either file, and logits agree to float32 rounding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers
from transformers.convert_slow_tokenizer import bytes_to_unicode

ARCHS = ("llama", "qwen2")
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS
CONTEXT = 256
RMS_EPS = 1e-6
ROPE_THETA = 10000.0
INIT_STD = 0.02

# Byte-level merges, best first; each merged token is appended to the vocabulary in this order. "Ġ" is the
# byte-level spelling of a space.
MERGES = ("h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d", "Ġ t", "Ġt he", "i n",
          "Ġ a", "e r", "o n", "Ġ s")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def vocabulary() -> list[str]:
    """The tokens in id order: 256 bytes, the merged tokens, then the special tokens."""
    spelling = bytes_to_unicode()  # GPT-2's byte -> printable character table
    return [spelling[b] for b in range(256)] + [m.replace(" ", "") for m in MERGES] + list(SPECIAL_TOKENS)


TOKENS = vocabulary()
VOCAB_SIZE = len(TOKENS)
BOS_ID = PAD_ID = TOKENS.index("<|endoftext|>")
EOS_ID = TOKENS.index("<|im_end|>")
IM_START_ID = TOKENS.index("<|im_start|>")


def _layout(arch: str) -> list[tuple[str, tuple[int, ...], str, str]]:
    """(HF name, shape, GGUF name, storage when quantized: "q8_0" | "f16" | "f32"), in generation order."""
    q_rows, kv_rows = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    rows = [("model.embed_tokens.weight", (VOCAB_SIZE, HIDDEN), "token_embd.weight", "f16")]
    for i in range(LAYERS):
        hf, gg = f"model.layers.{i}.", f"blk.{i}."
        rows += [
            (hf + "input_layernorm.weight", (HIDDEN,), gg + "attn_norm.weight", "f32"),
            (hf + "self_attn.q_proj.weight", (q_rows, HIDDEN), gg + "attn_q.weight", "f16"),
            (hf + "self_attn.k_proj.weight", (kv_rows, HIDDEN), gg + "attn_k.weight", "f16"),
            (hf + "self_attn.v_proj.weight", (kv_rows, HIDDEN), gg + "attn_v.weight", "f16"),
        ]
        if arch == "qwen2":
            rows += [
                (hf + "self_attn.q_proj.bias", (q_rows,), gg + "attn_q.bias", "f32"),
                (hf + "self_attn.k_proj.bias", (kv_rows,), gg + "attn_k.bias", "f32"),
                (hf + "self_attn.v_proj.bias", (kv_rows,), gg + "attn_v.bias", "f32"),
            ]
        rows += [
            (hf + "self_attn.o_proj.weight", (HIDDEN, q_rows), gg + "attn_output.weight", "f16"),
            (hf + "post_attention_layernorm.weight", (HIDDEN,), gg + "ffn_norm.weight", "f32"),
            (hf + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN), gg + "ffn_gate.weight", "q8_0"),
            (hf + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN), gg + "ffn_up.weight", "q8_0"),
            (hf + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE), gg + "ffn_down.weight", "q8_0"),
        ]
    # The final norm goes last: 64 F32 values are a whole number of 32-byte alignment units, so the file ends with
    # tensor data, not padding, and cutting off even its last byte makes it unloadable.
    rows += [
        ("lm_head.weight", (VOCAB_SIZE, HIDDEN), "output.weight", "q8_0"),
        ("model.norm.weight", (HIDDEN,), "output_norm.weight", "f32"),
    ]
    return rows


def _on_grid(values: np.ndarray, storage: str) -> np.ndarray:
    """`values` (float32) rounded to what `storage` can hold exactly, so that storing them loses nothing."""
    import gguf

    if storage == "f16":
        return values.astype(np.float16).astype(np.float32)
    if storage == "q8_0":
        qtype = gguf.GGMLQuantizationType.Q8_0
        projected = gguf.quants.dequantize(gguf.quants.quantize(values, qtype), qtype).reshape(values.shape)
        # Q8_0 is idempotent on its own output (each block's largest value is exactly 127 * its f16 scale)
        assert np.array_equal(
            gguf.quants.dequantize(gguf.quants.quantize(projected, qtype), qtype).reshape(values.shape), projected)
        return projected
    return values


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, not {arch!r}")


def _weights(arch: str, seed: int) -> dict[str, np.ndarray]:
    """HF-named float32 weights, already on their storage grids."""
    _check_arch(arch)
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for hf_name, shape, _, storage in _layout(arch):
        values = torch.randn(shape, generator=generator, dtype=torch.float32) * INIT_STD
        if hf_name.endswith("norm.weight"):
            values = values + 1.0
        weights[hf_name] = _on_grid(values.numpy(), storage)
    return weights


def _llama_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py LlamaModel.permute): transformers reverses it on load."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def write_tiny_gguf(path: Path, arch: str = "llama", quantized: bool = True, seed: int = 0) -> Path:
    """Write the tiny `arch` model ("llama" or "qwen2") with its tokenizer to `path` (a .gguf file) and return it.

    quantized=True stores the FFN and output projections as Q8_0, the attention projections and the embedding as
    F16, norms and biases as F32; quantized=False stores everything as F32. Both load to `reference_model`'s
    weights exactly. About 160 KB (quantized) / 440 KB (F32); writing takes ~10 ms."""
    import gguf

    _check_arch(arch)
    path = Path(path)
    weights = _weights(arch, seed)
    writer = gguf.GGUFWriter(str(path), arch)

    writer.add_name(f"tiny-{arch}")  # never "mistral": transformers would re-label a llama file as mistral
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quantized else gguf.LlamaFileType.ALL_F32)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_vocab_size(VOCAB_SIZE)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2" if arch == "qwen2" else "llama-bpe")
    writer.add_token_list(TOKENS)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL
                            for t in TOKENS])
    writer.add_token_merges(list(MERGES))
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_pad_token_id(PAD_ID)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    for hf_name, _, gguf_name, storage in _layout(arch):
        values = weights[hf_name]
        if arch == "llama" and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            values = _llama_permute(values, HEADS if ".attn_q." in gguf_name else KV_HEADS)
        values = np.ascontiguousarray(values)
        if not quantized or storage == "f32":
            writer.add_tensor(gguf_name, values)
        elif storage == "f16":
            writer.add_tensor(gguf_name, values.astype(np.float16))
        else:
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(gguf_name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def reference_config(arch: str) -> transformers.PretrainedConfig:
    """The config transformers rebuilds from the file's metadata."""
    _check_arch(arch)
    common = dict(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=CONTEXT,
                  rms_norm_eps=RMS_EPS, rope_theta=ROPE_THETA, tie_word_embeddings=False,
                  bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    if arch == "llama":
        return transformers.LlamaConfig(head_dim=HEAD_DIM, **common)
    return transformers.Qwen2Config(use_sliding_window=False, **common)


def reference_model(arch: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A float32, eval-mode HF model (LlamaForCausalLM / Qwen2ForCausalLM) built from a config, holding exactly the
    weights `write_tiny_gguf(..., arch, seed=seed)` stores (quantized or not: the values are on the grids)."""
    config = reference_config(arch)
    model_class = transformers.LlamaForCausalLM if arch == "llama" else transformers.Qwen2ForCausalLM
    model = model_class(config).float().eval()
    state = {name: torch.from_numpy(values) for name, values in _weights(arch, seed).items()}
    model.load_state_dict(state, strict=True)
    return model
