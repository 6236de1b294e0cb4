#!/usr/bin/env python3
"""Benchmark the prompt cache: time to first token of turn 5 of a chat, with and without it.

    nice python scripts/bench_prompt_cache.py --json docs/bench/prompt_cache.json

(The script re-executes itself with OpenBLAS preloaded and OPENBLAS_NUM_THREADS=1 unless set,
when the library exists and is not preloaded.)

The model is the benchmark model (``node.checkpoints.bench_spec``, a ~200M-parameter fp32
qwen3_5: GatedDeltaNet and full-attention layers), built on the fly (cached). A chat is a
first prompt of ``--history-tokens`` minus four turns' worth, then four turns that each add
the previous answer (``--answer-tokens`` generated) and a new user message
(``--message-tokens``): turn 5's prompt carries ~``--history-tokens`` of history. Every turn
runs through an instance's batch scheduler (``LocalRunner.submit``, what a daemon instance
runs), and TTFT is what the request's final stats report (arrival at the instance to the
first token). ``--engine native_mtp`` runs every turn on batched native MTP at K = 2 (the
model's MTP head; the snapshots carry the head's cache and pending hidden states).

- ``cached``: a runner with the prompt cache (default budget) plays turns 1-4, then turn 5
  starts from the snapshot the end of turn 4's generation left.
- ``uncached``: a runner with ``prompt_cache_bytes=0`` computes turn 5's whole prompt (the
  anchor, measured in the same run).

Each repeat is a new conversation (other random tokens: no repeat reuses another's
snapshots); the two modes' turn 5 alternate which goes first; medians are reported. Turn 5's tokens
are compared between the modes (greedy: they must be equal).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
from pathlib import Path
from typing import Any

from _benchinfo import machine_info, reexec_with_openblas


def conversation(seed: int, history: int, turns: int, message: int, answer: int) -> dict:
    rng = random.Random(seed)
    first = history - (turns - 1) * (message + answer)
    return {
        "first": [rng.randrange(0, 500) for _ in range(first)],
        "messages": [[rng.randrange(0, 500) for _ in range(message)] for _ in range(turns - 1)],
    }


def request(prompt: list[int], max_tokens: int, engine: str) -> Any:
    """Greedy, EOS ignored; native MTP at a pinned K = 2 (it drafts, and no cost table needs
    measuring first)."""
    from node.inference.requests import GenerateRequest

    mtp = {"engine": "native_mtp", "mtp_k": 2} if engine == "native_mtp" else {}
    return GenerateRequest(prompt_ids=prompt, max_tokens=max_tokens, ignore_eos=True, **mtp)


class PipelineRunner:
    """A 2-stage pipeline instance as the bench drives it: stage 0 in this process, stage 1
    a stage server process; ``submit`` is the engine's ``generate``, with the time to first
    token measured here (from the call to the first token, as the runner's stats do)."""

    def __init__(self, checkpoint: Path, address: str, prompt_cache_bytes: int) -> None:
        from node.inference.pipeline import PipelineEngine, SimplePlacement
        from node.inference.prompt_cache import DEFAULT_PROMPT_CACHE_MB

        layers = json.loads((checkpoint / "config.json").read_text())
        layers = layers.get("text_config", layers)["num_hidden_layers"]
        self.engine = PipelineEngine(
            checkpoint,
            SimplePlacement.even(layers, ["here", "stage1"]),
            {"stage1": address},
            local_node_id="here",
            prompt_cache_bytes=(
                DEFAULT_PROMPT_CACHE_MB * 2**20 if prompt_cache_bytes < 0 else prompt_cache_bytes
            ),
        )
        self.engine.load()
        self.prompt_cache = self.engine.prompt_cache

    def submit(self, request: Any) -> list[Any]:
        import time

        started = time.perf_counter()
        first = None
        events = []
        for event in self.engine.generate(request):
            if first is None:
                first = time.perf_counter() - started
            events.append(event)
        stats = events[-1].stats.model_copy(update={"time_to_first_token_seconds": first})
        events[-1] = events[-1].model_copy(update={"stats": stats})
        return events

    def close(self) -> None:
        self.engine.close()


def earlier_turns(runner: Any, chat: dict, answer: int, engine: str) -> list[int]:
    """Turns 1..n-1 on ``runner``; returns turn n's prompt."""
    prompt = list(chat["first"])
    for message in chat["messages"]:
        done = list(runner.submit(request(prompt, answer, engine)))[-1]
        prompt = prompt + done.token_ids + message
    return prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=200e6, help="model size")
    parser.add_argument("--history-tokens", type=int, default=2048)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--message-tokens", type=int, default=48)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--last-tokens", type=int, default=8, help="generated in the last turn")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument(
        "--engine",
        choices=["local", "native_mtp", "pipeline"],
        default="local",
        help="the instance's engine (native_mtp: the head's state is cached too; pipeline: "
        "2 stages, the second in a stage server process)",
    )
    parser.add_argument("--json", type=Path, default=Path("bench_prompt_cache.json"))
    parser.add_argument("--no-preload", action="store_true", help="do not re-exec with OpenBLAS")
    args = parser.parse_args()

    reexec_with_openblas(args.no_preload)

    from node.checkpoints import bench_spec, count_parameters, ensure_checkpoint
    from node.inference.loading import load_checkpoint
    from node.inference.runner import LocalRunner

    spec = bench_spec(params=args.params)
    print(
        f"model: {spec.name()}, {count_parameters(spec, include_mtp=False) / 1e6:.0f}M "
        f"parameters, {spec.num_hidden_layers} layers, fp32",
        flush=True,
    )
    loaded = load_checkpoint(ensure_checkpoint(spec))
    mtp = args.engine == "native_mtp"
    if args.engine == "pipeline":
        import tempfile

        from bench_pipeline import start_stage_servers

        workdir = Path(tempfile.mkdtemp(prefix="bench-prompt-cache-"))
        ((server, address),) = start_stage_servers(1, [None, None], workdir)
        cached: Any = PipelineRunner(loaded.path, address, -1)
        uncached: Any = PipelineRunner(loaded.path, address, 0)
    else:
        cached = LocalRunner(loaded, native_mtp_enabled=mtp)
        uncached = LocalRunner(loaded, native_mtp_enabled=mtp, prompt_cache_bytes=0)
    assert cached.prompt_cache is not None
    for runner in (cached, uncached):  # warm-up: kernels, allocator
        list(runner.submit(request(list(range(300)), 2, args.engine)))
    cached.prompt_cache.clear()

    rounds: list[dict[str, Any]] = []
    for r in range(args.repeats):
        chat = conversation(
            1000 + r, args.history_tokens, args.turns, args.message_tokens, args.answer_tokens
        )
        # Turns 1-4 on the cached runner (the uncached one would give the same greedy
        # answers): they leave the snapshots turn 5 starts from.
        prompt = earlier_turns(cached, chat, args.answer_tokens, args.engine)
        result: dict[str, Any] = {}
        order = (cached, uncached) if r % 2 == 0 else (uncached, cached)
        for runner in order:
            last = list(runner.submit(request(prompt, args.last_tokens, args.engine)))[-1]
            assert last.stats.engine == args.engine, last.stats.engine
            result["cached" if runner is cached else "uncached"] = {
                "ttft_s": last.stats.time_to_first_token_seconds,
                "cached_prompt_tokens": last.stats.cached_prompt_tokens,
                "tokens": last.token_ids,
            }
        row = {
            "prompt_tokens": len(prompt),
            "cached_prompt_tokens": result["cached"]["cached_prompt_tokens"],
            "ttft_cached_s": result["cached"]["ttft_s"],
            "ttft_uncached_s": result["uncached"]["ttft_s"],
            "same_tokens": result["cached"]["tokens"] == result["uncached"]["tokens"],
        }
        rounds.append(row)
        print(
            f"  round {r + 1}: turn {args.turns} of {row['prompt_tokens']} tokens "
            f"({row['cached_prompt_tokens']} cached): TTFT {row['ttft_cached_s'] * 1e3:.0f} ms "
            f"with the cache, {row['ttft_uncached_s'] * 1e3:.0f} ms without, same tokens: "
            f"{row['same_tokens']}",
            flush=True,
        )
    stats = cached.prompt_cache.stats()
    cached.close()
    uncached.close()
    if args.engine == "pipeline":
        server.terminate()

    with_cache = statistics.median(r["ttft_cached_s"] for r in rounds)
    without = statistics.median(r["ttft_uncached_s"] for r in rounds)
    summary = {
        "ttft_cached_s": with_cache,
        "ttft_uncached_s": without,
        "speedup": without / with_cache,
        "prompt_tokens": statistics.median(r["prompt_tokens"] for r in rounds),
        "cached_prompt_tokens": statistics.median(r["cached_prompt_tokens"] for r in rounds),
        "all_same_tokens": all(r["same_tokens"] for r in rounds),
        "cache_entries": stats.entries,
        "cache_bytes": stats.nbytes,
    }
    print()
    print(
        f"{'turn':>4} | {'prompt':>6} | {'cached':>6} | {'TTFT cached':>11} | "
        f"{'TTFT uncached':>13} | {'speedup':>7} | same tokens"
    )
    print("-" * 74)
    print(
        f"{args.turns:>4} | {summary['prompt_tokens']:>6.0f} | "
        f"{summary['cached_prompt_tokens']:>6.0f} | {with_cache * 1e3:>8.0f} ms | "
        f"{without * 1e3:>10.0f} ms | {summary['speedup']:>6.1f}x | "
        f"{sum(r['same_tokens'] for r in rounds)}/{len(rounds)}"
    )
    print(
        f"cache after the run: {stats.entries} snapshots, {stats.nbytes / 2**20:.1f} MiB "
        f"(budget {stats.budget_bytes / 2**20:.0f} MiB)"
    )
    report = {
        "machine": {**machine_info(), "load_average": os.getloadavg()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": {
            "name": spec.name(),
            "parameters": count_parameters(spec, include_mtp=False),
            "layers": spec.num_hidden_layers,
        },
        "settings": {
            k: getattr(args, k)
            for k in (
                "engine",
                "params",
                "history_tokens",
                "turns",
                "message_tokens",
                "answer_tokens",
                "last_tokens",
                "repeats",
            )
        },
        "summary": summary,
        "rounds": rounds,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"json: {args.json}")


if __name__ == "__main__":
    main()
