"""Evaluation (docs/method.md section 6): PRDC against the `prdc` package, FID against the closed form,
the torch-fidelity extractor end to end offline, content-keyed caches, bad input, reports."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from uvq.config import EvalConfig, VQGANConfig
from uvq.evaluation.features import (
    default_inception_weights,
    feature_statistics,
    open_set,
    resolve_inception_weights,
)
from uvq.evaluation.metrics import (
    compute_prdc,
    evaluate_metrics,
    frechet_distance,
    kernel_inception_distance,
    write_report,
)
from uvq.evaluation.reconstruction import evaluate_reconstruction
from uvq.runtime import UserError

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def random_images(n: int, h: int, w: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def prdc_reference(real, fake, k):
    import prdc

    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the set sizes
        out = prdc.compute_prdc(real_features=real, fake_features=fake, nearest_k=k)
    return {key: float(v) for key, v in out.items()}


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """torch-fidelity's own Inception module with random weights, saved as its weights file.

    Building the module needs weights, so the build reads none (its loader is bypassed only
    here, to make the file); conv weights are then He-initialised so features are not ~0.
    """
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        module = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    gen = torch.Generator().manual_seed(0)
    state = module.state_dict()
    for key, value in state.items():
        if key.endswith("conv.weight") or key == "fc.weight":
            value.copy_(torch.randn(value.shape, generator=gen) * (2.0 / value[0].numel()) ** 0.5)
    path = tmp_path_factory.mktemp("inception") / "inception-random.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="session")
def extractor(inception_weights):
    """Built as `--inception-weights` builds it: the registry entry reading EvalConfig.inception_weights."""
    from uvq.registry import registry

    return registry.get("feature_extractors", "inception-v3-compat.v1")(EvalConfig(inception_weights=str(inception_weights)))


# ---------------------------------------------------------------------------------------------
# PRDC: equal to the prdc package, chunked == unchunked, ties, bad k
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,m,dim,k", [(120, 90, 16, 1), (150, 130, 64, 3), (90, 110, 2048, 5), (60, 60, 8, 10)])
def test_prdc_equals_prdc_package(n, m, dim, k):
    rng = np.random.default_rng(n + m + dim + k)
    real = rng.standard_normal((n, dim)).astype(np.float32)
    fake = (rng.standard_normal((m, dim)) * 1.05 + 0.05).astype(np.float32)
    ours = compute_prdc(real, fake, k)
    ref = prdc_reference(real, fake, k)
    for key in ("precision", "recall", "density", "coverage"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key
    # the metrics must not be trivial for the comparison to mean something
    assert 0 < ours["precision"] < 1 or 0 < ours["coverage"] < 1


@pytest.mark.parametrize("chunk", [1, 3, 17, None])
def test_prdc_chunked_equals_unchunked(chunk):
    rng = np.random.default_rng(1)
    real = rng.standard_normal((70, 32)).astype(np.float32)
    fake = (rng.standard_normal((50, 32)) + 0.2).astype(np.float32)
    whole = compute_prdc(real, fake, 3, chunk_size=10_000)
    assert compute_prdc(real, fake, 3, chunk_size=chunk) == whole
    # also when memory_bytes forces tiny blocks
    assert compute_prdc(real, fake, 3, memory_bytes=18 * 70 * 4) == whole


def test_prdc_ties_and_duplicates():
    # Integer features: sklearn's float64 distances are exact, so ties are real ties in both.
    rng = np.random.default_rng(2)
    real = rng.integers(0, 4, (60, 6)).astype(np.float32)
    real[10:15] = real[3]  # duplicated points: distance exactly 0
    fake = rng.integers(0, 4, (50, 6)).astype(np.float32)
    fake[:5] = real[:5]  # samples equal to reference images
    for k in (1, 3, 5):
        ours = compute_prdc(real, fake, k)
        assert ours == pytest.approx(prdc_reference(real, fake, k), abs=1e-12)
        assert compute_prdc(real, fake, k, chunk_size=4) == ours
    # identical sets: every point has zero radius among its duplicates; nothing is strictly inside
    same = np.ones((12, 4), np.float32)
    assert compute_prdc(same, same, 3) == pytest.approx(prdc_reference(same, same, 3), abs=1e-12)


def test_prdc_k_larger_than_set():
    feats = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    with pytest.raises(UserError, match=r"k=5 needs more than k images"):
        compute_prdc(feats, feats, 5)


# ---------------------------------------------------------------------------------------------
# FID and KID: closed forms and independent computations
# ---------------------------------------------------------------------------------------------


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(3)
    d = 6
    # Diagonal covariances commute: FID = |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2.
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    # General covariances: tr(S1 + S2 - 2 sqrtm(S1 S2)) with scipy's matrix square root.
    a, b = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    c1, c2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real)
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu1, c1, mu1, c1) == pytest.approx(0.0, abs=1e-8)


def test_feature_statistics_and_kid():
    rng = np.random.default_rng(4)
    f1 = rng.standard_normal((40, 8)).astype(np.float32)
    f2 = (rng.standard_normal((30, 8)) + 0.3).astype(np.float32)
    mu, sigma = feature_statistics(f1)
    np.testing.assert_allclose(mu, f1.astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(f1.astype(np.float64), rowvar=False), rtol=1e-5)
    # A subset of the whole smaller set: every subset is a permutation, so KID is the unbiased
    # MMD^2 of the cubic kernel k(x,y) = (x.y/d + 1)^3 between f1's subset and all of f2.
    # float64 features keep torch-fidelity's kernel sums in float64, so the match is exact
    out = kernel_inception_distance(f1[:30].astype(np.float64), f2.astype(np.float64), subsets=3,
                                    subset_size=1000, seed=0)
    assert out["kid_subset_size"] == 30

    def kern(x, y):
        return (x.astype(np.float64) @ y.T.astype(np.float64) / 8 + 1) ** 3

    kxx, kyy, kxy = kern(f1[:30], f1[:30]), kern(f2, f2), kern(f1[:30], f2)
    n = 30
    mmd = ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
           - 2 * kxy.mean())
    assert out["kid"] == pytest.approx(mmd, rel=1e-9)
    assert out["kid_std"] == pytest.approx(0.0, abs=1e-6 * abs(mmd) + 1e-9)


# ---------------------------------------------------------------------------------------------
# Sets: sources, order, content hashes, bad input
# ---------------------------------------------------------------------------------------------


def test_sources_folder_samples_and_shards(tmp_path):
    imgs = random_images(3, 8, 8, seed=5)
    for i, a in enumerate(imgs):
        write_png(tmp_path / "folder" / f"{i}.png", a)
    folder = open_set(tmp_path / "folder")
    assert folder.kind == "folder" and folder.keys == ["0", "1", "2"]

    sample_dir = tmp_path / "samples"
    for i, a in enumerate(imgs):
        write_png(sample_dir / f"sample-{i:05d}.png", a)
    (sample_dir / "samples.json").write_text(json.dumps({"checkpoint": "runs/x", "temperature": 0.9}))
    samples = open_set(sample_dir)
    assert samples.kind == "samples" and samples.meta["temperature"] == 0.9 and len(samples.keys) == 3

    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, a in enumerate(imgs):
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="PNG")
            info = tarfile.TarInfo(f"{i:04d}.png")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
            meta = tarfile.TarInfo(f"{i:04d}.json")
            meta.size = 2
            tar.addfile(meta, io.BytesIO(b"{}"))
    shards = open_set(str(tmp_path / "shard-{000..000}.tar"))
    assert shards.kind == "webdataset" and len(shards.keys) == 3

    # the embedded demo set (what the demo recipe's pipeline evaluates against), at a given size
    demo = open_set("demo:4@16")
    assert demo.kind == "demo" and len(demo.keys) == 4 and demo.content_sha256 == open_set("demo:4@16").content_sha256
    from uvq.data.demo import demo_array
    from uvq.data.sources import decode_image, encoded_images

    first = next(encoded_images(demo.reader))[3]
    np.testing.assert_array_equal(decode_image(first, None).permute(1, 2, 0).numpy(), demo_array(0, 16))

    # the hash is of content: same bytes under the same keys hash the same, any change differs
    again = open_set(tmp_path / "folder")
    assert again.content_sha256 == folder.content_sha256
    write_png(tmp_path / "folder" / "1.png", imgs[0])
    assert open_set(tmp_path / "folder").content_sha256 != folder.content_sha256


def test_bad_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        open_set(tmp_path / "empty", role="reference")
    with pytest.raises(UserError, match="does not exist"):
        open_set(tmp_path / "missing")
    with pytest.raises(UserError, match="cannot be read"):
        open_set(f"pipe:cat {tmp_path / 'missing.tar'}")


def test_missing_inception_weights_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UserError) as err:
        resolve_inception_weights(None)
    msg = str(err.value)
    assert "\n" not in msg and str(default_inception_weights()) in msg
    assert "weights-inception-2015-12-05-6726825d.pth" in msg and msg.count("https://") == 1
    with pytest.raises(UserError, match="does not exist"):
        resolve_inception_weights(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"not": torch.zeros(1)}, bad)
    from uvq.evaluation.features import InceptionFeatures

    with pytest.raises(UserError, match="not an inception-v3-compat state dict"):
        InceptionFeatures(bad)


# ---------------------------------------------------------------------------------------------
# The torch-fidelity path, end to end and offline
# ---------------------------------------------------------------------------------------------


def test_fid_end_to_end_offline_with_cache(tmp_path, inception_weights, extractor):
    from uvq.files import sha256_file

    samples = random_images(2, 32, 32, seed=6)
    reference = random_images(1, 32, 32, seed=7) + random_images(1, 40, 48, seed=8)  # mixed sizes
    for i, a in enumerate(samples):
        write_png(tmp_path / "s" / f"{i}.png", a)
    (tmp_path / "s" / "2.png").write_bytes(b"not a png")  # unreadable: counted, skipped
    for i, a in enumerate(reference):
        write_png(tmp_path / "r" / f"{i}.png", a)
    cfg = EvalConfig(inception_weights=str(inception_weights), batch_size=2)
    cache = tmp_path / "cache"

    report = evaluate_metrics(["fid"], tmp_path / "s", tmp_path / "r", cfg_eval=cfg, cache_dir=cache,
                              extractor=extractor)

    # Independent: torch-fidelity's module on each image alone; with S = A A^T (A the centred
    # features / sqrt(n-1), [D, n]), tr sqrt(S1 S2) is the nuclear norm of A1^T A2.
    def feats(arrs):
        with torch.no_grad():
            return np.concatenate([extractor.model(torch.from_numpy(a).permute(2, 0, 1)[None])[0].numpy() for a in arrs])

    fs, fr = feats(samples).astype(np.float64), feats(reference).astype(np.float64)
    a1 = (fs - fs.mean(0)).T / np.sqrt(len(fs) - 1)
    a2 = (fr - fr.mean(0)).T / np.sqrt(len(fr) - 1)
    expected = (np.sum((fs.mean(0) - fr.mean(0)) ** 2) + np.sum(a1 * a1) + np.sum(a2 * a2)
                - 2 * np.linalg.norm(a1.T @ a2, ord="nuc"))
    assert report["results"]["fid"] == pytest.approx(expected, rel=1e-3, abs=1e-4)

    assert report["samples"]["n_images"] == 2 and report["samples"]["unreadable"]["count"] == 1
    assert report["reference"]["sizes"] == {"32x32": 1, "48x40": 1}
    assert report["reference"]["resized_to"] == "299x299"
    assert any("resized" in w for w in report["warnings"]) and any("unreadable" in w for w in report["warnings"])
    assert report["extractor"]["weights_sha256"] == sha256_file(inception_weights)
    assert report["samples"]["content_sha256"] and report["samples"]["cache_hit"] is False

    # Second run: both sets from the cache, the same features.
    first = evaluate_metrics(["kid"], tmp_path / "s", tmp_path / "r", cfg_eval=cfg, cache_dir=cache, extractor=extractor)
    assert first["samples"]["cache_hit"] and first["reference"]["cache_hit"]

    # Changing one reference image invalidates the reference's cache only.
    write_png(tmp_path / "r" / "0.png", samples[0])
    changed = evaluate_metrics(["kid"], tmp_path / "s", tmp_path / "r", cfg_eval=cfg, cache_dir=cache, extractor=extractor)
    assert changed["samples"]["cache_hit"] and not changed["reference"]["cache_hit"]
    assert changed["results"]["kid"] != first["results"]["kid"]


def test_reference_as_statistics_or_features_file(tmp_path):
    rng = np.random.default_rng(9)
    fs = rng.standard_normal((40, 64)).astype(np.float32)
    fr = (rng.standard_normal((50, 64)) + 0.1).astype(np.float32)
    np.save(tmp_path / "s.npy", fs)
    np.save(tmp_path / "r.npy", fr)
    mu, sigma = feature_statistics(fr)
    np.savez(tmp_path / "r.npz", mu=mu, sigma=sigma)
    cfg = EvalConfig(k=3)
    by_feats = evaluate_metrics(["fid", "prdc", "kid"], tmp_path / "s.npy", tmp_path / "r.npy", cfg_eval=cfg)
    by_stats = evaluate_metrics(["fid"], tmp_path / "s.npy", tmp_path / "r.npz", cfg_eval=cfg)
    assert by_stats["results"]["fid"] == pytest.approx(by_feats["results"]["fid"], rel=1e-9)
    assert by_feats["results"]["precision"] == pytest.approx(prdc_reference(fr, fs, 3)["precision"])
    assert by_feats["extractor"] is None  # no images, no extractor needed
    with pytest.raises(UserError, match="serves FID alone"):
        evaluate_metrics(["prdc"], tmp_path / "s.npy", tmp_path / "r.npz", cfg_eval=cfg)


def test_report_never_overwrites_foreign_files(tmp_path):
    path = tmp_path / "eval-fid.json"
    path.write_text('{"mine": 1}')
    with pytest.raises(UserError, match="not a uvq report"):
        write_report({"uvq_report": "eval"}, path)
    write_report({"uvq_report": "eval", "x": 1}, path, overwrite=True)
    write_report({"uvq_report": "eval", "x": 2}, path)  # ours now: replaced without --overwrite
    assert json.loads(path.read_text())["x"] == 2


# ---------------------------------------------------------------------------------------------
# Reconstruction metrics of the VQGAN
# ---------------------------------------------------------------------------------------------


def test_reconstruction_metrics(tmp_path):
    from uvq.vqgan.model import build_vqgan

    torch.manual_seed(0)
    cfg = VQGANConfig(img_size=16, nf=32, ch_mult=[1, 2], res_blocks=1, attn_resolutions=[], emb_dim=8, codebook_size=32)
    vqgan = build_vqgan(cfg).eval()
    x = torch.rand(6, 3, 16, 16)
    res = evaluate_reconstruction(vqgan, [x[:4], x[4:]], grid_path=tmp_path / "grid.png", grid_images=5)
    with torch.no_grad():
        xrec, codes, _ = vqgan(x)
    mse = (xrec.clamp(0, 1) - x).pow(2).flatten(1).mean(1)
    assert res["psnr"] == pytest.approx(float((10 * torch.log10(1 / mse)).mean()), rel=1e-5)
    counts = np.bincount(codes.flatten().numpy(), minlength=32)
    p = counts[counts > 0] / counts.sum()
    assert res["codes_used"] == int((counts > 0).sum())
    assert res["perplexity"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-9)
    assert res["lpips"] is None and res["rfid"] is None and res["n_images"] == 6
    w, h = Image.open(tmp_path / "grid.png").size  # 2 rows of 5 cells of 16 px enlarged 4x, pad 2
    assert h == 2 * (4 * 16 + 2) + 2 and w > 5 * (4 * 16 + 2) + 2  # wider by the margin of the row labels


# ---------------------------------------------------------------------------------------------
# The CLI: report files, --json, one-line errors
# ---------------------------------------------------------------------------------------------


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """The real entry point, in process: (exit status, stdout, stderr)."""
    from uvq.cli.app import main

    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_cli_prdc_fid_reports(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(10)
    np.save(tmp_path / "s.npy", rng.standard_normal((30, 64)).astype(np.float32))
    np.save(tmp_path / "r.npy", rng.standard_normal((40, 64)).astype(np.float32))
    out = tmp_path / "reports"
    code, stdout, err = cli(capsys, "eval", "prdc", "--samples", str(tmp_path / "s.npy"), "--reference",
                            str(tmp_path / "r.npy"), "--k", "3", "--out", str(out), "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["results"]["k"] == 3 and summary["samples"]["n_images"] == 30
    assert json.loads((out / "eval-prdc.json").read_text())["results"] == summary["results"]
    assert "eval prdc" in summary["command"] and summary["uvq_version"]

    (out / "eval-fid.json").write_text("user notes")
    code, _, err = cli(capsys, "eval", "fid", "--samples", str(tmp_path / "s.npy"), "--reference",
                       str(tmp_path / "r.npy"), "--out", str(out))
    assert code == 2 and err.strip().count("\n") == 0 and "--overwrite" in err
    assert (out / "eval-fid.json").read_text() == "user notes"

    (tmp_path / "imgs").mkdir()
    write_png(tmp_path / "imgs" / "a.png", random_images(1, 8, 8, 0)[0])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    code, _, err = cli(capsys, "eval", "fid", "--samples", str(tmp_path / "imgs"), "--reference", str(tmp_path / "r.npy"))
    assert code == 2 and err.startswith("error: ") and err.strip().count("\n") == 0
    assert "weights-inception-2015-12-05-6726825d.pth" in err and "--inception-weights" in err

    code, _, err = cli(capsys, "eval", "prdc", "--samples", str(tmp_path / "s.npy"), "--reference",
                       str(tmp_path / "r.npy"), "--k", "40", "--out", str(out))
    assert code == 2 and "lower --k" in err


@pytest.mark.slow
def test_cli_fid_with_inception_weights(tmp_path, uvq_cli, inception_weights):
    for i, a in enumerate(random_images(2, 24, 24, 11)):
        write_png(tmp_path / "s" / f"{i}.png", a)
    for i, a in enumerate(random_images(2, 24, 24, 12)):
        write_png(tmp_path / "r" / f"{i}.png", a)
    proc = uvq_cli("eval", "fid", "--samples", str(tmp_path / "s"), "--reference", str(tmp_path / "r"),
                   "--inception-weights", str(inception_weights), "--cache-dir", str(tmp_path / "c"), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "s" / "eval-fid.json").read_text())
    assert report["results"]["fid"] == json.loads(proc.stdout)["results"]["fid"]


def test_cli_recon(tmp_path, capsys):
    """`uvq eval recon` on a checkpoint directory: the run's own split, report and grid beside it."""
    from uvq.checkpoint import write_checkpoint_dir
    from uvq.config import Config
    from uvq.vqgan.model import build_vqgan

    torch.manual_seed(0)
    vcfg = VQGANConfig(img_size=16, nf=32, ch_mult=[1, 2], res_blocks=1, attn_resolutions=[], emb_dim=8, codebook_size=32)
    config = Config()
    config.data.val_fraction = 0.5
    run = tmp_path / "run"
    write_checkpoint_dir(run / "checkpoints" / "step-00000001", kind="vqgan", model_config=dataclasses.asdict(vcfg),
                         weights={"model": build_vqgan(vcfg)}, step=1, config=config.to_dict())
    for i, a in enumerate(random_images(12, 20, 16, seed=13)):
        write_png(tmp_path / "data" / f"{i:02d}.png", a)
    code, stdout, err = cli(capsys, "eval", "recon", "--vqgan", str(run / "checkpoints" / "step-00000001"),
                            "--data", str(tmp_path / "data"), "--no-lpips", "--no-fid", "--batch-size", "4", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    from uvq.data.sources import in_split

    n_val = sum(in_split(f"{i:02d}", "val", 0.5) for i in range(12))  # folder keys drop the extension
    assert report["results"]["n_images"] == n_val > 0 and report["data"]["val_fraction"] == 0.5
    assert report["results"]["lpips"] is None and report["results"]["rfid"] is None
    assert 0 < report["results"]["codes_used"] <= 32 and report["results"]["perplexity"] >= 1
    assert (run / "eval-recon-val.json").is_file() and (run / "recon-val.png").is_file()
    assert "LPIPS skipped" in err and "LPIPS skipped (--no-lpips)" in report["warnings"]
