"""`specdec generate`: the README's main command, on a saved tiny model, through each backend."""

import pytest

from specdec.cli import main as cli_main
from tiny_models import VOCAB, repetitive_prompt, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _prompt_text() -> str:
    return tiny_tokenizer().decode(repetitive_prompt(VOCAB, seed=1))


def test_generate_streams_the_same_text_on_every_backend(model_dir, capsys):
    texts = {}
    for backend in ("hf", "static", "graph"):
        argv = ["generate", "--model", str(model_dir), "--prompt", _prompt_text(), "--max-new-tokens", "24",
                "--backend", backend, "--dtype", "float32", "--device", "cpu"]
        assert cli_main(argv) == 0
        texts[backend] = capsys.readouterr().out
    assert texts["hf"].startswith(_prompt_text()) and len(texts["hf"]) > len(_prompt_text()) + 24
    assert texts["static"] == texts["hf"] == texts["graph"]


def test_generate_refuses_an_unknown_backend(model_dir, capsys):
    argv = ["generate", "--model", str(model_dir), "--prompt", "abab", "--backend", "nope", "--device", "cpu"]
    assert cli_main(argv) == 2
    assert "unknown backend 'nope'" in capsys.readouterr().err
