"""User model folders are read from safetensors only: a folder holding nothing but pickle weights
(`pytorch_model.bin`, which can run code when unpickled) is one error line naming it, unless
`model.allow_pickle: true`."""

import pytest
import torch

from tunelab.cli import main
from tunelab.errors import TunelabError
from tunelab.models.load import load_model


@pytest.fixture(scope="module")
def pickle_folder(tmp_path_factory, tokenizer):
    from tunelab.models.tiny import tiny_model

    path = tmp_path_factory.mktemp("m") / "pickled"
    model = tiny_model("llama")
    path.mkdir()
    torch.save(model.state_dict(), path / "pytorch_model.bin")  # what older tools write
    model.config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model


def test_pickle_only_folder_is_refused_with_one_line(pickle_folder):
    path, _ = pickle_folder
    with pytest.raises(TunelabError, match=f"^model {path} has only pickle weights \\(pytorch_model.bin\\).*"
                                           "set model.allow_pickle=true$"):
        load_model(str(path), device="cpu")


def test_allow_pickle_loads_it(pickle_folder):
    path, original = pickle_folder
    model, _ = load_model(str(path), device="cpu", allow_pickle=True)
    for (name, a), b in zip(model.state_dict().items(), original.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_cli_names_the_folder(pickle_folder, tmp_path, capsys):
    path, _ = pickle_folder
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    rc = main(["train", str(_config(tmp_path, path, data))])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith(f"error: model {path} has only pickle weights")
    assert not (tmp_path / "out").exists()


def _config(tmp_path, model, data):
    from tests.helpers import write_config

    return write_config(tmp_path / "c.yaml", output_dir=str(tmp_path / "out"), model={"name": str(model)},
                        data={"train": str(data)}, train={"max_steps": 1}, samples={"n_heldout": 0})
