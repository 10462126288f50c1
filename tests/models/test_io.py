import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from sdstack.errors import UnsafeCheckpointError, UserError
from sdstack.models.io import read_state_dict


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    with open(ckpt, "wb") as f:
        pickle.dump({"state_dict": {"w": _Evil(marker)}}, f)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        read_state_dict(ckpt)
    assert not marker.exists()


def test_plain_torch_checkpoint_loads(tmp_path):
    sd = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    torch.save({"state_dict": sd, "global_step": 5}, tmp_path / "m.ckpt")
    got, meta = read_state_dict(tmp_path / "m.ckpt")
    assert meta == {} and set(got) == {"a", "b"} and torch.equal(got["a"], sd["a"])


def test_safetensors_with_metadata(tmp_path):
    save_file({"x": torch.zeros(3)}, tmp_path / "m.safetensors", metadata={"k": "v"})
    got, meta = read_state_dict(tmp_path / "m.safetensors")
    assert meta == {"k": "v"} and torch.equal(got["x"], torch.zeros(3))


@pytest.mark.parametrize("content", [b"", b"\x10\x00", b"\xff" * 64, b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json"])
def test_corrupt_safetensors_is_a_user_error(tmp_path, content):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(content)
    with pytest.raises(UserError):
        read_state_dict(p)


def test_truncated_safetensors_is_a_user_error(tmp_path):
    p = tmp_path / "t.safetensors"
    save_file({"x": torch.zeros(1000)}, p)
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(UserError):
        read_state_dict(p)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_state_dict(tmp_path / "nope.safetensors")
    (tmp_path / "m.gguf").write_bytes(b"x")
    with pytest.raises(UserError, match="unsupported"):
        read_state_dict(tmp_path / "m.gguf")
