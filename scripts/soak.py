"""Soak: many concurrent requests, random cancellations, against a real 2-node pipelined cluster.

    python scripts/soak.py                       # 240 requests, 16 at a time, ~25% cancelled
    python scripts/soak.py --requests 40 --concurrency 8 --json soak.json

Starts two ``macmesh run`` daemons on 127.0.0.1 (static peers, no mDNS), launches the bundled
``macmesh-tiny`` across both (``min_nodes=2``: a pipelined instance), then sends requests from
``--concurrency`` threads. Each request draws its length and fate: run to the end, be cancelled
after a few tokens (the stream is closed), or carry a deadline too short to finish. Afterwards
it checks what the issue asks for and exits non-zero when one fails:

- every request ended as it should: finished with the tokens asked for, cancelled by us,
  DEADLINE_EXCEEDED, or RESOURCE_EXHAUSTED (admission, a clear refusal); anything else fails;
- caches return to baseline: no stage holds a request's cache, the instance has none in flight;
- the daemons' RSS does not grow: measured after a warm-up round and after the soak.

A second phase, with ``--burst N`` (default 2x the queue limit) requests at once, checks that
admission answers RESOURCE_EXHAUSTED beyond ``MACMESH_MAX_QUEUED_REQUESTS`` instead of queueing
without bound. Prints a table; ``--json PATH`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers.cluster_client import launch  # noqa: E402
from helpers.daemons import DaemonCluster, wait_for  # noqa: E402

from node import rpc  # noqa: E402
from node.client import (  # noqa: E402
    DeadlineExceeded,
    MacmeshClient,
    MacmeshError,
    ResourceExhausted,
)
from node.cluster.peers import status_instances  # noqa: E402
from node.proto.macmesh.v1 import stage_pb2, stage_pb2_grpc  # noqa: E402

MODEL = "macmesh-tiny"
PROMPTS = ["The os module", "Once upon a time", "def main():", "import sys", "Hello"]


def _one(address: str, instance_id: str, rng: random.Random) -> str:
    """Run one request with a random fate; return how it ended."""
    fate = rng.choices(["finish", "cancel", "deadline"], weights=[70, 25, 5])[0]
    max_tokens = rng.randint(4, 48)
    cancel_after = rng.randint(1, max(1, max_tokens - 1))
    timeout = rng.uniform(0.05, 0.4) if fate == "deadline" else 120.0
    tokens = 0
    try:
        with MacmeshClient(address, timeout=timeout) as client:
            stream = client.generate(
                instance_id, rng.choice(PROMPTS), max_tokens=max_tokens, ignore_eos=True, raw=True
            )
            try:
                for event in stream:
                    if event.kind == "delta":
                        tokens += len(event.token_ids)
                        if fate == "cancel" and tokens >= cancel_after:
                            stream.close()
                            return "cancelled"
                    elif event.generation_tokens != max_tokens:
                        return f"WRONG: {event.generation_tokens} of {max_tokens} tokens"
            finally:
                stream.close()
        return "finished" if fate != "cancel" else "finished (before cancel)"
    except DeadlineExceeded:
        return "deadline exceeded" if fate == "deadline" else "WRONG: deadline exceeded"
    except ResourceExhausted:
        return "resource exhausted"
    except MacmeshError as exc:
        return f"WRONG: {type(exc).__name__}: {exc.message}"


def _cached(address: str) -> int:
    with rpc.channel(address) as channel:
        reply = stage_pb2_grpc.StageServiceStub(channel).Status(
            stage_pb2.StageStatusRequest(), timeout=5
        )
    return sum(s.cached_requests for s in reply.stages)


def _in_flight(address: str, instance_id: str) -> int:
    infos = status_instances(address, timeout_s=5) or []
    return sum(i.in_flight for i in infos if i.instance_id == instance_id)


def _rss(pids: list[int]) -> list[int]:
    return [psutil.Process(pid).memory_info().rss for pid in pids]


def _round(address: str, instance_id: str, count: int, concurrency: int, seed: int) -> Counter:
    rngs = [random.Random(seed * 100_003 + i) for i in range(count)]
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        outcomes = list(pool.map(lambda r: _one(address, instance_id, r), rngs))
    return Counter(outcomes)


def _burst(address: str, instance_id: str, count: int) -> Counter:
    """``count`` long requests at the same moment: beyond the queue limit they are refused."""
    start = threading.Barrier(count)

    def one(_: int) -> str:
        start.wait()
        try:
            with MacmeshClient(address, timeout=120) as client:
                for _event in client.generate(
                    instance_id, "x", max_tokens=24, ignore_eos=True, raw=True
                ):
                    pass
            return "finished"
        except ResourceExhausted:
            return "resource exhausted"
        except MacmeshError as exc:
            return f"WRONG: {type(exc).__name__}: {exc.message}"

    with ThreadPoolExecutor(max_workers=count) as pool:
        return Counter(pool.map(one, range(count)))


def soak(args: argparse.Namespace, workdir: Path) -> dict:
    env = {"MACMESH_MAX_QUEUED_REQUESTS": str(args.max_queued)}
    with DaemonCluster(workdir, env=env) as cluster:
        a = cluster.start("soak-a", mdns=False)
        b = cluster.start("soak-b", mdns=False, peers=[a.address])
        cluster.wait_connected([a, b], timeout=20)
        _, instance = launch(a.address, MODEL, min_nodes=2)
        assert len(instance.stages) == 2, instance
        pids = [a.pid, b.pid]
        addresses = [a.address, b.address]

        began = time.perf_counter()
        warm = _round(a.address, instance.instance_id, args.warmup, args.concurrency, seed=1)
        rss_base = _rss(pids)
        # Requests go to both nodes: b relays to the coordinator, a serves directly.
        totals: Counter = Counter(warm)
        per_round = max(1, args.requests // 2)
        for i, address in enumerate(addresses):
            totals += _round(address, instance.instance_id, per_round, args.concurrency, seed=2 + i)
        soak_s = time.perf_counter() - began
        burst = _burst(a.address, instance.instance_id, args.burst or 2 * args.max_queued)

        def drained() -> bool:
            return all(_cached(x) == 0 for x in addresses) and (
                _in_flight(a.address, instance.instance_id) == 0
            )

        try:
            wait_for(drained, timeout=15, interval=0.2, what="caches back to baseline")
            caches_ok = True
        except TimeoutError:
            caches_ok = False
        time.sleep(1.0)  # freed buffers reach the allocator
        rss_end = _rss(pids)
        alive = a.alive() and b.alive()
    total = sum(totals.values())
    wrong = {k: v for k, v in {**totals, **burst}.items() if k.startswith("WRONG")}
    growth = [end - base for base, end in zip(rss_base, rss_end, strict=True)]
    return {
        "requests": total,
        "concurrency": args.concurrency,
        "seconds": round(soak_s, 1),
        "outcomes": dict(totals),
        "burst": {"size": args.burst or 2 * args.max_queued, "outcomes": dict(burst)},
        "max_queued": args.max_queued,
        "caches_back_to_baseline": caches_ok,
        "rss_after_warmup_mib": [round(r / 2**20, 1) for r in rss_base],
        "rss_after_soak_mib": [round(r / 2**20, 1) for r in rss_end],
        "rss_growth_mib": [round(g / 2**20, 1) for g in growth],
        "daemons_alive": alive,
        "wrong": wrong,
    }


def _verdict(result: dict, args: argparse.Namespace) -> list[str]:
    problems = []
    if result["wrong"]:
        problems.append(f"requests that ended wrongly: {result['wrong']}")
    if not result["caches_back_to_baseline"]:
        problems.append("stage caches / in-flight counts did not return to 0")
    if any(g > args.rss_slack_mib for g in result["rss_growth_mib"]):
        problems.append(f"daemon RSS grew by {result['rss_growth_mib']} MiB")
    if not result["daemons_alive"]:
        problems.append("a daemon died")
    if "resource exhausted" not in result["burst"]["outcomes"]:
        problems.append(f"a burst beyond the queue limit was not refused: {result['burst']}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=240)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=32, help="requests before RSS baseline")
    parser.add_argument("--max-queued", type=int, default=16, help="MACMESH_MAX_QUEUED_REQUESTS")
    parser.add_argument("--burst", type=int, default=0, help="burst size (0 = 2x max-queued)")
    parser.add_argument("--rss-slack-mib", type=float, default=48.0, help="allowed RSS growth")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="macmesh-soak-") as tmp:
        result = soak(args, Path(tmp))
    problems = _verdict(result, args)
    result["problems"] = problems
    print(
        f"soak: {result['requests']} requests, {result['concurrency']} concurrent, "
        f"{result['seconds']} s (2-node pipelined {MODEL})"
    )
    for outcome, count in sorted(result["outcomes"].items()):
        print(f"  {outcome:<28} {count:>5}")
    print(
        f"  burst of {result['burst']['size']} (queue limit {result['max_queued']}): "
        f"{result['burst']['outcomes']}"
    )
    print(f"  caches back to baseline: {result['caches_back_to_baseline']}")
    print(
        f"  RSS after warm-up MiB {result['rss_after_warmup_mib']}, after soak "
        f"{result['rss_after_soak_mib']}, growth {result['rss_growth_mib']}"
    )
    print("PASS" if not problems else "FAIL: " + "; ".join(problems))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if not problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
