"""`macmesh generate MODEL PROMPT`: generate text in-process (``--local``) or on a cluster.

Without ``--json`` the text streams to stdout as it is produced and a one-line summary of the
stats goes to stderr.  With ``--json`` stdout gets one object:
``{"text", "token_ids", "stats": {...}}``.  Exit codes: 0 done, 1 runtime failure (no daemon),
2 bad input (unknown model, invalid option value, engine that cannot run here).
"""

from __future__ import annotations

import json
import os
import sys
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


def generate_remote(node: str | None, model: str, request: Any) -> Iterator[Any]:
    """Send ``request`` for ``model`` to the daemon at ``node`` and stream its events.

    Any node of the cluster will do: it relays to the instance's coordinator. Yields the same
    ``TokenDelta`` / ``GenerationDone`` events as the local engines (``stats.stages`` lists
    the stages the request went through). Ctrl-C cancels the request on the cluster."""
    from node.client import FinalStats, MacmeshClient, MacmeshError
    from node.cluster.convert import stats_from_proto
    from node.commands.launch import describe_error, exit_code_for, model_argument
    from node.discovery.static import parse_peer
    from node.inference.events import GenerationDone, TokenDelta
    from node.proto.macmesh.v1 import inference_pb2 as pb

    if node is None:  # no --node: this machine's daemon, wherever it listens (its daemon.json)
        from node.commands.status import _local_daemon_address

        node = _local_daemon_address()
    try:
        parse_peer(node)
    except ValueError as exc:
        raise _fail(f"--node {node!r}: {exc}") from None
    s = request.sampling
    sampling = {
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k,
        "min_p": s.min_p,
        "repetition_penalty": s.repetition_penalty,
        "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty,
        "logit_bias": dict(s.logit_bias),
        "seed": s.seed,
    }
    text: list[str] = []
    token_ids: list[int] = []
    with MacmeshClient(node, timeout=None) as client:
        stream = client.generate(
            model_argument(model),
            request.prompt,
            prompt_ids=request.prompt_ids,
            max_tokens=request.max_tokens,
            sampling=sampling,
            engine=request.engine,
            mtp_k=request.mtp_k or 0,
            ignore_eos=request.ignore_eos,
            raw=request.raw,
        )
        try:
            for event in stream:
                if isinstance(event, FinalStats):
                    wire = pb.GenerationStats(
                        **event.model_dump(exclude={"kind", "stages", "drafter_kind"}),
                        drafter_kind=event.drafter_kind or "",
                        stages=[pb.StageStats(**st.model_dump()) for st in event.stages],
                    )
                    finish = (
                        event.finish_reason if event.finish_reason in ("stop", "length") else "stop"
                    )
                    yield GenerationDone(
                        text="".join(text),
                        token_ids=token_ids,
                        finish_reason=finish,
                        stats=stats_from_proto(wire),
                    )
                    return
                text.append(event.text)
                token_ids.extend(event.token_ids)
                yield TokenDelta(text=event.text, token_ids=event.token_ids)
        except MacmeshError as exc:
            raise _fail(describe_error(exc, node), code=exit_code_for(exc)) from None
        finally:
            stream.close()
    raise _fail(f"the daemon at {node} ended the stream without final stats", code=1)


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"macmesh generate: {message}", err=True)
    return typer.Exit(code=code)


def _describe_validation(exc: ValidationError) -> str:
    from node.validation import MAX_PROBLEMS, short_repr

    problems = []
    errors = exc.errors()
    for err in errors[:MAX_PROBLEMS]:
        loc = [str(p) for p in err["loc"] if p != "sampling"]
        field = loc[0] if loc else ""
        name = _FLAGS.get(field, field or "request")
        value = err.get("input")
        message = err["msg"].removeprefix("Value error, ")
        if field:
            problems.append(f"{name}={short_repr(value)}: {message}")
        else:
            problems.append(message)
    if len(errors) > MAX_PROBLEMS:
        problems.append(f"and {len(errors) - MAX_PROBLEMS} more problems")
    return "; ".join(problems)


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
        f"prompt={stats.prompt_tokens} tok @ {stats.prompt_tps:.1f} tok/s",
        f"generated={stats.generation_tokens} tok @ {stats.generation_tps:.1f} tok/s",
    ]
    if stats.drafter_kind:
        rate = stats.acceptance_rate
        parts.append(
            f"K={stats.num_draft_tokens} accepted {stats.accepted_draft_tokens}/"
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
    engine: Annotated[str, typer.Option("--engine", help="auto, native_mtp or local")] = "auto",
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
    from node.inference.requests import GenerateRequest
    from node.inference.sampling import SamplingParams

    if prompt is not None and prompt_ids is not None:
        raise _fail("give PROMPT or --prompt-ids, not both")
    if prompt is None and prompt_ids is None:
        raise _fail("PROMPT is missing (or pass --prompt-ids 1,2,3)")
    try:
        request = GenerateRequest(
            prompt=prompt,
            prompt_ids=_parse_ids(prompt_ids) if prompt_ids is not None else None,
            max_tokens=max_tokens,
            sampling=SamplingParams(
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                min_p=min_p,
                repetition_penalty=repetition_penalty,
                seed=seed,
            ),
            engine=engine,  # type: ignore[arg-type]
            mtp_k=mtp_k,
            ignore_eos=ignore_eos,
            raw=raw,
        )
    except ValidationError as exc:
        raise _fail(_describe_validation(exc)) from None

    events = _generate_local(model, request) if local else generate_remote(node, model, request)
    _consume(events, json_output)


def _generate_local(model: str, request: Any) -> Iterator[Any]:
    from node.inference.errors import EngineUnavailable
    from node.inference.loading import load_checkpoint
    from node.inference.requests import RequestError
    from node.inference.runner import LocalRunner

    path = _checkpoint_dir(model)
    try:
        loaded = load_checkpoint(path)
    except (OSError, ValueError) as exc:
        raise _fail(f"cannot load {str(path)!r}: {exc}") from None
    enabled, disabled_by = _native_mtp_setting()
    runner = LocalRunner(loaded, native_mtp_enabled=enabled, disabled_by=disabled_by)
    try:
        yield from runner.generate(request)
    except (RequestError, EngineUnavailable) as exc:
        raise _fail(str(exc)) from None


def _consume(events: Iterator[Any], json_output: bool) -> None:
    from node.inference.events import GenerationDone

    done = None
    for event in events:
        if isinstance(event, GenerationDone):
            done = event
        elif not json_output and event.text:
            sys.stdout.write(event.text)
            sys.stdout.flush()
    assert done is not None
    if json_output:
        payload = {
            "text": done.text,
            "token_ids": done.token_ids,
            "finish_reason": done.finish_reason,
            "stats": done.stats.model_dump(mode="json"),
        }
        typer.echo(json.dumps(payload))
    else:
        sys.stdout.write("\n")
        _print_summary(done.stats)
