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


@app.callback()
def _global_options(
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
