"""nox sessions: `nox -s tests`, `nox -s lint`, `nox -s faults`, `nox -s demo`, `nox -s bench`."""

import nox

nox.options.sessions = ["lint", "tests"]


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (the same command as the README's)."""
    session.install("-e", ".[dev]")
    session.run("python", "-m", "pytest", "-n", "2", *session.posargs)


@nox.session
def faults(session: nox.Session) -> None:
    """The whole fault-injection suite (tests/faults; docs/reliability.md). UVQ_FAULTS_SEED picks the moments."""
    session.install("-e", ".[dev]")
    session.run("python", "-m", "pytest", "tests/faults", "-m", "not slow and not gpu", "-p", "no:randomly",
                *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.5")
    session.run("ruff", "check", "uvq", "tests", "benchmarks", "noxfile.py")


@nox.session
def demo(session: nox.Session) -> None:
    """The README's main job: the whole method on the embedded demo data."""
    session.install("-e", ".")
    session.run("uvq", "pipeline", "recipes/demo.yaml", "--out", "runs/demo", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """`uvq bench all --quick` on the CPU: every figure once, small (figures and ratios; never pass/fail)."""
    session.install("-e", ".")
    session.run("uvq", "bench", "all", "--quick", "--device", "cpu")
