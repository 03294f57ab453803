"""`uvq bench`: speed measurements that print figures and ratios (never timed unit tests).

`uvq bench sample` measures sampling throughput at the paper's size (76.8M prior, 256 tokens,
1024 codes, the paper's 256x256 VQGAN decoder; random weights) and at the demo size, and in the
same run a literal reference: the authors' loop (fp32, plain attention with separate query, key
and value projections, torch.distributions.Categorical over every position, the network on
every sample at every step). `benchmarks/bench_sampling.py` runs the same function.

`uvq bench all` runs every figure the tool promises in one process (sampling at 256, 100 and 50
steps with a batch sweep and eager / compiled / CUDA-graph variants on CUDA, decoding, prior and
VQGAN training, the 512x512 canvas, PRDC at 50k, Inception extraction, and on the CPU the
precision and compile comparison of one pass) and writes one JSON and one Markdown table with the
ratios to the authors' code (docs/performance.md). `benchmarks/gpu.sh` runs it on a GPU machine.
"""

from __future__ import annotations

from pathlib import Path

import typer

from uvq.cli.common import DebugOpt, DeviceOpt, JsonOpt, OverwriteOpt, apply_local, emit, reporter


def register(app: typer.Typer) -> None:
    bench_app = typer.Typer(help="Speed benchmarks: figures and ratios against literal references.",
                            no_args_is_help=True)
    app.add_typer(bench_app, name="bench")

    @bench_app.command("sample")
    def bench_sample_cmd(
        quick: bool = typer.Option(False, "--quick", help="A short CPU smoke run (fewer steps and sizes)."),
        size: list[str] = typer.Option(None, "--size", help="paper and/or demo (default: both)."),
        steps: list[int] = typer.Option(None, "--steps", help="Step budgets (default: 256, 100, 50 at the paper's size)."),
        batch: int = typer.Option(None, "--batch", help="Batch size (default: 256 on CUDA; 1 paper / 64 demo on CPU)."),
        ref_steps: int = typer.Option(None, "--ref-steps", help="Steps of the reference to time (scaled to the chain)."),
        precision: str = typer.Option("bf16", "--precision", help="uvq's precision on CUDA (the CPU runs fp32)."),
        compile_: bool = typer.Option(False, "--compile", help="torch.compile uvq's prior."),
        device: str = DeviceOpt,
        json_flag: bool = JsonOpt,
        debug: bool = DebugOpt,
    ) -> None:
        """Sampling throughput (tokens, tokens + decoding), passes per image, memory, ratio to the authors' loop."""
        # Imported here, not at the top, so that `uvq --help` imports no torch.
        from uvq.bench import bench_sampling, format_table
        from uvq.runtime import UserError

        apply_local(json_flag, debug)
        bad = [s for s in size or [] if s not in ("paper", "demo")]
        if bad:
            raise UserError(f"--size must be paper or demo, not {bad[0]!r}")
        rep = reporter()
        result = bench_sampling(device=device, quick=quick, sizes=list(size or []) or None, steps=list(steps or []) or None,
                                batch=batch, ref_steps=ref_steps, precision=precision, compile=compile_, progress=rep)
        emit(result, human=format_table(result))

    @bench_app.command("all")
    def bench_all_cmd(
        quick: bool = typer.Option(False, "--quick", help="A short run (small sizes, few steps): CI on the CPU."),
        group: list[str] = typer.Option(None, "--group", help="Run only these groups (default: all)."),
        out: Path = typer.Option(None, "--out", "-o", help="Write bench.json and bench.md here."),
        budget: float = typer.Option(None, "--budget", help="Seconds after which the groups left are skipped "
                                     "(default 420 on CUDA, none on the CPU)."),
        device: str = DeviceOpt,
        overwrite: bool = OverwriteOpt,
        json_flag: bool = JsonOpt,
        debug: bool = DebugOpt,
    ) -> None:
        """Every speed figure in one report: JSON and a Markdown table with ratios to the authors' code."""
        from uvq.bench import GROUPS, bench_all, format_markdown
        from uvq.files import atomic_write_json, atomic_write_text, claim_out_dir
        from uvq.runtime import UserError, resolve_device

        apply_local(json_flag, debug)
        bad = [g for g in group or [] if g not in GROUPS]
        if bad:
            raise UserError(f"--group {bad[0]!r} is not a benchmark group; valid: {', '.join(GROUPS)}")
        if budget is not None and not budget > 0:
            raise UserError(f"--budget must be a positive number of seconds (got {budget})")
        resolve_device(device)
        if out is not None:
            claim_out_dir(out, command="bench all", overwrite=overwrite, entries=("bench.json", "bench.md"),
                          lock=False)
        rep = reporter()
        try:
            result = bench_all(device=device, quick=quick, only=list(group or []) or None, budget_s=budget,
                               progress=rep)
        finally:
            rep.close()
        table = format_markdown(result)
        if out is not None:
            atomic_write_json(Path(out) / "bench.json", result)
            atomic_write_text(Path(out) / "bench.md", table + "\n")
        emit(result, human=table)
