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

``--failover`` runs four daemons and, mid-soak, SIGKILLs a stage node (the coordinator places
the instance again on the survivors) and then the coordinator (a stage holder takes it over).
Requests go to every live node; a client retries UNAVAILABLE (a clear "retry" status, naming
the node that went) on the next node for up to ``--retry-s`` seconds, from the start: a
request ends with all its tokens, as cancelled or past its deadline, or with a clear status —
never lost. It reports the retries, the seconds each kill took to serve again, and that the
instance kept its id.
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
    Unavailable,
)
from node.cluster.peers import status_instances  # noqa: E402
from node.proto.macmesh.v1 import stage_pb2, stage_pb2_grpc  # noqa: E402

MODEL = "macmesh-tiny"
PROMPTS = ["The os module", "Once upon a time", "def main():", "import sys", "Hello"]


def _one(addresses: list[str], instance_id: str, rng: random.Random, retry_s: float = 0.0) -> str:
    """Run one request with a random fate; return how it ended. An UNAVAILABLE answer is
    retried from the start on the next address for up to ``retry_s`` seconds (a client's
    retry after a node died), within the request's own deadline."""
    fate = rng.choices(["finish", "cancel", "deadline"], weights=[70, 25, 5])[0]
    max_tokens = rng.randint(4, 48)
    cancel_after = rng.randint(1, max(1, max_tokens - 1))
    timeout = rng.uniform(0.05, 0.4) if fate == "deadline" else 120.0
    prompt = rng.choice(PROMPTS)
    began = time.monotonic()
    first = rng.randrange(len(addresses))
    for attempt in range(1_000_000):
        address = addresses[(first + attempt) % len(addresses)]
        try:
            ended = _attempt(address, instance_id, prompt, fate, max_tokens, cancel_after, timeout)
        except Unavailable as exc:
            waited = time.monotonic() - began
            if waited > retry_s or waited > timeout:
                return f"unavailable after {attempt + 1} tries: {exc.message[:160]}"
            time.sleep(min(0.25 * (attempt + 1), 1.0))  # a client's backoff, not a sync wait
            continue
        return ended + (" after retry" if attempt else "")
    raise AssertionError("unreachable")


def _attempt(
    address: str,
    instance_id: str,
    prompt: str,
    fate: str,
    max_tokens: int,
    cancel_after: int,
    timeout: float,
) -> str:
    tokens = 0
    try:
        with MacmeshClient(address, timeout=timeout) as client:
            stream = client.generate(
                instance_id, prompt, max_tokens=max_tokens, ignore_eos=True, raw=True
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
    except Unavailable:
        raise
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


def _round(
    addresses: list[str],
    instance_id: str,
    count: int,
    concurrency: int,
    seed: int,
    retry_s: float = 0.0,
    done: list[str] | None = None,
) -> Counter:
    rngs = [random.Random(seed * 100_003 + i) for i in range(count)]
    finished = done if done is not None else []

    def one(rng: random.Random) -> str:
        outcome = _one(addresses, instance_id, rng, retry_s)
        finished.append(outcome)  # list.append is atomic: the chaos thread counts these
        return outcome

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        outcomes = list(pool.map(one, rngs))
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


def _serving(address: str, instance_id: str, gone: str) -> dict | None:
    """The instance as ``address`` sees it, once ready again without node ``gone``."""
    info = next(
        (i for i in status_instances(address, timeout_s=5) or [] if i.instance_id == instance_id),
        None,
    )
    if info is None or info.state != "ready" or gone in {s.node_id for s in info.stages}:
        return None
    if info.coordinator_node_id == gone:
        return None
    return {"coordinator": info.coordinator_node_id, "stages": [s.node_id for s in info.stages]}


def _chaos(cluster_nodes: list, instance, done: list[str], total: int, report: dict) -> None:
    """Mid-soak: SIGKILL a stage node, wait until the instance serves again, then SIGKILL
    its coordinator and wait again. Runs beside the requests, which keep coming."""
    by_id = {n.node_id: n for n in cluster_nodes}
    coordinator = instance.coordinator_node_id
    kills = []
    for what, at in (("stage", total // 4), ("coordinator", total // 2)):
        wait_for(lambda at=at: len(done) >= at, timeout=600, interval=0.05, what="requests")
        live = [n for n in cluster_nodes if n.alive()]
        info = next(
            i
            for i in status_instances(live[0].address, timeout_s=5) or []
            if i.instance_id == instance.instance_id
        )
        coordinator = info.coordinator_node_id
        staged = [s.node_id for s in info.stages]
        victim_id = (
            coordinator if what == "coordinator" else next(n for n in staged if n != coordinator)
        )
        victim = by_id[victim_id]
        done_before = len(done)
        victim.kill()
        killed_at = time.monotonic()
        survivor = next(n for n in cluster_nodes if n.alive())
        back = wait_for(
            lambda s=survivor, v=victim_id: _serving(s.address, instance.instance_id, v),
            timeout=120,
            interval=0.1,
            what=f"the instance serving again after the {what} died",
        )
        kills.append(
            {
                "killed": what,
                "node": victim.name,
                "requests_done_before": done_before,
                "serving_again_s": round(time.monotonic() - killed_at, 2),
                "then": back,
            }
        )
    report["kills"] = kills


def soak(args: argparse.Namespace, workdir: Path) -> dict:
    env = {"MACMESH_MAX_QUEUED_REQUESTS": str(args.max_queued)}
    if args.failover:
        env["MACMESH_REPLACE_DELAY_S"] = "0.5"  # status shows the failure that long
    size = 4 if args.failover else 2
    with DaemonCluster(workdir, env=env) as cluster:
        a = cluster.start("soak-a", mdns=False)
        nodes = [a] + [
            cluster.start(f"soak-{chr(ord('a') + i)}", mdns=False, peers=[a.address])
            for i in range(1, size)
        ]
        cluster.wait_connected(nodes, timeout=30)
        _, instance = launch(a.address, MODEL, min_nodes=2)
        assert len(instance.stages) == 2, instance
        addresses = [n.address for n in nodes]

        began = time.perf_counter()
        warm = _round([a.address], instance.instance_id, args.warmup, args.concurrency, seed=1)
        rss_base = _rss([n.pid for n in nodes])
        totals: Counter = Counter(warm)
        chaos: dict = {}
        if args.failover:
            # Every node takes requests and relays; the kills happen while they run.
            done: list[str] = []
            thread = threading.Thread(
                target=_chaos, args=(nodes, instance, done, args.requests, chaos), daemon=True
            )
            thread.start()
            totals += _round(
                addresses,
                instance.instance_id,
                args.requests,
                args.concurrency,
                seed=2,
                retry_s=args.retry_s,
                done=done,
            )
            thread.join(timeout=300)
            if "kills" not in chaos:
                chaos["kills"] = "the kills did not finish"
            # RSS after the failover, against a round on the survivors: what they loaded when
            # they took stages over is the new baseline; the requests must not grow it.
            nodes = [n for n in nodes if n.alive()]
            rss_base = _rss([n.pid for n in nodes])
            totals += _round(
                [n.address for n in nodes],
                instance.instance_id,
                max(1, args.requests // 2),
                args.concurrency,
                seed=3,
                retry_s=args.retry_s,
            )
        else:
            # Requests go to both nodes: b relays to the coordinator, a serves directly.
            per_round = max(1, args.requests // 2)
            for i, address in enumerate(addresses):
                totals += _round(
                    [address], instance.instance_id, per_round, args.concurrency, seed=2 + i
                )
        soak_s = time.perf_counter() - began
        live = [n for n in nodes if n.alive()]
        final = next(
            i
            for i in status_instances(live[0].address, timeout_s=5) or []
            if i.instance_id == instance.instance_id
        )
        coordinator = next(n for n in nodes if n.node_id == final.coordinator_node_id)
        burst = _burst(coordinator.address, instance.instance_id, args.burst or 2 * args.max_queued)

        def drained() -> bool:
            return all(_cached(n.address) == 0 for n in live) and (
                _in_flight(coordinator.address, instance.instance_id) == 0
            )

        try:
            wait_for(drained, timeout=15, interval=0.2, what="caches back to baseline")
            caches_ok = True
        except TimeoutError:
            caches_ok = False
        time.sleep(1.0)  # freed buffers reach the allocator
        rss_end = _rss([n.pid for n in nodes])
        alive = all(n.alive() for n in live)
    total = sum(totals.values())
    wrong = {k: v for k, v in {**totals, **burst}.items() if k.startswith("WRONG")}
    growth = [end - base for base, end in zip(rss_base, rss_end, strict=True)]
    result = {
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
    if args.failover:
        retried = sum(v for k, v in totals.items() if k.endswith("after retry"))
        gave_up = {k: v for k, v in totals.items() if k.startswith("unavailable after")}
        result["failover"] = {
            "kills": chaos["kills"],
            "same_instance_id": final.instance_id == instance.instance_id,
            "retried_then_served": retried,
            "unavailable_after_retries": sum(gave_up.values()),
            "lost": sum(wrong.values()),
        }
    return result


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
    failover = result.get("failover")
    if failover is not None:
        if not isinstance(failover["kills"], list) or len(failover["kills"]) != 2:
            problems.append(f"the stage and coordinator kills did not both recover: {failover}")
        if not failover["same_instance_id"]:
            problems.append("the instance came back under another id")
        if failover["unavailable_after_retries"]:
            problems.append(
                f"{failover['unavailable_after_retries']} requests still UNAVAILABLE after "
                f"{args.retry_s:g} s of retries"
            )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=240)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=32, help="requests before RSS baseline")
    parser.add_argument("--max-queued", type=int, default=16, help="MACMESH_MAX_QUEUED_REQUESTS")
    parser.add_argument("--burst", type=int, default=0, help="burst size (0 = 2x max-queued)")
    parser.add_argument("--rss-slack-mib", type=float, default=48.0, help="allowed RSS growth")
    parser.add_argument(
        "--failover", action="store_true", help="4 nodes; kill a stage, then the coordinator"
    )
    parser.add_argument(
        "--retry-s", type=float, default=60.0, help="how long a client retries UNAVAILABLE"
    )
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="macmesh-soak-") as tmp:
        result = soak(args, Path(tmp))
    problems = _verdict(result, args)
    result["problems"] = problems
    print(
        f"soak: {result['requests']} requests, {result['concurrency']} concurrent, "
        f"{result['seconds']} s (2-node pipelined {MODEL}"
        + (", failover: 4 daemons)" if args.failover else ")")
    )
    for outcome, count in sorted(result["outcomes"].items()):
        print(f"  {outcome:<28} {count:>5}")
    print(
        f"  burst of {result['burst']['size']} (queue limit {result['max_queued']}): "
        f"{result['burst']['outcomes']}"
    )
    if "failover" in result:
        failover = result["failover"]
        for kill in failover["kills"] if isinstance(failover["kills"], list) else []:
            print(
                f"  killed the {kill['killed']} ({kill['node']}) after "
                f"{kill['requests_done_before']} requests: serving again in "
                f"{kill['serving_again_s']} s"
            )
        print(
            f"  same instance id: {failover['same_instance_id']}; retried then served: "
            f"{failover['retried_then_served']}; UNAVAILABLE after retries: "
            f"{failover['unavailable_after_retries']}; lost: {failover['lost']}"
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
