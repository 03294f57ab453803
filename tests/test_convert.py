"""`uvq import`: the authors' and taming's checkpoints reproduce their own codes' outputs in uvq.

The fixtures (tests/fixtures, see its README) were made by running the original projects' code; the
importer must reproduce what that code computed, to a relative error of 1e-5 (codes exactly).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from uvq.checkpoint import build_model, load_model, load_state_dict, read_meta
from uvq.config import VQGANConfig, load_config
from uvq.files import sha256_file
from uvq.interop import convert, layouts, reference
from uvq.runtime import UserError

REL = 1e-5
FIXTURES = Path(__file__).resolve().parent / "fixtures"
OFFICIAL = FIXTURES / "official"
TAMING = FIXTURES / "taming"


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference over the reference's largest magnitude (computed here, not by uvq)."""
    return float((a.double() - ref.double()).abs().max() / ref.double().abs().max())


def _need_fixtures() -> None:
    names = ("vqgan_ema_small.th", "vqgan_io_small.pt", "absorbing_ema_small.th", "absorbing_io_small.pt",
             "official_small.json")
    for path in [OFFICIAL / n for n in names] + [TAMING / n for n in ("taming_vqgan_small.ckpt", "taming_io_small.pt",
                                                                      "taming_small.json")]:
        if not path.is_file():
            pytest.fail(f"parity fixture missing: {path} (see tests/fixtures/README.md)")


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """The official small fixtures imported once (4 heads, as official_small.json says)."""
    _need_fixtures()
    out = tmp_path_factory.mktemp("official") / "models"
    events = []
    summary = convert.import_official(out, vqgan=OFFICIAL / "vqgan_ema_small.th",
                                      prior=OFFICIAL / "absorbing_ema_small.th", heads=4, progress=events.append)
    return out, summary, events


@pytest.fixture(scope="module")
def taming(tmp_path_factory):
    _need_fixtures()
    out = tmp_path_factory.mktemp("taming") / "vq"
    return out, convert.import_taming(out, vqgan=TAMING / "taming_vqgan_small.ckpt", img_size=32)


# ---------------------------------------------------------------------------------------------
# The fixtures: uvq's modules reproduce the original codes' outputs
# ---------------------------------------------------------------------------------------------


def test_official_vqgan_reproduces_the_authors_outputs(official):
    out, _, _ = official
    io = _load(OFFICIAL / "vqgan_io_small.pt")
    vq, _ = load_model(out / "vqgan", "vqgan")
    with torch.no_grad():
        codes = vq.encode_codes(io["images"])
        recon, codes_fwd, _ = vq(io["images"])
        decoded = vq.decode_codes(io["codes"])
    assert torch.equal(codes, io["codes"]) and torch.equal(codes_fwd, io["codes"])
    assert _rel(recon, io["reconstruction"]) <= REL
    assert _rel(decoded, io["decoded_from_codes"]) <= REL


def test_official_prior_reproduces_the_authors_logits(official):
    out, _, _ = official
    io = _load(OFFICIAL / "absorbing_io_small.pt")
    prior, meta = load_model(out / "prior", "prior")
    assert (io["x_t"] == 64).any() and meta["model_config"]["codebook_size"] == 64  # mask id = K
    with torch.no_grad():
        logits = prior(io["x_t"])
    assert logits.shape == io["logits"].shape == (4, 256, 64)
    assert _rel(logits, io["logits"]) <= REL


def test_taming_vqgan_reproduces_tamings_outputs(taming):
    out, summary = taming
    io = _load(TAMING / "taming_io_small.pt")
    vq, meta = load_model(out, "vqgan")
    assert meta["model_config"]["variant"] == "taming"
    x01 = (io["images"] + 1) / 2  # uvq's API takes [0,1]; taming's networks see [-1,1]
    with torch.no_grad():
        codes = vq.encode_codes(x01)
        recon = vq(x01)[0] * 2 - 1
        decoded = vq.decode_codes(io["codes"]) * 2 - 1
    assert torch.equal(codes, io["codes"])
    assert _rel(recon, io["reconstruction"]) <= REL
    assert _rel(decoded, io["decoded_from_codes"]) <= REL
    assert summary["vqgan"]["verification"]["ok"]


def test_functional_references_reproduce_the_fixtures():
    """The verification's references (independent of uvq's modules) match the original codes too."""
    _need_fixtures()
    vq, io = _load(OFFICIAL / "vqgan_ema_small.th"), _load(OFFICIAL / "vqgan_io_small.pt")
    book = vq["ae.quantize.embedding.weight"]
    z = reference.official_encode(vq, io["images"])
    assert torch.equal(reference.nearest_codes(z, book), io["codes"])
    assert _rel(reference.official_decode(vq, book[io["codes"]].permute(0, 3, 1, 2)), io["decoded_from_codes"]) <= REL
    pr, pio = _load(OFFICIAL / "absorbing_ema_small.th"), _load(OFFICIAL / "absorbing_io_small.pt")
    assert _rel(reference.official_transformer(pr, pio["x_t"], 4), pio["logits"]) <= REL
    tm, tio = _load(TAMING / "taming_vqgan_small.ckpt")["state_dict"], _load(TAMING / "taming_io_small.pt")
    tbook = tm["quantize.embedding.weight"]
    assert torch.equal(reference.nearest_codes(reference.taming_encode(tm, tio["images"]), tbook), tio["codes"])
    assert _rel(reference.taming_decode(tm, tbook[tio["codes"]].permute(0, 3, 1, 2)), tio["decoded_from_codes"]) <= REL


# ---------------------------------------------------------------------------------------------
# Inference, provenance, key accounting
# ---------------------------------------------------------------------------------------------


def test_inferred_architectures_match_the_fixture_settings():
    _need_fixtures()
    hp = json.loads((OFFICIAL / "official_small.json").read_text())
    vh, ph = hp["vqgan_hparams"], hp["prior_hparams"]
    cfg = layouts.infer_official_vqgan(_load(OFFICIAL / "vqgan_ema_small.th"), img_size=vh["img_size"])
    assert (cfg["nf"], cfg["ch_mult"], cfg["res_blocks"], cfg["dec_res_blocks"]) == (vh["nf"], vh["ch_mult"], vh["res_blocks"], vh["res_blocks"])
    assert (cfg["attn_resolutions"], cfg["emb_dim"], cfg["codebook_size"]) == (vh["attn_resolutions"], vh["emb_dim"], vh["codebook_size"])
    assert cfg["likelihood_head"] is True  # the fixture carries ae.generator.logsigma.*
    pcfg = layouts.infer_official_prior(_load(OFFICIAL / "absorbing_ema_small.th"), n_head=ph["bert_n_head"])
    assert (pcfg["n_embd"], pcfg["n_layer"], pcfg["latent_shape"]) == (ph["bert_n_emb"], ph["bert_n_layers"], vh["latent_shape"][1:])
    th = json.loads((TAMING / "taming_small.json").read_text())
    dd = th["ddconfig"]
    tcfg = layouts.infer_taming_vqgan(_load(TAMING / "taming_vqgan_small.ckpt")["state_dict"], img_size=dd["resolution"])
    assert (tcfg["nf"], tcfg["ch_mult"], tcfg["res_blocks"], tcfg["dec_res_blocks"]) == (dd["ch"], dd["ch_mult"], dd["num_res_blocks"], dd["num_res_blocks"] + 1)
    assert (tcfg["z_channels"], tcfg["emb_dim"], tcfg["codebook_size"], tcfg["attn_resolutions"]) == (dd["z_channels"], th["embed_dim"], th["n_embed"], dd["attn_resolutions"])


def test_provenance_names_sources_and_tokenizer(official):
    from uvq.checkpoint import find_vqgan

    out, summary, events = official
    vq_meta, pr_meta = read_meta(out / "vqgan"), read_meta(out / "prior")
    src = vq_meta["provenance"]["files"][0]
    assert src["sha256"] == sha256_file(OFFICIAL / "vqgan_ema_small.th") and src["name"] == "vqgan_ema_small.th"
    assert pr_meta["provenance"]["files"][0]["sha256"] == sha256_file(OFFICIAL / "absorbing_ema_small.th")
    assert vq_meta["provenance"]["importer"]["version"] == convert.IMPORTER_VERSION
    tok = pr_meta["provenance"]["tokenizer"]
    assert tok["sha256"] == vq_meta["weights_sha256"]["model"]
    assert pr_meta["provenance"]["latents"]["latent_shape"] == [16, 16]
    # `uvq sample --prior out/prior` finds the VQGAN through this record
    ckpt, _, where = find_vqgan(pr_meta)
    assert Path(ckpt) == (out / "vqgan").resolve() and "provenance" in where
    ignored = summary["vqgan"]["keys"]["ignored"]
    assert sum(ignored.values()) + summary["vqgan"]["keys"]["mapped"] == len(_load(OFFICIAL / "vqgan_ema_small.th"))
    assert any("verified prior" in e.get("message", "") for e in events)


def test_strict_mapping_lists_missing_and_unexpected_keys(tmp_path):
    _need_fixtures()
    sd = dict(_load(OFFICIAL / "vqgan_ema_small.th"))
    sd["ae.quantize.extra_buffer"] = torch.zeros(3)
    del sd["ae.generator.blocks.9.bias"]
    torch.save(sd, tmp_path / "v.th")
    with pytest.raises(UserError) as err:
        convert.import_official(tmp_path / "out", vqgan=tmp_path / "v.th", img_size=32)
    msg = str(err.value)
    assert "missing 1 (decoder.blocks.9.bias)" in msg and "unexpected 1 (ae.quantize.extra_buffer)" in msg
    assert "\n" not in msg and not (tmp_path / "out").exists()


def test_prior_from_another_vqgan_is_refused(tmp_path):
    _need_fixtures()
    pr = dict(_load(OFFICIAL / "absorbing_ema_small.th"))
    pr["embedding_weight"] = pr["embedding_weight"] + 0.01
    torch.save(pr, tmp_path / "p.th")
    with pytest.raises(UserError, match="trained on another VQGAN's codes"):
        convert.import_official(tmp_path / "out", vqgan=OFFICIAL / "vqgan_ema_small.th", prior=tmp_path / "p.th", heads=4)


def test_preset_says_what_differs():
    _need_fixtures()
    with pytest.raises(UserError) as err:
        convert.import_official("/nonexistent/never-written", vqgan=OFFICIAL / "vqgan_ema_small.th",
                                prior=OFFICIAL / "absorbing_ema_small.th", preset="ffhq")
    assert "vqgan.nf 32 (paper: 128)" in str(err.value) and "prior.n_layer 2 (paper: 24)" in str(err.value)


def test_verification_catches_a_wrong_weight(official):
    """The check is not vacuous: a perturbed original no longer matches what was written."""
    out, _, _ = official
    sd = dict(_load(OFFICIAL / "vqgan_ema_small.th"))
    ok = convert.verify_vqgan(out / "vqgan", sd, "official", device=torch.device("cpu"), size=32)
    sd["ae.generator.blocks.7.conv2.weight"] = sd["ae.generator.blocks.7.conv2.weight"] * 1.01
    bad = convert.verify_vqgan(out / "vqgan", sd, "official", device=torch.device("cpu"), size=32)
    assert ok["ok"] and ok["max_rel"] < REL and ok["logsigma"]["max_rel"] < REL
    assert not bad["ok"] and bad["max_rel"] > convert.TOLERANCE
    sd = dict(_load(OFFICIAL / "vqgan_ema_small.th"))
    sd["ae.generator.logsigma.2.bias"] = sd["ae.generator.logsigma.2.bias"] + 0.1  # the likelihood head is checked too
    head = convert.verify_vqgan(out / "vqgan", sd, "official", device=torch.device("cpu"), size=32)
    assert not head["ok"] and head["max_rel"] < REL and head["logsigma"]["max_rel"] > convert.TOLERANCE
    pr = dict(_load(OFFICIAL / "absorbing_ema_small.th"))
    assert not convert.verify_prior(out / "prior", pr, n_head=2, device=torch.device("cpu"))["ok"]  # wrong heads


# ---------------------------------------------------------------------------------------------
# Generality: the paper's full-size layout, made here with random weights
# ---------------------------------------------------------------------------------------------


def _official_full_size(seed: int = 0) -> tuple[dict, dict]:
    """The authors' key sets at the paper's size (fp16 to keep the files small).

    The VQGAN's keys are uvq's renamed (ae.encoder / ae.generator / ae.quantize) plus the
    never-used conv_out of same-width residual blocks that the authors' ResBlock always owns;
    the prior's are uvq's with qkv split back into query / key / value.
    """
    g = torch.Generator().manual_seed(seed)

    def rand(shape, scale):  # random weights of the right scale (names and shapes from meta modules)
        return (torch.randn(shape, generator=g) * scale).half()

    def scale(name, shape):
        if name.endswith("norm1.weight") or name.endswith("norm2.weight") or ".ln" in name or name.endswith("norm.weight"):
            return None  # norms: near 1
        return 1.0 / max(1, int(torch.tensor(shape[1:]).prod())) ** 0.5 if len(shape) > 1 else 0.02

    def fill(name, shape):
        s = scale(name, shape)
        return (1 + rand(shape, 0.02)) if s is None else rand(shape, s)

    with torch.device("meta"):
        vq = build_model("vqgan", dataclasses.asdict(VQGANConfig()))
        prior = build_model("prior", dataclasses.asdict(load_config("ffhq").model.prior))
    names = {"ae." + k.replace("decoder.", "generator.", 1): v.shape for k, v in vq.state_dict().items()}
    sd = {}
    for name, shape in names.items():
        sd[name] = fill(name, shape)
        block = name.rsplit(".", 2)[0]
        if name.endswith(".norm1.weight") and block + ".conv_out.weight" not in names:
            c = shape[0]  # the authors' never-used shortcut of a same-width block
            sd[block + ".conv_out.weight"] = rand((c, c, 1, 1), c ** -0.5)
            sd[block + ".conv_out.bias"] = rand((c,), 0.02)
    sd["ae.quantize.embedding.weight"] = rand(names["ae.quantize.embedding.weight"], 1.0)
    sd["disc.main.0.weight"] = torch.randn(64, 3, 4, 4).half()
    sd["perceptual.net.slice1.0.weight"] = torch.randn(64, 3, 3, 3).half()
    pr = {}
    for k, meta in prior.state_dict().items():
        v = fill(k, meta.shape)
        if ".attn.qkv." in k:
            for part, t in zip(("query", "key", "value"), v.chunk(3, dim=0), strict=True):
                pr["_denoise_fn." + k.replace("qkv", part)] = t.clone()
        else:
            pr["_denoise_fn." + k] = v
    pr["_denoise_fn.start_tok"] = torch.zeros(1, 1, 512).half()
    for buf in ("Lt_history", "Lt_count", "loss_history"):
        pr[buf] = torch.zeros(257)
    pr["embedding_weight"] = sd["ae.quantize.embedding.weight"].clone()
    return sd, pr


def test_full_size_official_layout_round_trips(tmp_path):
    sd, pr = _official_full_size()
    torch.save(sd, tmp_path / "vqgan_ema_1400000.th")
    torch.save(pr, tmp_path / "absorbing_ema_1400000.th")
    summary = convert.import_official(tmp_path / "ffhq", vqgan=tmp_path / "vqgan_ema_1400000.th",
                                      prior=tmp_path / "absorbing_ema_1400000.th", preset="ffhq", verify_size=32)
    paper = load_config("ffhq").model
    vc, pc = summary["vqgan"]["model_config"], summary["prior"]["model_config"]
    assert (vc["img_size"], vc["nf"], vc["ch_mult"], vc["res_blocks"], vc["attn_resolutions"], vc["emb_dim"],
            vc["codebook_size"]) == (256, paper.vqgan.nf, paper.vqgan.ch_mult, 2, [16], 256, 1024)
    assert (pc["n_layer"], pc["n_embd"], pc["n_head"], pc["codebook_size"], pc["latent_shape"]) == (24, 512, 8, 1024, [16, 16])
    assert summary["vqgan"]["verification"]["ok"] and summary["prior"]["verification"]["ok"]
    # round trip: the written weights are the original tensors (verification loaded them through load_model)
    vsd, _ = load_state_dict(tmp_path / "ffhq" / "vqgan")
    psd, _ = load_state_dict(tmp_path / "ffhq" / "prior")
    assert len(vsd) == sum(1 for k in sd if k.startswith("ae.")) - summary["vqgan"]["keys"]["ignored"][
        "unused 1x1 shortcut of a same-width residual block"]
    for k, v in sd.items():
        if k.startswith("ae.") and (name := k[3:].replace("generator.", "decoder.", 1)) in vsd:
            assert torch.equal(vsd[name], v.float()), k
    qkv = torch.cat([pr[f"_denoise_fn.blocks.23.attn.{t}.weight"] for t in ("query", "key", "value")]).float()
    assert torch.equal(psd["blocks.23.attn.qkv.weight"], qkv)
    assert torch.equal(psd["pos_emb"], pr["_denoise_fn.pos_emb"].float())


# ---------------------------------------------------------------------------------------------
# Refusals: one clear line, a non-zero exit, and nothing executed
# ---------------------------------------------------------------------------------------------


class _RunsCode:
    """Unpickling this would call os.system: the file must be refused without running it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _cli_error(capsys, *args: str) -> str:
    """Run `uvq` through its entry point (in-process: no interpreter start) and expect one error line."""
    from uvq.cli.app import main

    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert exit_.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_cli_refuses_a_pickle_that_carries_code(tmp_path, capsys):
    marker = tmp_path / "ran"
    torch.save({"ae.encoder.blocks.0.weight": torch.zeros(1), "x": _RunsCode(marker)}, tmp_path / "evil.th")
    with open(tmp_path / "evil.pkl", "wb") as fh:
        pickle.dump({"state_dict": _RunsCode(marker)}, fh)
    line = _cli_error(capsys, "import", "official", "--vqgan", str(tmp_path / "evil.th"), "--out", str(tmp_path / "o"))
    assert "refused" in line and ("posix.system" in line or "os.system" in line)
    with pytest.raises(UserError, match="would import and run code"):
        layouts.load_tensor_file(tmp_path / "evil.pkl", "--vqgan")
    assert not marker.exists()


def test_cli_refuses_truncated_and_wrong_kind_files(tmp_path, capsys):
    _need_fixtures()
    data = (OFFICIAL / "vqgan_ema_small.th").read_bytes()
    (tmp_path / "cut.th").write_bytes(data[: len(data) // 3])
    line = _cli_error(capsys, "import", "official", "--vqgan", str(tmp_path / "cut.th"), "--out", str(tmp_path / "o"))
    assert "truncated or damaged" in line
    line = _cli_error(capsys, "import", "official", "--vqgan", str(OFFICIAL / "absorbing_ema_small.th"),
                      "--out", str(tmp_path / "o"))
    assert "wrong kind" in line and "--prior" in line
    # the library says the same for the other direction and for taming
    with pytest.raises(UserError, match="wrong kind.*VQGAN"):
        convert.import_official(tmp_path / "o", vqgan=OFFICIAL / "vqgan_ema_small.th", prior=OFFICIAL / "vqgan_ema_small.th")
    with pytest.raises(UserError, match="wrong kind.*uvq import official"):
        convert.import_taming(tmp_path / "o", vqgan=OFFICIAL / "vqgan_ema_small.th")
    assert not (tmp_path / "o").exists()


def test_cli_import_taming_json_summary(tmp_path, uvq_cli):
    _need_fixtures()
    proc = uvq_cli("--json", "import", "taming", "--vqgan", str(TAMING / "taming_vqgan_small.ckpt"),
                   "--img-size", "32", "--out", str(tmp_path / "vq"))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["vqgan"]["verification"]["ok"] and summary["vqgan"]["verification"]["max_rel"] < REL
    assert any('"verified vqgan' in ln for ln in proc.stderr.splitlines())  # JSON progress lines on stderr
    assert read_meta(tmp_path / "vq")["kind"] == "vqgan"
    with pytest.raises(UserError, match="not empty; pass --overwrite"):
        convert.import_taming(tmp_path / "vq", vqgan=TAMING / "taming_vqgan_small.ckpt")
