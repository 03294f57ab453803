"""Thin Typer commands: each loads its inputs, calls one library function and renders the result."""
