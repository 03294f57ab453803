"""docs/api.md's examples, run as written on a tiny prior and VQGAN pair; `import uvq` stays cheap."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import torch
from conftest import REPO
from test_canvas import make_pair


def test_the_api_page_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "api.md").read_text(), re.S)
    assert len(blocks) == 2 and all(3 <= len([line for line in b.splitlines() if line.strip()]) <= 5 for b in blocks)
    make_pair(tmp_path / "runs" / "demo")  # runs/demo/prior and runs/demo/vqgan, as `uvq pipeline` lays them out
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), ns)
    pair, images, wide, edits = ns["pair"], ns["images"], ns["wide"], ns["edits"]
    assert pair.vqgan_weights == "model" and pair.prior_meta["kind"] == "prior"
    assert images.shape == (4, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    assert wide.shape == (1, 3, 32, 64)
    assert ns["inpainted"].shape == (2, 3, 16, 16)
    known, mask = ns["known"], ns["mask"]
    assert mask.sum() == 32 and torch.equal(edits.tokens[:, ~mask], known[~mask].expand(2, -1))  # the left half is kept
    assert (edits.tokens[:, mask] != pair.prior.mask_id).all()  # and the right half is drawn


def test_import_uvq_is_cheap_and_the_names_resolve():
    code = ("import sys, json, uvq\n"
            "cheap = 'torch' not in sys.modules\n"
            "names = sorted(n for n in uvq.__all__ if n != '__version__' and getattr(uvq, n) is None)\n"
            "print(json.dumps({'cheap': cheap, 'missing': names}))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert json.loads(proc.stdout) == {"cheap": True, "missing": []}, proc.stderr
