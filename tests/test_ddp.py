"""fit-vqgan under torch.distributed: 2 CPU processes on gloo, launched for real.

Each process runs in its own working directory with the same relative --out, so a file written by
rank 1 would land in a different place: the test checks that only rank 0's directory exists,
that DDP kept the two replicas identical (weights and EMA), and that a resume continues both ranks.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from uvq.config import load_config
from uvq.runtime import shutdown_distributed

TINY = [
    "model.vqgan.img_size=16", "model.vqgan.ch_mult=[1,2]", "model.vqgan.attn_resolutions=[8]",
    "model.vqgan.emb_dim=8", "model.vqgan.codebook_size=16", "model.discriminator.ndf=8",
    "model.discriminator.n_layers=1", "model.prior.codebook_size=16", "model.prior.latent_shape=[8,8]",
    "data.demo_images=64", "train.batch_size=2", "train.disc_start_step=1", "train.ema_every=1",
    "train.steps=4", "train.lr=0.001", "run.log_every=1", "run.image_every=2", "run.ckpt_every=2",
]


def _worker(rank: int, world: int, port: int, base: str) -> None:
    from uvq.vqgan.train import fit_vqgan

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    cwd = Path(base) / f"rank{rank}"
    cwd.mkdir()
    os.chdir(cwd)
    cfg = load_config("demo", TINY)
    events: list[dict] = []
    try:
        first = fit_vqgan(cfg, "run", device="cpu", max_steps=2, progress=events.append)
        # Resume: rank 0 finds its checkpoint and tells rank 1 where it is (rank 1's ./run stays empty).
        second = fit_vqgan(cfg, "run", device="cpu", resume=True, progress=events.append)
    finally:
        shutdown_distributed()
    result = {"first": first, "second": second, "events": len(events)}
    (Path(base) / f"result{rank}.json").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_training_only_rank0_writes(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "result0.json").read_text())
    r1 = json.loads((tmp_path / "result1.json").read_text())

    # Both ranks trained the same steps; rank 1 sent no progress events and wrote nothing.
    assert r0["first"]["steps"] == r1["first"]["steps"] == 2
    assert r0["second"]["steps"] == r1["second"]["steps"] == 4 and r0["second"]["steps_this_run"] == 2
    assert r0["second"]["world_size"] == 2 and r0["events"] > 0 and r1["events"] == 0
    assert not (tmp_path / "rank1" / "run").exists()
    run = tmp_path / "rank0" / "run"
    assert json.loads((run / "env.json").read_text())["world_size"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # logged once, by rank 0
    assert "d_loss" in records[-1] and records[-1]["lambda"] > 0  # adaptive weight and D step under DDP
    assert records[-1]["images_per_s"] > 0
    assert len((run / "command.txt").read_text().splitlines()) == 2

    # Every checkpoint holds both ranks' state; DDP kept the replicas' weights identical.
    for step in (2, 4):
        state = torch.load(run / "checkpoints" / f"step-{step:08d}" / "trainer.pt", weights_only=True)
        assert len(state["ranks"]) == 2
        a, b = state["ranks"]
        assert a["extra"]["replica"] == b["extra"]["replica"]
        assert a["data"]["position"] == b["data"]["position"] == step * 2  # each rank its own slice
        assert not torch.equal(a["generators"]["augment"], b["generators"]["augment"])  # independent DiffAugment draws


def _hang_worker(rank: int, world: int, port: int, base: str) -> None:
    import time

    from uvq.runtime import init_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    init_distributed(torch.device("cpu"), timeout_s=3)
    if rank == 1:  # a hung rank: never reaches the collective
        time.sleep(40)
        return
    t0 = time.monotonic()
    try:
        torch.distributed.all_reduce(torch.ones(1))
        outcome = "returned"
    except Exception as exc:  # gloo reports the timeout as a RuntimeError subclass
        outcome = type(exc).__name__
    (Path(base) / "hang.json").write_text(json.dumps({"outcome": outcome, "waited": time.monotonic() - t0}))


def test_a_hung_rank_stops_the_collective_after_the_timeout(tmp_path):
    """run.dist_timeout_s bounds every collective: rank 0 fails after ~3 s, not gloo's 30 minutes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_hang_worker, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    procs[0].join(120)
    for p in procs:
        p.kill()
        p.join()
    result = json.loads((tmp_path / "hang.json").read_text())
    assert result["outcome"] != "returned"
    assert 2 <= result["waited"] < 30


def test_dist_timeout_is_a_checked_recipe_option():
    assert load_config("demo").run.dist_timeout_s == 300
    import pytest

    from uvq.errors import UserError

    with pytest.raises(UserError, match="run.dist_timeout_s"):
        load_config("demo", ["run.dist_timeout_s=0"])


# ---------------------------------------------------------------------------------------------
# 2 ranks at batch b against 1 rank at batch 2b (docs/training.md, docs/prior-training.md)
# ---------------------------------------------------------------------------------------------

# Before train.disc_start_step, and without random flips, the VQGAN's step is deterministic given
# its images: no discriminator, no DiffAugment, no adaptive weight. Rank r of W reads positions
# r, r+W, ... of the demo set's shuffled order, so 2 ranks at batch 2 read the 4 images 1 rank at
# batch 4 reads, and DDP's mean of the two ranks' gradients is the gradient of the mean over the 4.
EQUAL = [*[o for o in TINY if not o.startswith(("train.disc_start_step", "train.steps", "train.batch_size"))],
         "train.disc_start_step=100", "train.steps=3", "run.ckpt_every=3", "run.image_every=3", "data.hflip=false"]


def _vqgan_worker(rank: int, world: int, port: int, base: str) -> None:
    from uvq.vqgan.train import fit_vqgan

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    os.chdir(base)
    try:
        fit_vqgan(load_config("demo", [*EQUAL, "train.batch_size=2"]), f"two{rank}", device="cpu")
    finally:
        shutdown_distributed()


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / "last" / "model.safetensors"))


def test_vqgan_two_ranks_at_batch_b_take_the_steps_of_one_rank_at_2b(tmp_path):
    from uvq.vqgan.train import fit_vqgan

    torch.set_num_threads(1)
    fit_vqgan(load_config("demo", [*EQUAL, "train.batch_size=4"]), tmp_path / "one", device="cpu")
    mp.spawn(_vqgan_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two0")
    m1 = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(line) for line in (tmp_path / "two0" / "metrics.jsonl").read_text().splitlines()]
    assert len({r["loss"] for r in m1}) == 3  # every step moved the weights
    for a, b in zip(m1, m2, strict=True):  # the same 4 images and the same weights at every step
        for key in ("loss", "l1", "rec", "codebook"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    # The weights agree to float rounding, except where Adam divides rounding noise by itself: a
    # bias followed by a normalisation has zero gradient up to rounding, and g / sqrt(v) turns that
    # noise into steps of about lr. So every tensor is within 3 steps of lr, and nearly all agree.
    lr = load_config("demo", EQUAL).train.lr
    assert sorted(one) == sorted(two)
    close = 0
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=3 * lr, msg=k)
        close += bool(torch.allclose(two[k], one[k], rtol=1e-4, atol=1e-6))
    assert close >= 0.85 * len(one)


# fit-prior: each rank draws its own times and masks (docs/prior-training.md), so 2 ranks at b are
# not the steps of 1 rank at 2b; the test checks that 2 processes train, log once, and leave a
# checkpoint that loads and samples.
PRIOR = ["model.prior.n_embd=32", "model.prior.n_head=2", "model.prior.n_layer=1", "model.prior.codebook_size=16",
         "model.prior.latent_shape=[4,4]", "model.vqgan.codebook_size=16", "model.vqgan.img_size=64",
         "prior_train.batch_size=4", "prior_train.lr=0.003", "prior_train.warmup_steps=2", "prior_train.steps=4",
         "prior_train.val_every=4", "prior_train.val_batches=1", "prior_train.val_draws=2", "run.log_every=2",
         "run.image_every=100", "run.ckpt_every=2"]


def _prior_worker(rank: int, world: int, port: int, base: str) -> None:
    from uvq.prior.train import fit_prior

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    os.chdir(base)
    try:
        summary = fit_prior(load_config(None, PRIOR), "latents", f"run{rank}", device="cpu")
    finally:
        shutdown_distributed()
    (Path(base) / f"prior{rank}.json").write_text(json.dumps(summary, default=str))


def test_fit_prior_on_two_gloo_processes_trains_and_its_checkpoint_samples(tmp_path):
    import numpy as np

    from uvq.checkpoint import load_model
    from uvq.prior.latents import write_latents
    from uvq.sampling.chain import sample_tokens

    rng = np.random.default_rng(0)
    grids = {split: [(f"{split}{i:04d}", rng.integers(0, 16, (4, 4))) for i in range(n)]
             for split, n in (("train", 64), ("val", 16))}
    write_latents(tmp_path / "latents", grids, codebook_size=16, shard_size=16)
    mp.spawn(_prior_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)

    s0, s1 = (json.loads((tmp_path / f"prior{r}.json").read_text()) for r in (0, 1))
    assert s0["steps"] == s1["steps"] == 4
    assert not (tmp_path / "run1").exists()  # rank 1 wrote nothing
    run = tmp_path / "run0"
    assert json.loads((run / "env.json").read_text())["world_size"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4]  # logged once, by rank 0
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    net, meta = load_model(run, "prior", device="cpu")
    assert meta["kind"] == "prior"
    tokens = sample_tokens(net, 3, steps=16, seed=1, device="cpu", precision="fp32")
    assert tokens.shape == (3, 16) and int(tokens.min()) >= 0 and int(tokens.max()) < 16
