"""`macmesh launch MODEL`: load a model on the cluster; the daemon asked coordinates it.

Progress lines stream as the stages load, then the instance is printed (``--json``: the
instance as one JSON object on stdout, progress on stderr). Ctrl-C cancels the launch and
frees whatever was loaded. Exit codes: 0 launched; 1 no daemon, or the model does not fit;
2 bad input (unknown model, weights missing, invalid option).

``unload`` (``macmesh unload MODEL|--instance ID``) lives here too, ready to be registered.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer


def model_argument(model: str) -> str:
    """MODEL as the daemon should see it: a directory that exists here becomes absolute (the
    daemon's working directory is not ours); anything else is a name, sent as given."""
    path = Path(model).expanduser()
    if (path / "config.json").is_file() and not path.is_absolute():
        return str(path.resolve())
    return str(path) if model.startswith("~") else model


def exit_code_for(error: Any) -> int:
    """2 for what the caller got wrong; 1 for the cluster's state (unreachable, full, busy)."""
    import grpc

    code = getattr(error, "code", None)
    if code in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
    ):
        return 2
    return 1


def daemon_address(node: str | None) -> str:
    from node.commands.status import _local_daemon_address
    from node.discovery.static import parse_peer

    address = node or _local_daemon_address()
    try:
        parse_peer(address)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--node") from None
    return address


def describe_error(error: Any, address: str) -> str:
    import grpc

    if (
        getattr(error, "code", None) is grpc.StatusCode.UNAVAILABLE
        and "failed to connect" in str(error).lower()
    ):
        # gRPC's text ("failed to connect to all addresses; last error: UNKNOWN: ipv4:...:
        # Failed to connect to remote host: Connection refused") ends in the OS's reason.
        reason = str(error).rstrip().rpartition(": ")[2] or "nothing answers there"
        reason = reason[:1].lower() + reason[1:]
        return f"no macmesh daemon reachable at {address} ({reason}); is `macmesh run` running?"
    return str(error)


def launch(
    model: Annotated[
        str,
        typer.Argument(
            metavar="MODEL", help="card id, Hugging Face repo id[@revision] or checkpoint directory"
        ),
    ],
    min_nodes: Annotated[
        int, typer.Option("--min-nodes", help="spread over at least this many nodes")
    ] = 1,
    context: Annotated[
        int | None, typer.Option("--context", help="tokens of KV cache to budget")
    ] = None,
    node: Annotated[
        str | None,
        typer.Option(help="HOST:PORT of the daemon that coordinates (default: this machine's)"),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="print the instance as JSON (progress to stderr)")
    ] = False,
    timeout: Annotated[float, typer.Option(help="seconds the launch may take")] = 1800.0,
    pull: Annotated[
        bool,
        typer.Option(
            "--pull",
            help="download what is missing from the Hugging Face hub: each node only the "
            "shards holding its layers",
        ),
    ] = False,
    mtp_across_pipeline: Annotated[
        bool,
        typer.Option(
            "--mtp-across-pipeline",
            help="when MODEL spans several nodes, decode with native MTP across the pipeline "
            "(engine pipeline_mtp: the last stage drafts with the MTP head); "
            "MACMESH_PIPELINE_MTP=1 on the coordinator does the same for every launch",
        ),
    ] = False,
) -> None:
    """Load MODEL on the cluster: plan, load every stage, pick the engine."""
    from node.client import Launched, MacmeshClient, MacmeshError

    if min_nodes < 1:
        raise typer.BadParameter(f"must be >= 1, got {min_nodes}", param_hint="--min-nodes")
    if context is not None and context < 1:
        raise typer.BadParameter(f"must be >= 1, got {context}", param_hint="--context")
    address = daemon_address(node)
    instance = None
    bars = _DownloadBars(err=json_output)
    with MacmeshClient(address, timeout=timeout) as client, bars:
        stream = client.launch(
            model_argument(model),
            min_nodes=min_nodes,
            context_length=context or 0,
            pull=pull,
            mtp_across_pipeline=mtp_across_pipeline,
        )
        try:
            for event in stream:
                if isinstance(event, Launched):
                    instance = event.instance
                elif not bars.update(event.message):
                    bars.echo(f"  {event.message}")
        except MacmeshError as exc:
            typer.echo(f"macmesh launch: {describe_error(exc, address)}", err=True)
            raise typer.Exit(code=exit_code_for(exc)) from None
        except KeyboardInterrupt:
            stream.close()
            typer.echo("macmesh launch: cancelled; nothing stays loaded", err=True)
            raise typer.Exit(code=130) from None
    if instance is None:
        typer.echo("macmesh launch: the daemon ended the launch without an instance", err=True)
        raise typer.Exit(code=1)
    if json_output:
        typer.echo(json.dumps(instance.model_dump(), indent=2))
        return
    stages = ", ".join(
        f"{s.node_id[:8]} layers {s.start_layer}-{s.end_layer - 1}" for s in instance.stages
    )
    typer.echo(f"launched {instance.model} as {instance.instance_id} on {stages}")
    typer.echo(f"  engine {instance.engine_reason}")


class _DownloadBars:
    """One progress bar per node for the download lines of a ``launch --pull``; every other
    line is printed as it comes."""

    def __init__(self, err: bool) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn

        self.console = Console(stderr=err, soft_wrap=True)
        self.progress = Progress(
            TextColumn("  {task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}% {task.fields[detail]}"),
            console=self.console,
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> _DownloadBars:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, line: str) -> bool:
        from node.hub.download import PROGRESS_LINE

        match = PROGRESS_LINE.match(line)
        if match is None:
            return False
        key = f"{match['repo']} on {match['node']}"
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(match["node"], total=100, detail="")
        self.progress.update(self.tasks[key], completed=int(match["pct"]), detail=match["detail"])
        return True

    def echo(self, line: str) -> None:
        self.progress.console.print(line, highlight=False, markup=False)


def unload(
    model: Annotated[
        str | None, typer.Argument(metavar="MODEL", help="unload every instance of MODEL")
    ] = None,
    instance_id: Annotated[
        str | None, typer.Option("--instance", help="unload this instance only")
    ] = None,
    node: Annotated[
        str | None, typer.Option(help="HOST:PORT of any daemon (default: this machine's)")
    ] = None,
) -> None:
    """Unload instances from the cluster and free their memory on every stage."""
    from node.client import MacmeshClient, MacmeshError

    if not model and not instance_id:
        raise typer.BadParameter("give MODEL or --instance ID")
    address = daemon_address(node)
    with MacmeshClient(address, timeout=120) as client:
        try:
            count = client.unload(
                model_argument(model) if model else "", instance_id=instance_id or ""
            )
        except MacmeshError as exc:
            typer.echo(f"macmesh unload: {describe_error(exc, address)}", err=True)
            raise typer.Exit(code=exit_code_for(exc)) from None
    typer.echo(f"unloaded {count} instance{'s' if count != 1 else ''}")
