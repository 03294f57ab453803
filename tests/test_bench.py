"""`uvq bench all` (one process, one report), benchmarks/gpu.sh, and the CPU precision checks behind the defaults.

Speeds are never asserted (they are figures, not pass/fail); what is checked is that every group
reports, that the ratios are the stated ones, and that the fast paths give the samples (or the
logits, within the stated tolerance) of the plain one.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_uvq

from uvq.bench import AUTHORS_H200, GROUPS, _row
from uvq.prior.model import preset
from uvq.registry import registry
from uvq.sampling.chain import sample_tokens

# bf16 autocast against fp32 on the prior's logits (docs/performance.md, "CPU precision"): the
# largest difference of log-softmax over every position, and the total variation of the two
# distributions per position.
BF16_LOGPROB_ATOL = 0.05
BF16_TV_MAX = 0.01


def _prior(name: str) -> torch.nn.Module:
    registry.load()
    pc = preset(name)
    torch.manual_seed(0)
    return registry.get("priors", pc.name)(pc).eval()


def test_bench_all_quick_through_gpu_script_writes_json_and_table(tmp_path):
    """benchmarks/gpu.sh --quick on the CPU: the same `uvq bench all` a GPU machine runs, every group once."""
    out = tmp_path / "bench"
    env = {**os.environ, "PYTHON": sys.executable, "OUT_DIR": str(out), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--quick", "--device", "cpu"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    table = (out / "bench.md").read_text()
    assert result["quick"] is True and result["device"] == "cpu"
    rows = result["rows"]
    groups = {r["group"] for r in rows}
    assert groups == {"sampling", "decoding", "prior training", "VQGAN training", "canvas", "PRDC", "Inception",
                      "CPU pass"}
    assert sorted(int(r["what"].split()[0]) for r in rows if r["group"] == "sampling") == [16, 32, 64]
    for r in rows:
        if r["value"] is None:  # a skipped row says why (the Inception weights' place, the compile cost)
            assert r["note"].startswith("skipped"), r
        else:
            assert math.isfinite(r["value"]) and r["value"] > 0, r
    inception = next(r for r in rows if r["group"] == "Inception")
    if inception["value"] is None:
        assert "weights-inception-2015-12-05-6726825d.pth" in inception["note"]
    # the authors' loop ran in the same process for sampling, its network for training and the CPU pass
    assert all(r["vs_here"] > 0 for r in rows if r["group"] in ("sampling", "prior training", "canvas")
               and r["value"] is not None)
    # one table line per row, under the header
    lines = table.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("| group |")))
    body = [line for line in lines[header + 2:] if line.startswith("| ")]
    assert len(body) == len(rows)
    assert all(line.replace("\\|", "").count("|") == 10 for line in body)  # 9 cells in every line
    assert "vs authors' H200" in lines[header] and "uvq bench all --quick" in lines[0]
    assert "wrote" in done.stdout


def test_bench_all_refuses_a_bad_group_before_writing(tmp_path):
    out = tmp_path / "never"
    done = run_uvq("bench", "all", "--quick", "--group", "nope", "--out", str(out), "--device", "cpu")
    assert done.returncode == 2 and "--group 'nope' is not a benchmark group" in done.stderr
    assert not out.exists()
    done = run_uvq("bench", "all", "--quick", "--budget", "0", "--out", str(out), "--device", "cpu")
    assert done.returncode == 2 and "--budget" in done.stderr and not out.exists()
    assert set(GROUPS) >= {"sampling", "decoding", "prior_train", "vqgan_train", "canvas", "prdc", "inception"}


def test_ratios_to_the_authors_figures():
    """Throughput: ours / theirs; time per step or image: theirs / ours (so > 1 is faster either way)."""
    assert _row("sampling", "", "", 6.8, "img/s", anchor="sample_256_fp32")["vs_anchor"] == pytest.approx(2.0)
    assert _row("canvas", "", "", 2.1, "s/step", anchor="canvas_step")["vs_anchor"] == pytest.approx(2.0)
    assert _row("canvas", "", "", 10.76, "s/img", anchor="canvas_image")["vs_anchor"] == pytest.approx(100.0)
    assert _row("x", "", "", None, "img/s", anchor="decode")["vs_anchor"] is None
    # the figures copied from the authors' H200 run, as docs/performance.md gives them
    perf = (REPO / "docs" / "performance.md").read_text()
    for value, _unit, _what in AUTHORS_H200.values():
        assert f"{value:g}" in perf.replace(",", "").replace("258k", "258000")


def test_bf16_autocast_on_the_cpu_stays_within_tolerance_of_fp32():
    """The prior's logits under CPU bf16 autocast against fp32 (the CPU default stays fp32: docs/performance.md)."""
    net = _prior("demo")
    # weights larger than the N(0, 0.02) start, so that the logits are far from uniform (as a trained prior's)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 2:
                p.mul_(4.0)
    x = torch.randint(0, net.codebook_size + 1, (8, net.n_tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = net(x).float().log_softmax(-1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x)
        assert low.dtype == torch.bfloat16  # autocast did engage
        low = low.float().log_softmax(-1)
    assert ref.exp().amax(-1).mean() > 2.0 / net.codebook_size  # not near uniform
    diff = (low - ref).abs().max().item()
    tv = 0.5 * (low.exp() - ref.exp()).abs().sum(-1).max().item()
    assert 0 < diff <= BF16_LOGPROB_ATOL and tv <= BF16_TV_MAX, (diff, tv)


@pytest.mark.slow  # inductor compiles C++ for the prior: a minute or more on 2 cores
def test_compiled_prior_samples_equal_eager_on_the_cpu():
    net = _prior("debug")
    kwargs = dict(steps=net.n_tokens, temp=1.0, seed=3, batch_size=4, device="cpu", precision="fp32")
    eager = sample_tokens(net, 4, **kwargs)
    compiled = sample_tokens(net, 4, compile=True, **kwargs)
    assert torch.equal(eager, compiled)


@pytest.mark.gpu
def test_cuda_graph_samples_equal_compiled_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    net = _prior("demo").cuda()
    kwargs = dict(steps=32, temp=1.0, seed=3, batch_size=32, device="cuda", precision="fp32")
    compiled = sample_tokens(net, 32, compile=True, **kwargs)
    graphs = sample_tokens(net, 32, cuda_graphs=True, **kwargs)
    eager = sample_tokens(net, 32, **kwargs)
    assert torch.equal(graphs, compiled)
    assert (graphs == eager).float().mean() > 0.99  # fp32 kernels of compile and eager differ in the last bit


def test_gpu_script_is_the_one_nox_and_the_docs_name():
    assert 'session.run("uvq", "bench", "all", "--quick"' in (REPO / "noxfile.py").read_text()
    assert "benchmarks/gpu.sh" in (REPO / "docs" / "performance.md").read_text()
    assert Path(REPO / "benchmarks" / "gpu.sh").stat().st_mode & 0o111
