"""`uvq config show` and `uvq ls`."""

from __future__ import annotations

from pathlib import Path

import typer

from uvq.cli.common import DebugOpt, JsonOpt, apply_local, emit


def register(app: typer.Typer) -> None:
    config_app = typer.Typer(help="Inspect recipes.", no_args_is_help=True)
    app.add_typer(config_app, name="config")

    @config_app.command("show")
    def show(
        recipe: str = typer.Argument(..., help="Recipe YAML path or packaged recipe name."),
        overrides: list[str] = typer.Argument(None, help="section.key=value overrides."),
        json_flag: bool = JsonOpt,
        debug: bool = DebugOpt,
    ) -> None:
        """Print the resolved, validated config."""
        from uvq.config import load_config, to_yaml

        apply_local(json_flag, debug)
        cfg = load_config(recipe, overrides or [])
        emit(cfg.to_dict(), human=to_yaml(cfg).rstrip())

    @app.command("ls")
    def ls(
        category: str = typer.Argument(None, help="Only this registry category."),
        json_flag: bool = JsonOpt,
        debug: bool = DebugOpt,
    ) -> None:
        """List registered components and where each is defined."""
        from uvq.registry import CATEGORIES, registry

        apply_local(json_flag, debug)
        registry.load()
        cats = [category] if category else list(CATEGORIES)
        rows = []
        for cat in cats:
            for name in registry.names(cat):
                e = registry.entry(cat, name)
                rows.append({"category": cat, "name": name, "where": e.where, "plugin": e.plugin})
        if not rows:
            emit({"components": []}, human="no components registered")
            return
        width = max(len(r["category"]) for r in rows)
        nwidth = max(len(r["name"]) for r in rows)
        human = "\n".join(f"{r['category']:<{width}}  {r['name']:<{nwidth}}  {_short(r['where'])}" for r in rows)
        emit({"components": rows}, human=human)


def _short(where: str) -> str:
    # show paths relative to the current directory when possible
    try:
        head, loc = where.rsplit(" (", 1)
        file, line = loc.rstrip(")").rsplit(":", 1)
        rel = Path(file).resolve().relative_to(Path.cwd())
        return f"{head} ({rel}:{line})"
    except (ValueError, OSError):
        return where
