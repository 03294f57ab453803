"""Checkpoint directories: atomic, self-describing, safely loaded, pruned."""

from __future__ import annotations

import json
import os

import pytest
import torch

from uvq.checkpoint import (
    load_state_dict,
    load_trainer_state,
    mark_best,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
    weights_file,
    write_checkpoint_dir,
)
from uvq.files import sha256_file
from uvq.runtime import UserError, rng_state, set_rng_state


def _linear(seed):
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 2)


TINY_PRIOR = {"n_embd": 32, "n_head": 2, "n_layer": 1, "codebook_size": 8, "latent_shape": [2, 2]}


def _prior(seed):
    """A real tiny prior: checkpoints that are resumed are checked against their architecture."""
    from uvq.checkpoint import build_model

    torch.manual_seed(seed)
    return build_model("prior", TINY_PRIOR)


def test_write_and_read_back(tmp_path):
    model, ema = _prior(0), _prior(1)
    path = write_checkpoint_dir(tmp_path / "ck", kind="prior", model_config=TINY_PRIOR, weights={"model": model, "ema": ema},
                                step=7, provenance={"source": "test"}, trainer_state={"step": 7, "x": torch.ones(2)})
    meta = read_meta(path)
    assert meta["kind"] == "prior" and meta["step"] == 7 and meta["default_weights"] == "ema"
    sd, _ = load_state_dict(path)
    assert all(torch.equal(sd[k], v) for k, v in ema.state_dict().items())
    sd, _ = load_state_dict(path, "model")
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    assert load_trainer_state(path)["step"] == 7
    assert set(meta["weights_sha256"]) == {"model", "ema"}


def test_no_silent_ema_fallback(tmp_path):
    path = write_checkpoint_dir(tmp_path / "ck", kind="vqgan", model_config={}, weights={"model": _linear(0)})
    assert read_meta(path)["default_weights"] == "model"
    with pytest.raises(UserError, match="has no ema weights"):
        weights_file(path, "ema")
    with pytest.raises(UserError, match="cannot be resumed"):
        load_trainer_state(path)


def test_run_dir_resolution_keep_last_and_best(tmp_path):
    run = tmp_path / "run"
    for step in (10, 20, 30, 40):
        save_checkpoint(run, step, keep_last=2, kind="prior", model_config={}, weights={"model": _linear(step)})
        if step == 20:
            mark_best(run, run / "checkpoints" / "step-00000020")
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["best", "last", "step-00000020", "step-00000030", "step-00000040"]
    assert resolve_checkpoint(run).name == "step-00000020"  # best first
    assert resolve_checkpoint(run, prefer=("last",)).name == "step-00000040"
    assert resolve_checkpoint(run / "checkpoints" / "last").name == "step-00000040"


def test_clear_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no uvq checkpoint"):
        resolve_checkpoint(tmp_path / "empty")
    f = tmp_path / "foreign.th"
    f.write_bytes(b"x")
    with pytest.raises(UserError, match="uvq import"):
        resolve_checkpoint(f)
    path = write_checkpoint_dir(tmp_path / "ck", kind="prior", model_config={}, weights={"model": _linear(0)})
    (path / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(UserError, match="damaged"):
        load_state_dict(path)
    (path / "meta.json").write_text("{")
    with pytest.raises(UserError, match="corrupt"):
        read_meta(path)


def test_trainer_state_refuses_pickled_code(tmp_path):
    import pickle

    path = write_checkpoint_dir(tmp_path / "ck", kind="prior", model_config=TINY_PRIOR, weights={"model": _prior(0)},
                                step=1, trainer_state={"step": 1})

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(path / "trainer.pt", "wb") as fh:
        pickle.dump({"x": Evil()}, fh)
    with pytest.raises(UserError, match="does not match the sha256"):  # refused before it is opened
        load_trainer_state(path)
    meta = json.loads((path / "meta.json").read_text())
    meta["trainer_sha256"] = sha256_file(path / "trainer.pt")  # an attacker who also edits meta.json
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="cannot be loaded safely"):
        load_trainer_state(path)


def test_rng_state_round_trips_through_weights_only(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]
    json.dumps({"ok": True})
