"""Nearest neighbours by LPIPS (appendix C): cached-feature LPIPS equals lpips' own forward, the
batched search equals a brute force over every pair, and the fast mode's recall is measured."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from uvq.evaluation.features import open_set
from uvq.evaluation.neighbours import LPIPSFeatures, _load_all, find_neighbours
from uvq.images import save_png
from uvq.runtime import UserError

SIZE = 16


def stand_in_lpips(net: str = "vgg"):
    """The lpips package's LPIPS with its own linear weights and a random trunk (no download)."""
    import lpips

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lpips.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=True, verbose=False).eval()


def smooth_images(n: int, seed: int, size: int = SIZE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size // 4, size // 4, generator=g)
    return torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)  # [n,3,size,size]


@pytest.fixture(scope="module")
def model():
    return stand_in_lpips("vgg")


@pytest.fixture
def reference(tmp_path) -> Path:
    root = tmp_path / "ref"
    root.mkdir()
    for i, x in enumerate(smooth_images(24, seed=1)):
        save_png(x, root / f"{i:03d}.png")
    return root


def brute_force(model, samples: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """lpips' own forward on every (sample, reference) pair: [S, N]."""
    with torch.no_grad():
        return torch.stack([model(s[None].expand(len(refs), -1, -1, -1), refs, normalize=True).flatten()
                            for s in samples])


@pytest.mark.parametrize("net,size", [("vgg", 16), ("squeeze", 32)])
def test_lpips_from_cached_features_equals_forward(net, size, request):
    model = request.getfixturevalue("model") if net == "vgg" else stand_in_lpips(net)
    a, b = smooth_images(3, seed=2, size=size), smooth_images(5, seed=3, size=size)
    lp = LPIPSFeatures(model)
    ours = lp.distance(lp.embed(a), lp.embed(b))
    torch.testing.assert_close(ours, brute_force(model, a, b), rtol=1e-4, atol=1e-6)


def test_exact_neighbours_equal_brute_force(model, reference):
    (reference / "999.png").write_bytes(b"broken")  # unreadable: skipped and reported
    ref_set = open_set(reference)
    kept, refs, bad = _load_all(ref_set, SIZE)
    assert bad == ["999"] and len(kept) == 24
    samples = (refs[[3, 11, 20]] + 0.03 * torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))).clamp(0, 1)

    found = find_neighbours(samples, ref_set, model, k=4, batch_size=5)
    dist, order = brute_force(model, samples, refs).sort(dim=1)
    expected = torch.tensor(kept)[order[:, :4]]
    assert torch.equal(found["indices"], expected)
    torch.testing.assert_close(found["distances"], dist[:, :4], rtol=1e-4, atol=1e-6)
    assert found["indices"][:, 0].tolist() == [3, 11, 20]  # each sample's source is its nearest
    assert found["unreadable"] == ["999"]

    # Samples taken in groups (as when their features do not fit in memory) change nothing.
    grouped = find_neighbours(samples, ref_set, model, k=4, batch_size=7, memory_bytes=1)
    assert grouped["groups"] == 3 and torch.equal(grouped["indices"], found["indices"])


def test_fast_mode_trades_recall(model, reference):
    ref_set = open_set(reference)
    samples = smooth_images(4, seed=5)
    k = 3
    exact = find_neighbours(samples, ref_set, model, k=k)
    recalls = []
    for m in (k, 6, 24):
        fast = find_neighbours(samples, ref_set, model, k=k, mode="fast", prefilter=m, pixel_size=4)
        hits = sum(len(set(f) & set(e)) for f, e in zip(fast["indices"].tolist(), exact["indices"].tolist(), strict=True))
        recalls.append(hits / (k * len(samples)))
        assert fast["candidates"] <= min(len(samples) * m, 24)
    # Recall of the true k-NN can only grow with the number of re-ranked candidates, and is
    # complete once every reference image is a candidate.
    assert recalls == sorted(recalls) and recalls[-1] == 1.0
    assert torch.equal(fast["indices"], exact["indices"])


def test_bad_requests(model, reference):
    ref_set = open_set(reference)
    samples = smooth_images(2, seed=6)
    with pytest.raises(UserError, match="more neighbours than the reference's 24 images"):
        find_neighbours(samples, ref_set, model, k=25)
    with pytest.raises(UserError, match="unknown neighbours mode"):
        find_neighbours(samples, ref_set, model, k=2, mode="approximate")
    with pytest.raises(UserError, match="--prefilter 2 must be at least --k 3"):
        find_neighbours(samples, ref_set, model, k=3, mode="fast", prefilter=2)


def test_cli_neighbours(tmp_path, capsys, monkeypatch):
    """`uvq neighbours` with LPIPS built by uvq.vqgan.losses from a stand-in torchvision trunk file."""
    import torchvision

    from uvq.cli.app import main
    from uvq.vqgan.losses import lpips_trunk_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    trunk = lpips_trunk_path("squeeze")
    trunk.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.squeezenet1_1().state_dict(), trunk)
    size = 32  # squeezenet's smallest comfortable input
    samples, reference = tmp_path / "samples", tmp_path / "ref"
    for i, x in enumerate(smooth_images(3, seed=7, size=size)):
        save_png(x, samples / f"sample-{i:05d}.png")
    for i, x in enumerate(smooth_images(6, seed=8, size=size)):
        save_png(x, reference / f"{i}.png")
    (samples / "samples.json").write_text(json.dumps({"temperature": 0.9}))
    out = tmp_path / "nn"

    with pytest.raises(SystemExit) as exc:
        main(["neighbours", "--samples", str(samples), "--reference", str(reference), "--k", "2",
              "--out", str(out), "--lpips-net", "squeeze", "--json"])
    stdout, err = capsys.readouterr()
    assert exc.value.code == 0, err
    report = json.loads(stdout)
    assert report["samples"]["kind"] == "samples" and report["samples"]["sample_meta"]["temperature"] == 0.9
    with open(out / "neighbours.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and rows[0]["sample"] == "sample-00000" and rows[0]["rank"] == "1"
    assert [r["reference"] for r in rows[:2]] == report["neighbours"][0]["reference"]
    d = [float(r["distance"]) for r in rows[:2]]
    assert d == sorted(d)
    # the one grid function (uvq.images.save_grid) enlarges 32 px cells 2x to reach 64 px
    assert Image.open(out / "neighbours.png").size == (3 * (2 * size + 2) + 2, 3 * (2 * size + 2) + 2)
    assert json.loads((out / "neighbours.json").read_text())["k"] == 2

    # the output directory is now ours and not empty: another run needs --overwrite
    with pytest.raises(SystemExit) as exc:
        main(["neighbours", "--samples", str(samples), "--reference", str(reference), "--k", "2",
              "--out", str(out), "--lpips-net", "squeeze"])
    assert exc.value.code == 2 and "--overwrite" in capsys.readouterr().err


def test_cli_neighbours_without_lpips_weights(tmp_path, reference, capsys, monkeypatch):
    from uvq.cli.app import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(SystemExit) as exc:
        main(["neighbours", "--samples", str(reference), "--reference", str(reference), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "vgg16-397923af.pth" in err
    assert not (tmp_path / "o").exists()
