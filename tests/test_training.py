"""uvq.training: the metrics meter against brute force, on one process and across 2 real gloo
processes (all-reduce), and its state through a save and load."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from uvq.runtime import DistInfo, init_distributed, shutdown_distributed
from uvq.training import Meter

KEYS = ("loss", "rare")


def _values(rank: int, steps: int = 7) -> list[float]:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.rand(steps, generator=g, dtype=torch.float32).mul(3).tolist()


def _fill(meter: Meter, rank: int) -> None:
    for i, v in enumerate(_values(rank)):
        meter.add("loss", torch.tensor(v, dtype=torch.float32))
        if i % 3 == 0:
            meter.add("rare", torch.tensor(-v, dtype=torch.float32))
        meter.count_codes(torch.tensor([[i % 5, 2], [rank, 4]]))


def test_means_equal_python_float_sums_bit_for_bit():
    meter = Meter(KEYS, torch.device("cpu"), codebook_size=8)
    _fill(meter, 0)
    vals = _values(0)
    total = 0.0
    for v in vals:  # the float sums the loops kept before the meter
        total += float(torch.tensor(v, dtype=torch.float32))
    out = meter.reduce(DistInfo())
    assert out["loss"] == total / len(vals)
    assert out["rare"] == sum(-v for v in vals[::3]) / len(vals[::3])
    counts = torch.bincount(torch.tensor([[i % 5, 2, 0, 4] for i in range(7)]).flatten(), minlength=8).double()
    p = counts / counts.sum()
    assert out["usage"] == float((counts > 0).double().mean())
    assert out["perplexity"] == float(torch.exp(-torch.special.xlogy(p, p).sum()))
    # A name nothing added is not reported; the state survives a save and load exactly.
    again = Meter(KEYS, torch.device("cpu"), codebook_size=8)
    again.load_state_dict(meter.state_dict())
    assert again.reduce(DistInfo()) == out
    meter.reset()
    assert meter.reduce(DistInfo()) == {} and meter.finite(DistInfo())
    meter.add("loss", torch.tensor(float("inf")))
    assert not meter.finite(DistInfo()) and math.isinf(meter.reduce(DistInfo())["loss"])


def _worker(rank: int, world: int, port: int, base: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist = init_distributed(torch.device("cpu"))
    try:
        meter = Meter(KEYS, torch.device("cpu"), codebook_size=8)
        _fill(meter, rank)
        out = meter.reduce(dist)
        finite = meter.finite(dist)
        if rank == 1:
            meter.add("rare", torch.tensor(float("nan")))
        nan_seen = not meter.finite(dist)  # every rank learns of rank 1's NaN
    finally:
        shutdown_distributed()
    (Path(base) / f"meter{rank}.json").write_text(json.dumps({"out": out, "finite": finite, "nan_seen": nan_seen}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_meter_all_reduces_over_two_gloo_processes(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"meter{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1 and r0["finite"] and r0["nan_seen"]
    # Brute force: the mean over both ranks' values, and the histogram of both ranks' codes.
    loss = [float(torch.tensor(v, dtype=torch.float32)) for r in (0, 1) for v in _values(r)]
    rare = [-float(torch.tensor(v, dtype=torch.float32)) for r in (0, 1) for v in _values(r)[::3]]
    assert math.isclose(r0["out"]["loss"], sum(loss) / len(loss), rel_tol=1e-12)
    assert math.isclose(r0["out"]["rare"], sum(rare) / len(rare), rel_tol=1e-12)
    codes = torch.tensor([[i % 5, 2, r, 4] for r in (0, 1) for i in range(7)]).flatten()
    counts = torch.bincount(codes, minlength=8).double()
    p = counts / counts.sum()
    assert r0["out"]["usage"] == 5 / 8
    assert math.isclose(r0["out"]["perplexity"], float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())), rel_tol=1e-12)
