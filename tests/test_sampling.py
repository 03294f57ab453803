"""The sampler (docs/method.md section 3): the chain against a literal loop, reuse, seeds, samplers.

The network is the real `AbsorbingTransformer` at a tiny size with random weights; where a test
needs thousands of steps it uses a cheap closed-form predict function instead.
"""

from __future__ import annotations

import math

import pytest
import torch

from uvq.interop.reference import authors_loop, reference_from
from uvq.prior.model import AbsorbingTransformer
from uvq.registry import registry
from uvq.runtime import UserError
from uvq.sampling.chain import (
    SampleRNG,
    absorbing_chain,
    categorical,
    iter_samples,
    make_filter,
    run_chain,
    sample_tokens,
    top_k_filter,
    top_p_filter,
)

K, N = 16, 16


@pytest.fixture(scope="module")
def prior() -> AbsorbingTransformer:
    torch.manual_seed(0)
    net = AbsorbingTransformer(codebook_size=K, n_tokens=N, n_embd=32, n_head=2, n_layer=2).eval()
    # Random but not tiny output weights, so that samples are far from uniform.
    with torch.no_grad():
        net.head.weight.normal_(0, 1.0)
        net.pos_emb.normal_(0, 0.5)
    return net


def _predict(net):
    def predict(x):
        with torch.no_grad():
            return net(x)
    return predict


def cheap_predict(k: int):
    """A closed-form network: logits depend on the position and on how many tokens are known."""
    def predict(x):
        b, n = x.shape
        known = (x != k).sum(1, keepdim=True).float()  # [b, 1]
        pos = torch.arange(n, dtype=torch.float32)[None, :, None]  # [1, n, 1]
        codes = torch.arange(k, dtype=torch.float32)[None, None, :]  # [1, 1, k]
        return torch.sin(pos * 0.7 + codes * 1.3) * 2 + 0.05 * known[:, :, None]  # [b, n, k]
    return predict


def literal_paper_loop(x, net, *, mask_id, steps, temp, rng, t_start=None):
    """The authors' loop (uvq.interop.reference.authors_loop), the network on every sample at every step.

    Same draws as uvq's chain (two uniform tensors per step from the same SampleRNG) and the same
    inverse-CDF categorical draw, so the two must agree exactly. Returns (x, passes, reveal_rows)
    where reveal_rows counts (sample, step) pairs that revealed at least one token.
    """
    out, run, reveal_rows = authors_loop(net, x, mask_id=mask_id, steps=steps, temp=temp,
                                         uniform=lambda: rng.rand(x.shape[1]), t_start=t_start)
    return out, run * x.shape[0], reveal_rows


# ---------------------------------------------------------------------------------------------
# The chain equals the paper's loop, with fewer network passes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [N, 5, 1])
def test_chain_equals_literal_paper_loop(prior, steps):
    x0 = torch.full((6, N), K)
    with torch.no_grad():
        ref, ref_passes, reveal_rows = literal_paper_loop(x0, prior, mask_id=K, steps=steps, temp=0.9,
                                                          rng=SampleRNG(7, range(6)))
    out, stats = run_chain(x0, _predict(prior), mask_id=K, steps=steps, temp=0.9, rng=SampleRNG(7, range(6)))
    assert torch.equal(out, ref)
    assert (out != K).all()
    assert ref_passes == 6 * steps
    # a pass runs exactly for the (sample, step) pairs that reveal something
    assert stats["network_passes"] == reveal_rows <= ref_passes
    assert stats["steps"] == steps


def test_chain_equals_literal_loop_when_inpainting(prior):
    torch.manual_seed(1)
    x0 = torch.randint(0, K, (4, N))
    x0[:, 3:11] = K
    with torch.no_grad():
        ref, _, _ = literal_paper_loop(x0, prior, mask_id=K, steps=N, temp=1.0, rng=SampleRNG(3, range(4)), t_start=8)
    out, _ = run_chain(x0, _predict(prior), mask_id=K, steps=N, temp=1.0, rng=SampleRNG(3, range(4)), t_start=8)
    assert torch.equal(out, ref)
    assert torch.equal(out[:, :3], x0[:, :3]) and torch.equal(out[:, 11:], x0[:, 11:])


def test_network_passes_saved_follow_closed_form():
    # Before step t a token is still masked with probability t/S, so a sample reveals nothing at
    # step t with probability (1 - 1/S)^N for every t: S*(1-1/S)^N passes are saved per sample,
    # about S/e at S = N (docs/method.md section 3).
    n, b = 256, 48
    x0 = torch.full((b, n), 8)
    out, stats = run_chain(x0, cheap_predict(8), mask_id=8, steps=n, temp=1.0, rng=SampleRNG(11, range(b)))
    assert (out != 8).all()
    saved = 1.0 - stats["network_passes"] / (b * n)
    expected = (1.0 - 1.0 / n) ** n
    assert abs(expected - 1 / math.e) < 0.01
    # per-sample saved counts are sums of S Bernoulli(p) with positive correlation; 0.03 is > 5 sigma
    assert abs(saved - expected) < 0.03, (saved, expected)


@pytest.mark.parametrize("steps", list(range(1, N + 1)))
def test_every_step_budget_reveals_everything(steps):
    x0 = torch.full((3, N), K)
    ts = []
    for step in absorbing_chain(x0, cheap_predict(K), mask_id=K, steps=steps, temp=0.9, rng=SampleRNG(0, range(3))):
        ts.append(step.t)
    assert ts == list(range(steps, 0, -1))
    assert (step.x != K).all() and step.x.max() < K
    assert step.network_passes <= 3 * steps


def test_reveal_probability_is_one_over_t():
    n, b, steps = 512, 40, 8
    x0 = torch.full((b, n), 4)
    chain = absorbing_chain(x0, cheap_predict(4), mask_id=4, steps=steps, temp=1.0, rng=SampleRNG(5, range(b)))
    first = next(chain)
    frac = first.revealed.float().mean().item()  # Binomial(b*n, 1/8)
    assert abs(frac - 1 / steps) < 4 * math.sqrt((1 / steps) * (1 - 1 / steps) / (b * n))
    second = next(chain)
    masked_before = first.x == 4
    frac2 = second.revealed[masked_before].float().mean().item()  # 1/7 of what was left
    assert abs(frac2 - 1 / (steps - 1)) < 0.02
    assert not (second.revealed & ~masked_before).any()


def test_raster_order_reveals_one_per_step_in_order():
    x0 = torch.full((2, N), K)
    order = []
    for step in absorbing_chain(x0, cheap_predict(K), mask_id=K, steps=N, temp=1.0, rng=SampleRNG(0, range(2)),
                                order="raster"):
        assert step.revealed.sum(1).tolist() == [1, 1]
        order.append(step.revealed[0].nonzero().item())
    assert order == list(range(N))


# ---------------------------------------------------------------------------------------------
# Randomness
# ---------------------------------------------------------------------------------------------


def test_sample_rng_depends_only_on_seed_id_and_counter():
    full = SampleRNG(42, range(10))
    a = full.rand(3, 7)
    b = full.rand(5)
    sub = SampleRNG(42, [4, 9, 2])
    assert torch.equal(sub.rand(3, 7), a[[4, 9, 2]])
    assert torch.equal(sub.rand(5), b[[4, 9, 2]])
    picked = full.select(torch.tensor([1, 3]))  # a batch that shrinks keeps each sample's stream
    assert torch.equal(picked.rand(2), full.rand(2)[[1, 3]])
    assert not torch.equal(SampleRNG(43, range(10)).rand(3, 7), a)
    assert a.min() >= 0 and a.max() < 1


def test_sample_rng_is_uniform_and_decorrelated():
    u = SampleRNG(0, range(200)).rand(500)  # [200, 500]
    flat = u.flatten().double()
    assert abs(flat.mean().item() - 0.5) < 0.003
    assert abs(flat.var().item() - 1 / 12) < 0.002
    hist = torch.histc(flat, bins=20, min=0, max=1)
    expected = flat.numel() / 20
    chi2 = ((hist - expected) ** 2 / expected).sum().item()
    assert chi2 < 50  # 19 degrees of freedom: p < 1e-4 above 45
    # neighbouring elements, neighbouring samples and consecutive calls are uncorrelated
    corr = torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].item()
    assert abs(corr) < 0.01
    rows = torch.corrcoef(torch.stack([u[:-1].flatten(), u[1:].flatten()]).double())[0, 1].item()
    assert abs(rows) < 0.01


def test_categorical_matches_softmax_and_never_draws_filtered_values():
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0, float("-inf")]])
    m = 200_000
    u = SampleRNG(1, [0]).rand(m)[0]
    draws = categorical(logits.expand(m, -1), u)
    freq = torch.bincount(draws, minlength=5).double() / m
    p = logits.softmax(-1)[0].double()
    assert freq[4] == 0
    assert torch.allclose(freq, p, atol=4 * math.sqrt(0.25 / m))
    # u at the very top of [0, 1) still lands on a value of positive probability
    top = torch.full((3,), 1.0 - 2.0 ** -24)
    assert (categorical(torch.tensor([[0.0, 0.0, float("-inf")]] * 3), top) == 1).all()


def test_top_k_and_top_p_filters_against_brute_force():
    torch.manual_seed(2)
    logits = torch.randn(50, 12)
    k1 = top_k_filter(1)(logits)
    assert torch.equal(k1.argmax(-1), logits.argmax(-1)) and (k1.isfinite().sum(-1) == 1).all()
    kept = top_k_filter(4)(logits).isfinite()
    assert (kept.sum(-1) == 4).all()
    for row, keep in zip(logits, kept, strict=True):
        assert set(row.topk(4).indices.tolist()) == set(keep.nonzero().flatten().tolist())
    p = 0.7
    kept = top_p_filter(p)(logits).isfinite()
    for row, keep in zip(logits, kept, strict=True):
        probs = row.softmax(-1)
        order = probs.argsort(descending=True)
        want, mass = set(), 0.0
        for i in order.tolist():  # smallest prefix of the sorted values whose mass reaches p
            want.add(i)
            mass += probs[i].item()
            if mass >= p:
                break
        assert set(keep.nonzero().flatten().tolist()) == want
    both = make_filter(top_k=3, top_p=0.99)(logits).isfinite()
    assert (both.sum(-1) <= 3).all()
    with pytest.raises(UserError):
        top_k_filter(0)
    with pytest.raises(UserError):
        top_p_filter(1.5)


# ---------------------------------------------------------------------------------------------
# Every registered sampler: one contract
# ---------------------------------------------------------------------------------------------

SAMPLERS = ["absorbing.v1", "absorbing_top_k.v1", "absorbing_top_p.v1", "maskgit_cosine.v1"]


@pytest.mark.parametrize("name", sorted(set(SAMPLERS) | set(registry.names("samplers"))))
@pytest.mark.parametrize("steps,t_start", [(N, None), (5, None), (1, None), (10, 6)])
def test_sampler_contract(prior, name, steps, t_start):
    """Reveals everything by the end, keeps known tokens, takes exactly t_start steps counting down."""
    torch.manual_seed(4)
    x0 = torch.randint(0, K, (5, N))
    unknown = torch.rand(5, N) < 0.6
    unknown[0] = True  # one fully masked row
    unknown[1] = False  # one row with nothing to do
    x0[unknown] = K
    sampler = registry.get("samplers", name)
    steps_seen, prev = [], x0
    for step in sampler(x0, _predict(prior), mask_id=K, steps=steps, temp=0.9, rng=SampleRNG(0, range(5)),
                        t_start=t_start):
        steps_seen.append(step.t)
        assert torch.equal(step.x[~unknown], x0[~unknown])  # known tokens never change
        assert not (step.revealed & (prev != K)).any()  # only masked positions are revealed
        assert torch.equal(step.revealed, (prev == K) & (step.x != K))
        prev = step.x
    assert steps_seen == list(range(t_start or steps, 0, -1))
    assert (prev != K).all() and prev.max() < K
    again, _ = run_chain(x0, _predict(prior), sampler=name, mask_id=K, steps=steps, temp=0.9,
                         rng=SampleRNG(0, range(5)), t_start=t_start)
    assert torch.equal(again, prev)  # deterministic for a seed


def test_maskgit_follows_the_cosine_schedule():
    n, steps = 64, 8
    x0 = torch.full((2, n), K)
    masked = []
    for step in registry.get("samplers", "maskgit_cosine.v1")(x0, cheap_predict(K), mask_id=K, steps=steps,
                                                              temp=1.0, rng=SampleRNG(0, range(2))):
        masked.append((step.x == K).sum(1).tolist())
    want = [math.floor(n * math.cos(math.pi / 2 * (s + 1) / steps)) for s in range(steps)]
    assert [m[0] for m in masked] == want and [m[1] for m in masked] == want


def test_top_k_one_is_greedy(prior):
    x0 = torch.full((3, N), K)
    chain = registry.get("samplers", "absorbing_top_k.v1")(x0, _predict(prior), mask_id=K, steps=N, temp=1.0,
                                                           rng=SampleRNG(0, range(3)), top_k=1)
    prev = x0
    for step in chain:
        with torch.no_grad():
            greedy = prior(prev).argmax(-1)
        assert torch.equal(step.x[step.revealed], greedy[step.revealed])
        prev = step.x


# ---------------------------------------------------------------------------------------------
# The final-result call
# ---------------------------------------------------------------------------------------------


def test_fixed_seed_gives_the_same_samples_whatever_the_batch_size(prior):
    runs = [sample_tokens(prior, 7, steps=10, temp=0.9, seed=5, batch_size=bs, device="cpu") for bs in (7, 3, 1)]
    assert runs[0].shape == (7, N)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    other = sample_tokens(prior, 7, steps=10, temp=0.9, seed=6, batch_size=7)
    assert not torch.equal(runs[0], other)
    # sample i is the same wherever it sits: a run of 3 starting at index 4 gives samples 4..6
    tail = sample_tokens(prior, 3, steps=10, temp=0.9, seed=5, batch_size=2, start_index=4)
    assert torch.equal(tail, runs[0][4:])


def test_sample_stats_and_progress(prior):
    events, stats = [], {}
    batches = list(iter_samples(prior, 5, steps=N, temp=1.0, seed=0, batch_size=2, progress=events.append,
                                stats=stats))
    assert [b.start for b in batches] == [0, 2, 4]
    assert 0 < stats["network_passes"] <= 5 * N and stats["steps"] == N
    assert events[0]["event"] == "start" and events[0]["total"] == 5 and events[-1]["event"] == "end"
    assert sum(e["n"] for e in events if e["event"] == "advance") == 5


@pytest.mark.parametrize("kwargs,match", [({"steps": 0}, "steps"), ({"steps": N + 1}, "steps"),
                                          ({"temp": 0.0}, "temp"), ({"temp": -1.0}, "temp"),
                                          ({"sampler": "nope.v1"}, "samplers")])
def test_bad_sampling_arguments_are_user_errors(prior, kwargs, match):
    with pytest.raises(UserError, match=match):
        sample_tokens(prior, 2, **{"steps": 4, "temp": 0.9, **kwargs})


# ---------------------------------------------------------------------------------------------
# `uvq sample`: checkpoints, provenance, outputs, bad input
# ---------------------------------------------------------------------------------------------


def make_checkpoints(root, *, codebook_size=16, img_size=16, prior_shape=None, seed=0):
    """A tiny VQGAN and a prior whose provenance names it, as fit-vqgan / fit-prior write them."""
    import dataclasses

    from uvq.checkpoint import read_meta, save_checkpoint
    from uvq.config import PriorConfig, VQGANConfig
    from uvq.prior.latents import tokenizer_record
    from uvq.vqgan.model import build_vqgan

    torch.manual_seed(seed)
    vc = VQGANConfig(img_size=img_size, nf=32, ch_mult=[1, 2], res_blocks=1, attn_resolutions=[], emb_dim=8,
                     codebook_size=codebook_size)
    vq = build_vqgan(vc)
    vq_ckpt = save_checkpoint(root / "vqgan", 10, kind="vqgan", model_config=dataclasses.asdict(vc),
                              weights={"model": vq, "ema": vq})
    pc = PriorConfig(n_embd=32, n_head=2, n_layer=1, codebook_size=codebook_size,
                     latent_shape=list(prior_shape or vc.latent_shape))
    net = AbsorbingTransformer(codebook_size=pc.codebook_size, n_tokens=pc.n_tokens, n_embd=32, n_head=2, n_layer=1)
    vq_meta = read_meta(vq_ckpt)
    vq_meta["weights_sha256"] = vq_meta["weights_sha256"]["ema"]
    tok = tokenizer_record(vq_meta, "ema")
    prior_ckpt = save_checkpoint(root / "prior", 20, kind="prior", model_config=dataclasses.asdict(pc),
                                 weights={"model": net}, config={"sample": {"steps": 8, "n": 5, "batch_size": 4}},
                                 provenance={"tokenizer": tok, "vqgan": tok["path"]})
    return vq_ckpt, prior_ckpt


def test_write_samples_outputs_and_provenance(tmp_path):
    import json

    from uvq.prior.latents import read_manifest, read_shard
    from uvq.sampling.outputs import write_samples

    vq_ckpt, prior_ckpt = make_checkpoints(tmp_path / "run")
    out = tmp_path / "samples"
    summary = write_samples(prior_ckpt, out, n=5, steps=8, temp=0.9, seed=3, batch_size=2, codes=True, device="cpu")
    names = sorted(p.name for p in out.iterdir())
    assert [f"sample-{i:06d}.png" for i in range(5)] == [n for n in names if n.startswith("sample-")]
    assert {"grid.png", "samples.json", "codes"} <= set(names)
    saved = json.loads((out / "samples.json").read_text())
    assert saved["vqgan"]["path"] == str(vq_ckpt) and saved["vqgan"]["weights"] == "ema"
    assert saved["seed"] == 3 and saved["steps"] == 8 and saved["temperature"] == 0.9
    assert saved["sampler"] == "absorbing.v1" and len(saved["prior"]["sha256"]) == 64
    assert 0 < saved["network_passes"] <= 5 * 8 and saved["uvq_version"]
    manifest = read_manifest(out / "codes")
    assert manifest["tokenizer"]["sha256"] == saved["vqgan"]["sha256"] and manifest["num_samples"]["train"] == 5
    codes = dict(read_shard(out / "codes" / manifest["shards"][0]["name"]))
    # the stored codes are the tokens of the same seed, whatever the batch size
    from uvq.checkpoint import load_model

    net, _ = load_model(prior_ckpt, "prior")
    tokens = sample_tokens(net, 5, steps=8, temp=0.9, seed=3, batch_size=5)
    assert torch.equal(torch.from_numpy(codes["sample-000004"].astype("int64")).flatten(), tokens[4])
    assert summary["grid"] == str(out / "grid.png")


def test_write_samples_refuses_mismatched_pairs_and_used_dirs(tmp_path):
    from uvq.sampling.outputs import write_samples

    vq_a, prior_a = make_checkpoints(tmp_path / "a", codebook_size=16)
    vq_b, _ = make_checkpoints(tmp_path / "b", codebook_size=32)
    vq_c, _ = make_checkpoints(tmp_path / "c", codebook_size=16, img_size=32)
    with pytest.raises(UserError, match="codebook of 32"):
        write_samples(prior_a, tmp_path / "s1", vqgan=vq_b, n=2, steps=4, device="cpu")
    with pytest.raises(UserError, match="decodes"):
        write_samples(prior_a, tmp_path / "s2", vqgan=vq_c, n=2, steps=4, device="cpu")
    write_samples(prior_a, tmp_path / "s3", n=2, steps=4, device="cpu")
    with pytest.raises(UserError, match="--overwrite"):
        write_samples(prior_a, tmp_path / "s3", n=2, steps=4, device="cpu")
    write_samples(prior_a, tmp_path / "s3", n=2, steps=4, device="cpu", overwrite=True)
    with pytest.raises(UserError, match="does not exist"):
        write_samples(tmp_path / "nope", tmp_path / "s4", n=2, steps=4, device="cpu")


def test_vqgan_is_found_beside_a_moved_run(tmp_path):
    import shutil

    from uvq.checkpoint import find_vqgan, read_meta

    make_checkpoints(tmp_path / "run")
    shutil.move(tmp_path / "run", tmp_path / "moved")
    meta = read_meta(tmp_path / "moved" / "prior")
    found, weights, where = find_vqgan(meta)
    assert found.parent.parent == (tmp_path / "moved" / "vqgan").resolve() and weights == "ema"
    shutil.rmtree(tmp_path / "moved" / "vqgan")
    with pytest.raises(UserError, match="--vqgan"):
        find_vqgan(meta)


def _uvq_in_process(args, capsys):
    """uvq.cli.app.main in this process (one import for many calls): (exit status, stdout, stderr)."""
    from uvq.cli.app import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_sample_cli_short_form(tmp_path):
    import json

    from conftest import run_uvq

    make_checkpoints(tmp_path / "run")
    run = tmp_path / "run"
    # the short form, from inside the run directory: the prior's own recipe gives n=5 and steps=8
    ok = run_uvq("sample", "--temp", "0.9", "--out", str(tmp_path / "s"), "--json", "--device", "cpu", cwd=run)
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout)
    assert summary["n"] == 5 and summary["steps"] == 8 and summary["temperature"] == 0.9
    assert f"prior: {(run / 'prior' / 'checkpoints' / 'step-00000020').resolve()}" in ok.stderr
    assert "from the prior's provenance" in ok.stderr
    assert len(list((tmp_path / "s").glob("sample-*.png"))) == 5


def test_sample_cli_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
    make_checkpoints(tmp_path / "run")
    run = tmp_path / "run"
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "sample-000000.png").write_bytes(b"")
    bad = [
        (["--steps", "0"], "sample.steps must be >= 1"),
        (["--steps", "65"], "between 1 and N=64"),
        (["--temp", "0"], "sample.temp must be between 0.001 and 1000"),
        (["--temp", "1e-45"], "sample.temp must be between 0.001 and 1000"),
        (["--temp", "inf"], "sample.temp must be a finite number"),
        (["--top-k", "0"], "sample.options.top_k must be an integer >= 1"),
        (["--top-p", "0"], "sample.options.top_p must be a number in (0, 1]"),
        (["--top-p", "1.5"], "sample.options.top_p must be a number in (0, 1]"),
        (["--batch-size", "0"], "sample.batch_size must be >= 1"),
        (["--sampler", "nope.v1"], "sample.sampler: unknown samplers name"),
        (["sample.options.choice_temp=2"], "sample.options.choice_temp is not an option of the sampler absorbing.v1; "
                                           "its options: order, top_k, top_p"),
        (["sample.options.temp=2"], "sample.options.temp is not a sampler option: sample.temp sets it"),
        (["train.lr=1"], "this command takes sample.KEY=VALUE overrides"),
        (["--prior", str(tmp_path / "missing")], "does not exist"),
        (["--out", str(tmp_path / "used")], "not made by uvq"),
    ]
    for extra, message in bad:
        code, _, err = _uvq_in_process(["sample", "--run-dir", str(run), "--out", str(tmp_path / "s"), "--device", "cpu",
                                        *extra], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and lines[-1].startswith("error: ") and message in lines[-1], (extra, err)
        assert "Traceback" not in err
    monkeypatch.chdir(tmp_path)
    code, _, err = _uvq_in_process(["sample", "--steps", "4", "--device", "cpu"], capsys)
    assert code == 2 and "no prior checkpoint given" in err


# ---------------------------------------------------------------------------------------------
# The benchmark's literal reference is the same network and the same process
# ---------------------------------------------------------------------------------------------


def test_benchmark_reference_network_matches_the_prior(prior):
    ref = reference_from(prior, n_head=2).eval()
    x = torch.randint(0, K + 1, (3, N))
    with torch.no_grad():
        assert torch.allclose(ref(x), prior(x), atol=1e-5)


def test_benchmark_runs_and_reports_ratios():
    from uvq.bench import bench_sampling, format_table

    result = bench_sampling(device="cpu", sizes=["demo"], steps=[4], batch=2, ref_steps=2)
    (row,) = result["rows"]
    assert row["steps"] == 4 and row["batch"] == 2 and 0 < row["passes_per_image"] <= 4
    assert row["tokens_images_per_s"] > 0 and row["ratio"] > 0 and row["reference"]["fp32"]["steps_timed"] == 2
    assert "demo" in format_table(result)


def test_sample_cli_overrides_and_shortcuts_reach_the_sampler(tmp_path, capsys):
    import json

    make_checkpoints(tmp_path / "run")
    code, out, err = _uvq_in_process(["sample", "sample.sampler=maskgit_cosine.v1", "sample.options.choice_temp=2",
                                      "--top-k", "3", "-n", "3", "--codes", "--run-dir", str(tmp_path / "run"),
                                      "--out", str(tmp_path / "s"), "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["sampler"] == "maskgit_cosine.v1" and summary["sampler_options"] == {"choice_temp": 2, "top_k": 3}
    assert summary["n"] == 3 and summary["steps"] == 8  # the rest from the prior's own sample section
    assert "sample: sampler=maskgit_cosine.v1" in err
    from uvq.checkpoint import load_model
    from uvq.prior.latents import read_manifest, read_shard

    net, _ = load_model(tmp_path / "run" / "prior", "prior")
    tokens = sample_tokens(net, 3, steps=8, temp=0.9, seed=0, batch_size=4, sampler="maskgit_cosine.v1",
                           options={"choice_temp": 2, "top_k": 3})
    codes_dir = tmp_path / "s" / "codes"
    codes = dict(read_shard(codes_dir / read_manifest(codes_dir)["shards"][0]["name"]))
    assert torch.equal(torch.from_numpy(codes["sample-000002"].astype("int64")).flatten(), tokens[2])
