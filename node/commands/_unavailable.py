"""Honest placeholders for commands whose engine has not landed yet."""

from __future__ import annotations

import typer


def not_yet(command: str, issue: str) -> None:
    typer.echo(
        f"macmesh {command}: not available yet in this build ({issue} is still open).", err=True
    )
    raise typer.Exit(code=2)
