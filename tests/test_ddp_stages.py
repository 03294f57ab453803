"""Every stage data-parallel under torchrun: real `torchrun --nproc-per-node 2` on gloo (CPU).

`sample`, `upscale-canvas` and batch `inpaint` under 2 processes write exactly the files one
process writes (byte for byte; the JSON records equal but for the time, the timings and the
world size); feature extraction for `eval` and `neighbours` gives the one-process metric and
writes the cache once; `fit-prior` trains under 2 processes and its checkpoint samples; and the
first steps of 2 ranks at batch b against 1 rank at batch 2b are what docs/training.md and
docs/prior-training.md say they are.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_uvq
from test_canvas import make_pair
from test_evaluate import (
    inception_weights,  # noqa: F401  (a session fixture: random Inception weights)
    random_images,
    write_png,
)
from test_inpaint import save_image

from uvq.runtime import DistInfo, batch_share, share_rounds

# Fields of samples.json / inpaint.json that say when and how fast, not what was written.
VOLATILE = ("created", "timing", "world_size")


def torchrun(*args: str, cwd: Path, nproc: int = 2, timeout: float = 120,
             env: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m uvq ARGS` (torch.distributed.run, a free port)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           "-m", "uvq", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root (relative name -> bytes), the ownership record and lock left out."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".uvq")}


def same_outputs(one: Path, two: Path, record: str) -> None:
    a, b = tree(one), tree(two)
    assert sorted(a) == sorted(b)
    for name in a:
        if name == record:
            ra, rb = json.loads(a[name]), json.loads(b[name].decode().replace(str(two), str(one)))
            assert rb["world_size"] == 2 and ra["world_size"] == 1
            assert {k: v for k, v in ra.items() if k not in VOLATILE} == {k: v for k, v in rb.items() if k not in VOLATILE}
        else:
            assert a[name] == b[name], name


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pair"))


def test_batch_share_covers_every_item_once_in_whole_batches():
    for n in range(1, 30):
        for bs in (1, 2, 3, 7):
            for world in (1, 2, 3, 5):
                shares = [batch_share(n, bs, DistInfo(r, world)) for r in range(world)]
                items = [i for first, count in shares for i in range(first, first + count)]
                assert items == list(range(n))  # disjoint, in order, nothing left out
                assert all(first % bs == 0 for first, count in shares if count)  # the one-process batches
                assert max(-(-count // bs) for _, count in shares) == share_rounds(n, bs, world)


def test_sample_under_torchrun_writes_the_files_of_one_process(tmp_path, pair):
    vq, prior = pair
    args = ["sample", "--prior", str(prior), "--vqgan", str(vq), "-n", "5", "--batch-size", "2", "--steps", "16",
            "--seed", "3", "--codes", "--device", "cpu"]
    one = run_uvq(*args, "--out", str(tmp_path / "one"), "--json")
    assert one.returncode == 0, one.stderr
    two = torchrun(*args, "--out", str(tmp_path / "two"), "--json", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[:3000] + two.stderr[-1000:]
    same_outputs(tmp_path / "one", tmp_path / "two", "samples.json")
    assert len(list((tmp_path / "two").glob("sample-*.png"))) == 5
    # One summary on stdout (rank 0's), and progress for the whole job: 5 samples in 2 rounds (rank 1 pads).
    summary = json.loads(two.stdout.strip())
    assert summary["n"] == 5 and summary["world_size"] == 2
    events = [json.loads(line) for line in two.stderr.splitlines() if line.startswith("{")]
    advances = [e["n"] for e in events if e.get("task") == "sample" and e["event"] == "advance"]
    assert sum(advances) == 5 and len(advances) == share_rounds(5, 2, 2)
    assert [e["total"] for e in events if e.get("task") == "sample" and e["event"] == "start"] == [5]


def test_upscale_canvas_under_torchrun_writes_the_files_of_one_process(tmp_path, pair):
    vq, prior = pair
    args = ["upscale-canvas", "--prior", str(prior), "--vqgan", str(vq), "--latent-size", "8x12", "-n", "3",
            "--batch-size", "1", "--steps", "12", "--stride", "4", "--seed", "5", "--device", "cpu"]
    one = run_uvq(*args, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = torchrun(*args, "--out", str(tmp_path / "two"), cwd=tmp_path)
    assert two.returncode == 0, two.stderr[:3000] + two.stderr[-1000:]
    same_outputs(tmp_path / "one", tmp_path / "two", "samples.json")
    assert two.stdout.count("wrote 3 canvases") == 1  # rank 0 alone reports


def test_batch_inpaint_under_torchrun_writes_the_files_of_one_process(tmp_path, pair):
    vq, prior = pair
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, name in enumerate(("a", "b", "c")):
        save_image(inputs / f"{name}.png", 16, 16, seed=i)
    args = ["inpaint", str(inputs), "--prior", str(prior), "--vqgan", str(vq), "--box", "4,4,12,12", "-n", "2",
            "--steps", "16", "--seed", "1", "--device", "cpu"]
    one = run_uvq(*args, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = torchrun(*args, "--out", str(tmp_path / "two"), cwd=tmp_path)
    assert two.returncode == 0, two.stderr[:3000] + two.stderr[-1000:]
    same_outputs(tmp_path / "one", tmp_path / "two", "inpaint.json")


def test_a_refused_output_directory_stops_every_rank(tmp_path, pair):
    """Rank 0's refusal reaches the other rank: each exits with the one line, nothing written, no hang."""
    vq, prior = pair
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    result = torchrun("sample", "--prior", str(prior), "--vqgan", str(vq), "-n", "2", "--steps", "4",
                      "--device", "cpu", "--out", str(taken), cwd=tmp_path, timeout=90)
    assert result.returncode != 0  # torchrun reports a failed child with its own status
    assert result.stderr.count("error: ") >= 2  # each rank says why, in one line
    assert sorted(p.name for p in taken.iterdir()) == ["notes.txt"]


def test_eval_fid_under_torchrun_equals_one_process_and_writes_the_cache_once(tmp_path, inception_weights):  # noqa: F811
    """Ranks extract disjoint parts; the FID equals one process's; rank 0 writes each set's cache file."""
    for i, a in enumerate(random_images(3, 24, 24, 21)):
        write_png(tmp_path / "s" / f"{i}.png", a)
    for i, a in enumerate(random_images(2, 24, 24, 22)):
        write_png(tmp_path / "r" / f"{i}.png", a)
    common = ["eval", "fid", "--samples", str(tmp_path / "s"), "--reference", str(tmp_path / "r"),
              "--inception-weights", str(inception_weights), "--batch-size", "1", "--device", "cpu", "--json"]
    one = run_uvq(*common, "--cache-dir", str(tmp_path / "c1"), "--out", str(tmp_path / "o1"))
    assert one.returncode == 0, one.stderr
    two = torchrun(*common, "--cache-dir", str(tmp_path / "c2"), "--out", str(tmp_path / "o2"), cwd=tmp_path)
    assert two.returncode == 0, two.stderr[:3000] + two.stderr[-1000:]
    r1 = json.loads((tmp_path / "o1" / "eval-fid.json").read_text())
    r2 = json.loads((tmp_path / "o2" / "eval-fid.json").read_text())
    assert r2["results"] == r1["results"]  # the same features, bit for bit, so the same FID
    assert r2["samples"]["n_images"] == 3 and r2["reference"]["n_images"] == 2
    assert json.loads(two.stdout.strip())["results"] == r1["results"]  # one summary, rank 0's
    c1, c2 = sorted((tmp_path / "c1").iterdir()), sorted((tmp_path / "c2").iterdir())
    assert [p.name for p in c2] == [p.name for p in c1] and len(c2) == 2  # one file per set, no temporaries
    assert [p.read_bytes() for p in c2] == [p.read_bytes() for p in c1]


def test_neighbours_under_torchrun_find_the_neighbours_of_one_process(tmp_path):
    """Ranks search disjoint runs of the reference; the merged k best are one process's, ties included."""
    import torch
    import torchvision
    from test_neighbours import smooth_images

    from uvq.images import save_png
    from uvq.vqgan.losses import lpips_trunk_path

    env = {"TORCH_HOME": str(tmp_path / "torch")}
    os.environ.update(env)
    try:
        trunk = lpips_trunk_path("squeeze")
    finally:
        del os.environ["TORCH_HOME"]
    trunk.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.squeezenet1_1().state_dict(), trunk)
    for i, x in enumerate(smooth_images(2, seed=7, size=32)):
        save_png(x, tmp_path / "s" / f"{i}.png")
    for i, x in enumerate(smooth_images(7, seed=8, size=32)):
        save_png(x, tmp_path / "r" / f"{i}.png")
    save_png(smooth_images(1, seed=7, size=32)[0], tmp_path / "r" / "7.png")  # sample 0 itself, in rank 1's share
    args = ["neighbours", "--samples", str(tmp_path / "s"), "--reference", str(tmp_path / "r"), "--k", "3",
            "--batch-size", "2", "--lpips-net", "squeeze", "--device", "cpu"]
    one = run_uvq(*args, "--out", str(tmp_path / "one"), env=env)
    assert one.returncode == 0, one.stderr
    two = torchrun(*args, "--out", str(tmp_path / "two"), cwd=tmp_path, env=env)
    assert two.returncode == 0, two.stderr[:3000] + two.stderr[-1000:]
    for name in ("neighbours.csv", "neighbours.png"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    r1, r2 = (json.loads((tmp_path / d / "neighbours.json").read_text()) for d in ("one", "two"))
    assert r2["neighbours"] == r1["neighbours"]
    assert r1["neighbours"][0]["distance"][0] < min(r1["neighbours"][1]["distance"])  # found its own image
