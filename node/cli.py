"""The ``macmesh`` command line.

Each command lives in ``node/commands/<name>.py`` as a plain typer-compatible function; this
module only assembles them, so teams can work on commands without touching each other's code.
"""

from __future__ import annotations

import sys

import typer

from node import __version__
from node.commands import demo, gateway, generate, launch, models, place, pull, run, status

app = typer.Typer(
    name="macmesh",
    help="Run large language models across a handful of Apple-silicon Macs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# Commands that never talk to a daemon (run reads its secret from its own settings and says
# what is wrong with it itself).
_NO_CLUSTER_SECRET = {"run", "version"}


@app.callback()
def _global_options(
    ctx: typer.Context,
    log_level: str = typer.Option(
        "info", "--log-level", envvar="MACMESH_LOG_LEVEL", help="debug, info, warning or error"
    ),
    log_format: str = typer.Option(
        "console", "--log-format", envvar="MACMESH_LOG_FORMAT", help="console or json"
    ),
) -> None:
    """Run large language models across a handful of Apple-silicon Macs."""
    from node.logging import configure_logging

    if log_format not in ("console", "json"):
        raise typer.BadParameter(
            f"{log_format!r} is not console or json", param_hint="--log-format"
        )
    try:
        configure_logging(log_level, log_format)  # type: ignore[arg-type]
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--log-level") from None
    if ctx.invoked_subcommand not in _NO_CLUSTER_SECRET:
        _check_cluster_secret(str(ctx.invoked_subcommand))


def _check_cluster_secret(command: str) -> None:
    """Fail closed: a secret that is set but unusable stops the command (exit 2) with the
    daemon's message, instead of it carrying on unsigned and being refused later."""
    from node import security

    try:
        security.current()
    except security.SecurityError as exc:
        typer.echo(f"macmesh {command}: {exc}", err=True)
        raise typer.Exit(code=2) from None


@app.command("version")
def version() -> None:
    """Print the macmesh version and the versions of the parts it runs on."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as pkg_version

    def v(name: str) -> str:
        try:
            return pkg_version(name)
        except PackageNotFoundError:
            return "not installed"

    typer.echo(f"macmesh {__version__}")
    typer.echo(
        f"  python {sys.version.split()[0]}, mlx {v('mlx')}, mlx-lm {v('mlx-lm')}, grpcio {v('grpcio')}"
    )


app.command("run")(run.run)
app.command("status")(status.status)
app.command("models")(models.models)
app.command("place")(place.place)
app.command("pull")(pull.pull)
app.command("launch")(launch.launch)
app.command("unload")(launch.unload)
app.command("generate")(generate.generate)
app.command("gateway")(gateway.gateway)
app.command("demo")(demo.demo)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
