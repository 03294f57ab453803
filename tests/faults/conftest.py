"""The fault suite's shared artifacts (one tiny trained model pair) and its summary table.

Each case carries `@pytest.mark.fault("<category>")`; at the end of the session a table gives,
per category, the cases tried, held (passed) and failed. Cases marked `faults_full` run only in
`nox -s faults` (or `pytest tests/faults -m "not slow and not gpu"`); the rest are the short
seeded subset of the default suite. `UVQ_FAULTS_SEED` changes every random moment and choice.
"""

from __future__ import annotations

import collections
import shutil

import pytest

from .harness import REPO, TINY, uvq_in_process

_COUNTS: collections.Counter = collections.Counter()  # (category, verdict) -> cases


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    marker = item.get_closest_marker("fault")
    if marker is not None:
        report.user_properties.append(("fault_category", marker.args[0]))


def pytest_runtest_logreport(report):
    category = dict(report.user_properties).get("fault_category")
    if category is None:
        return
    # One verdict per case: a failure in setup or call counts, else the call's pass; skips are skips.
    if report.when == "call" or (report.when == "setup" and not report.passed):
        verdict = "held" if report.passed else ("skipped" if report.skipped else "failed")
        _COUNTS.update([(category, verdict)])





def pytest_terminal_summary(terminalreporter):
    if not _COUNTS:
        return
    cats = sorted({c for c, _ in _COUNTS})
    tr = terminalreporter
    tr.section("fault-injection suite")
    tr.write_line(f"{'category':<14}{'tried':>7}{'held':>7}{'failed':>8}{'skipped':>9}")
    total = collections.Counter()
    for c in cats:
        held, failed, skipped = _COUNTS[(c, "held")], _COUNTS[(c, "failed")], _COUNTS[(c, "skipped")]
        tried = held + failed
        total.update(tried=tried, held=held, failed=failed, skipped=skipped)
        tr.write_line(f"{c:<14}{tried:>7}{held:>7}{failed:>8}{skipped:>9}")
    tr.write_line(f"{'all':<14}{total['tried']:>7}{total['held']:>7}{total['failed']:>8}{total['skipped']:>9}")


# ---------------------------------------------------------------------------------------------
# One tiny model pair, trained once per session through the real CLI entry point
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """{"vqgan": run dir, "latents": dir, "prior": run dir}: the tiny chain, each stage finished."""
    root = tmp_path_factory.mktemp("trained")
    steps = ["train.steps=8", "prior_train.steps=8", "prior_train.val_every=4"]
    for args in (["fit-vqgan", "demo", *TINY, *steps, "--out", str(root / "vqgan"), "--device", "cpu"],
                 ["encode", "--vqgan", str(root / "vqgan"), "--out", str(root / "latents"), "--recipe", "demo",
                  *TINY, "--device", "cpu"],
                 ["fit-prior", "demo", *TINY, *steps, "--latents", str(root / "latents"), "--out", str(root / "prior"),
                  "--device", "cpu"]):
        code, err = uvq_in_process(*args, cwd=REPO)
        assert code == 0, f"building the fault suite's models failed: uvq {' '.join(args)}\n{err}"
    return {"vqgan": root / "vqgan", "latents": root / "latents", "prior": root / "prior"}


@pytest.fixture
def copy_of_trained(trained, tmp_path):
    """A private copy of one trained artifact, safe to damage."""
    def copy(name: str):
        dst = tmp_path / name
        shutil.copytree(trained[name], dst, symlinks=True)
        return dst
    return copy
