"""`macmesh generate MODEL PROMPT`: generate text in-process (``--local``) or on a cluster.

Without ``--json`` the text streams to stdout as it is produced and a one-line summary of the
stats goes to stderr.  With ``--json`` stdout gets one object:
``{"text", "token_ids", "stats": {...}}``.  Exit codes: 0 done, 1 runtime failure (no daemon),
2 bad input (unknown model, invalid option value, engine that cannot run here).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

# Request field → the flag that sets it, so errors name what the user typed.
_FLAGS = {
    "temperature": "--temperature",
    "top_p": "--top-p",
    "top_k": "--top-k",
    "min_p": "--min-p",
    "repetition_penalty": "--repetition-penalty",
    "seed": "--seed",
    "max_tokens": "--max-tokens",
    "mtp_k": "--mtp-k",
    "engine": "--engine",
    "prompt_ids": "--prompt-ids",
    "prompt": "PROMPT",
}


def generate_remote(node: str, options: Any) -> Iterator[Any]:
    """Send ``options`` (``GenerateOptions``) to the daemon at ``node`` and stream its events:
    the client's ``Delta`` events, then one ``FinalStats``.

    Any node of the cluster will do: it relays to the instance's coordinator
    (``stats.stages`` lists the stages the request went through). Ctrl-C cancels the request
    on the cluster."""
    from node.client import MacmeshClient, MacmeshError
    from node.commands.launch import describe_error, exit_code_for
    from node.discovery.static import parse_peer

    if node is None:  # no --node: this machine's daemon, wherever it listens (its daemon.json)
        from node.commands.status import _local_daemon_address

        node = _local_daemon_address()
    try:
        parse_peer(node)
    except ValueError as exc:
        raise _fail(f"--node {node!r}: {exc}") from None
    with MacmeshClient(node, timeout=None) as client:
        stream = client.generate_with(options)
        try:
            yield from stream
        except MacmeshError as exc:
            raise _fail(describe_error(exc, node), code=exit_code_for(exc)) from None
        finally:
            stream.close()


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"macmesh generate: {message}", err=True)
    return typer.Exit(code=code)


def _describe_validation(exc: ValidationError) -> str:
    from node.messages import describe

    return _describe_error(describe(exc))


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part != ""]
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not a comma-separated list of token ids", param_hint="--prompt-ids"
        ) from None


def _checkpoint_dir(model: str) -> Path:
    """MODEL as a checkpoint directory: a path, a name under the models dir, or a bundled model."""
    candidate = Path(model).expanduser()
    if (candidate / "config.json").is_file():
        return candidate
    from node.cluster.catalog import resolve_checkpoint_name

    try:
        from node.config import load_settings

        models_dir = load_settings().models_dir
    except Exception:  # settings problems surface elsewhere; MODEL is the issue here
        models_dir = None
    found = resolve_checkpoint_name(model, models_dir)
    if found is not None:
        return found
    raise _fail(
        f"MODEL {model!r} is not a checkpoint directory (no config.json), nor a checkpoint "
        "in the models directory or among the bundled models"
    )


def _native_mtp_setting() -> tuple[bool, str]:
    """(enabled, what disabled it) from MACMESH_NATIVE_MTP and the node's settings."""
    env = os.environ.get("MACMESH_NATIVE_MTP")
    if env is not None:
        enabled = env.strip().lower() not in ("0", "false", "no", "off")
        return enabled, f"MACMESH_NATIVE_MTP={env}"
    try:
        from node.config import load_settings

        return load_settings().native_mtp, "the node settings (native_mtp = false)"
    except Exception:
        return True, ""


def _print_summary(stats: Any) -> None:
    parts = [
        f"engine={stats.engine}",
        f"prompt={stats.prompt_tokens} tok"
        + (f" ({stats.cached_prompt_tokens} cached)" if stats.cached_prompt_tokens else "")
        + f" @ {stats.prompt_tps:.1f} tok/s",
        f"generated={stats.generation_tokens} tok @ {stats.generation_tps:.1f} tok/s",
        f"first token {stats.time_to_first_token_seconds * 1000:.0f} ms"
        f" (queued {stats.queue_seconds * 1000:.0f} ms)",
    ]
    if stats.drafter_kind:
        rate = stats.acceptance_rate
        parts.append(
            f"K={stats.num_draft_tokens:.2g} (mean) accepted {stats.accepted_draft_tokens}/"
            f"{stats.proposed_draft_tokens}" + (f" ({rate:.0%})" if rate is not None else "")
        )
    typer.echo("[" + ", ".join(parts) + f"] {stats.engine_reason}", err=True)


def generate(
    model: Annotated[
        str,
        typer.Argument(
            metavar="MODEL", help="checkpoint directory, or its name under the models directory"
        ),
    ],
    prompt: Annotated[
        str | None, typer.Argument(metavar="PROMPT", help="prompt text (omit with --prompt-ids)")
    ] = None,
    local: Annotated[
        bool, typer.Option("--local", help="run in this process, without a daemon")
    ] = False,
    node: Annotated[
        str | None,
        typer.Option(
            "--node",
            help="daemon HOST:PORT (without --local; default: the one running on this machine)",
        ),
    ] = None,
    engine: Annotated[
        str,
        typer.Option(
            "--engine", help="auto, native_mtp or local (pipeline, pipeline_mtp with --node)"
        ),
    ] = "auto",
    mtp_k: Annotated[
        int | None, typer.Option("--mtp-k", help="draft tokens per step (1..card max_k)")
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="tokens to generate")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", help="nucleus mass in (0, 1]")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", help="0 = off")] = 0,
    min_p: Annotated[float, typer.Option("--min-p", help="in [0, 1], 0 = off")] = 0.0,
    repetition_penalty: Annotated[
        float, typer.Option("--repetition-penalty", help="1 = off")
    ] = 1.0,
    seed: Annotated[int | None, typer.Option("--seed", help="sampling seed")] = None,
    ignore_eos: Annotated[
        bool, typer.Option("--ignore-eos", help="keep generating past end-of-sequence")
    ] = False,
    raw: Annotated[bool, typer.Option("--raw", help="skip the chat template")] = False,
    prompt_ids: Annotated[
        str | None, typer.Option("--prompt-ids", help="token ids instead of PROMPT: 1,2,3")
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help='print {"text", "token_ids", "stats"}')
    ] = False,
) -> None:
    """Generate text from MODEL, streaming it to the terminal."""
    from node.messages import GenerateOptions

    if prompt is not None and prompt_ids is not None:
        raise _fail("give PROMPT or --prompt-ids, not both")
    if prompt is None and prompt_ids is None:
        raise _fail("PROMPT is missing (or pass --prompt-ids 1,2,3)")
    if mtp_k is not None and mtp_k < 1:
        raise _fail(
            f"--mtp-k={mtp_k}: give at least 1 draft token per step (omit it for the default)"
        )
    if max_tokens < 1:
        raise _fail(f"--max-tokens={max_tokens}: generate at least 1 token")
    try:
        options = GenerateOptions(
            model=model if local else _model_argument(model),
            prompt=prompt,
            prompt_ids=_parse_ids(prompt_ids) if prompt_ids is not None else None,
            max_tokens=max_tokens,
            sampling={
                "temperature": temperature,
                "top_p": top_p,
                "top_k": top_k,
                "min_p": min_p,
                "repetition_penalty": repetition_penalty,
                "seed": seed,
            },
            engine=engine,  # type: ignore[arg-type]
            mtp_k=mtp_k or 0,
            ignore_eos=ignore_eos,
            raw=raw,
        )
    except ValidationError as exc:
        raise _fail(_describe_validation(exc)) from None

    events = _generate_local(options) if local else generate_remote(node, options)
    _consume(events, json_output)


def _model_argument(model: str) -> str:
    from node.commands.launch import model_argument

    return model_argument(model)


def _generate_local(options: Any) -> Iterator[Any]:
    """The request in this process, through the same edge conversions a node runs: the
    options become the engines' request, the engine's last event becomes ``FinalStats``."""
    from node.cluster.convert import engine_request, final_stats
    from node.inference.errors import EngineUnavailable
    from node.inference.events import GenerationDone
    from node.inference.loading import load_checkpoint
    from node.inference.requests import RequestError
    from node.inference.runner import LocalRunner

    if options.engine in ("pipeline", "pipeline_mtp"):
        raise _fail(
            f"--engine={options.engine} needs a cluster (--node); --local runs native_mtp or local"
        )
    path = _checkpoint_dir(options.model)
    try:
        loaded = load_checkpoint(path)
    except (OSError, ValueError) as exc:
        raise _fail(f"cannot load {str(path)!r}: {exc}") from None
    enabled, disabled_by = _native_mtp_setting()
    runner = LocalRunner(loaded, native_mtp_enabled=enabled, disabled_by=disabled_by)
    try:
        request = engine_request(options, loaded.tokenizer).model_copy(
            update={"engine": options.engine}
        )
        start, first = time.perf_counter(), None
        for event in runner.generate(request):
            first = first or time.perf_counter()
            if isinstance(event, GenerationDone):
                # In-process there is no queue; the first event came with the first token.
                event = event.model_copy(
                    update={
                        "stats": event.stats.model_copy(
                            update={"time_to_first_token_seconds": first - start}
                        )
                    }
                )
                yield final_stats(event)
            else:
                yield event
    except (RequestError, EngineUnavailable) as exc:
        raise _fail(str(exc)) from None
    except ValueError as exc:
        raise _fail(_describe_error(str(exc))) from None


def _describe_error(message: str) -> str:
    """A request error with the flags the user typed in place of the field names."""
    for field, flag in _FLAGS.items():
        message = re.sub(rf"(?<![\w.-])(?:sampling\.)?{field}(?=[=\[])", flag, message)
    return message


def _consume(events: Iterator[Any], json_output: bool) -> None:
    from node.messages import FinalStats

    final = None
    text: list[str] = []
    token_ids: list[int] = []
    for event in events:
        if isinstance(event, FinalStats):
            final = event
            break
        text.append(event.text)
        token_ids.extend(event.token_ids)
        if not json_output and event.text:
            sys.stdout.write(event.text)
            sys.stdout.flush()
    if final is None:
        raise _fail("the request ended without final stats", code=1)
    if json_output:
        payload = {
            "text": "".join(text),
            "token_ids": token_ids,
            "finish_reason": final.finish_reason,
            "stats": final.model_dump(mode="json", exclude={"kind", "finish_reason"}),
        }
        typer.echo(json.dumps(payload))
    else:
        sys.stdout.write("\n")
        _print_summary(final)
