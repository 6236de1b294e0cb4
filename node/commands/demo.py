"""`macmesh demo`: a local 3-node cluster on the bundled model, end to end, in seconds.

1. starts three real daemons on 127.0.0.1 (mDNS off, static peers, a temporary directory);
2. launches the bundled model twice: pipelined over every node (``min_nodes`` = nodes), and on
   a single node, where the engine selector picks native MTP;
3. shows ``macmesh status``;
4. sends one request to each instance through the node that coordinates neither (so both are
   relayed to their coordinators) and prints the text and the final stats;
5. unloads both instances and stops every daemon (SIGTERM, clean shutdown), leaving nothing.

Without the bundled model it builds a tiny checkpoint with ``node.checkpoints`` (cached).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer

DEFAULT_PROMPT = "The os module provides"


def demo_model(console: Any) -> Path:
    """The bundled model, or a tiny checkpoint built into the checkpoint cache."""
    from node.models import bundled_model_path

    try:
        return bundled_model_path()
    except FileNotFoundError:
        from node.checkpoints import PRESETS, cache_root, ensure_checkpoint

        console.print(
            f"[yellow]the bundled model is missing; building a tiny checkpoint into "
            f"{cache_root()} (once, cached)[/yellow]"
        )
        return ensure_checkpoint(PRESETS["dense-high"])


def demo(
    nodes: Annotated[int, typer.Option(help="nodes in the local cluster (2 or more)")] = 3,
    prompt: Annotated[str, typer.Option(help="the prompt of both requests")] = DEFAULT_PROMPT,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="tokens per request")] = 32,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.7,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 7,
) -> None:
    """Start a local 3-node cluster, run a pipelined and a native-MTP request, shut down."""
    from rich.console import Console

    from node.cluster.local import LocalCluster, LocalClusterError
    from node.placement.resolve import BUNDLED_MODELS_DIR

    if nodes < 2:
        raise typer.BadParameter(
            f"needs at least 2 nodes to pipeline, got {nodes}", param_hint="--nodes"
        )
    if max_tokens < 1:
        raise typer.BadParameter(f"must be >= 1, got {max_tokens}", param_hint="--max-tokens")
    console = Console(highlight=False)
    began = time.perf_counter()
    model = demo_model(console)
    root = Path(tempfile.mkdtemp(prefix="macmesh-demo-"))
    cluster = LocalCluster(root, nodes)
    failed = False
    try:
        console.rule(f"macmesh demo: {nodes} nodes on 127.0.0.1, model {model.name}")
        try:
            started = cluster.start()
        except LocalClusterError as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(code=1) from None
        for node in started:
            console.print(f"started {node.name} (pid {node.proc.pid}) at {node.address}")
        # The bundled model goes by its name: every node finds it in its own install.
        name = model.name if model.parent == BUNDLED_MODELS_DIR else str(model)
        _run(console, started, name, prompt, max_tokens, temperature, seed)
    except typer.Exit:
        failed = True
        raise
    except KeyboardInterrupt:
        failed = True
        console.print("[yellow]interrupted; shutting the cluster down[/yellow]")
        raise typer.Exit(code=130) from None
    except Exception as exc:
        failed = True
        console.print(f"[red]demo failed: {exc}[/red]")
        for node in cluster.nodes:
            console.print(f"[dim]--- {node.name} log ---\n{node.log_tail()}[/dim]")
        raise typer.Exit(code=1) from None
    finally:
        codes = cluster.stop()
        clean = all(code == 0 for code in codes.values())
        shutil.rmtree(root, ignore_errors=True)
        summary = ", ".join(f"{name} exit {code}" for name, code in codes.items())
        style = "green" if clean else "red"
        console.print(f"[{style}]stopped {len(codes)} nodes ({summary})[/{style}]")
        if not failed:
            console.print(f"demo finished in {time.perf_counter() - began:.1f} s")
        if not clean and not failed:
            raise typer.Exit(code=1)


def _run(
    console: Any,
    nodes: list[Any],
    model: str,
    prompt: str,
    max_tokens: int,
    temperature: float,
    seed: int,
) -> None:
    from rich.text import Text

    from node.client import Launched, MacmeshClient
    from node.cluster.peers import status_instances
    from node.commands.status import render_all
    from node.discovery.client import cluster_view

    first, second, asker = nodes[0], nodes[1], nodes[-1]

    def launch(node: Any, min_nodes: int, what: str) -> Any:
        console.rule(f"launch {what} (coordinated by {node.name})")
        with MacmeshClient(node.address, timeout=300) as client:
            for event in client.launch(model, min_nodes=min_nodes):
                if isinstance(event, Launched):
                    instance = event.instance
                    console.print(f"[bold]{instance.instance_id}[/bold]: {instance.engine_reason}")
                    return instance
                console.print(f"  {event.message}")
        raise RuntimeError(f"the launch on {node.name} ended without an instance")

    pipelined = launch(first, len(nodes), f"pipelined over {len(nodes)} nodes")
    single = launch(second, 1, "on a single node")

    def show_status() -> None:
        console.rule(f"macmesh status (asked {asker.name})")
        view = cluster_view(asker.address)
        console.print(render_all(view, status_instances(asker.address), console.width))

    show_status()
    with MacmeshClient(asker.address, timeout=120) as client:
        for instance, engine in ((pipelined, "pipeline"), (single, "native_mtp")):
            console.rule(f"generate with engine={engine} (sent to {asker.name})")
            text = []
            final = None
            for event in client.generate(
                instance.instance_id,
                prompt,
                raw=True,
                max_tokens=max_tokens,
                sampling={"temperature": temperature, "seed": seed},
                engine=engine,
            ):
                if event.kind == "delta":
                    text.append(event.text)
                else:
                    final = event
            assert final is not None
            console.print(Text(prompt, style="bold") + Text("".join(text)))
            _print_stats(console, final, {n.node_id: n.name for n in nodes})
    show_status()
    console.rule("unload")
    with MacmeshClient(first.address, timeout=60) as client:
        count = client.unload(model)
    console.print(f"unloaded {count} instances; every stage freed its memory")


def _print_stats(console: Any, stats: Any, names: dict[str, str]) -> None:
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="dim")
    table.add_column()
    stages = " → ".join(
        f"{names.get(s.node_id, s.node_id[:8])} [{s.start_layer}, {s.end_layer})"
        for s in stats.stages
    )
    rows = [
        ("engine", stats.engine_reason or stats.engine),
        ("stages", stages),
        ("tokens", f"{stats.prompt_tokens} prompt, {stats.generation_tokens} generated"),
        ("speed", f"prompt {stats.prompt_tps:.0f} tok/s, decode {stats.generation_tps:.0f} tok/s"),
    ]
    if stats.drafter_kind:
        rows.append(
            (
                "drafts",
                f"{stats.drafter_kind} K={stats.num_draft_tokens:.2g} (mean): accepted "
                f"{stats.accepted_draft_tokens}/{stats.proposed_draft_tokens} "
                f"({stats.acceptance_rate:.0%})",
            )
        )
    rows.append(("finish", stats.finish_reason))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
