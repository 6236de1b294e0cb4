"""``python -m node.inference.stage --port N``: serve the StageService alone, without discovery.

Benchmarks and tests run stage servers this way; ``macmesh run`` hosts the same servicer
(node.cluster.stage_host). The parts of a stage: ``stage_wire`` (sampling options, status
codes), ``stage_runtime`` (a loaded shard and its caches), ``stage_session`` (one upstream
stream: validation, the next hop), ``stage_service`` (the gRPC servicer).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from node import rpc
from node.inference.stage_service import SERVICE_NAME, add_stage_service


def main(argv: list[str] | None = None) -> int:
    """Serve the StageService alone: ``python -m node.inference.stage --port 0 --port-file F``."""
    parser = argparse.ArgumentParser(description="macmesh stage server (no discovery)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    args = parser.parse_args(argv)
    server, health = rpc.make_server()
    add_stage_service(server)
    port = rpc.bind(server, args.host, args.port)
    rpc.mark_serving(health, [SERVICE_NAME])
    server.start()
    if args.port_file is not None:
        tmp = args.port_file.with_suffix(".tmp")
        tmp.write_text(str(port))
        tmp.replace(args.port_file)
    print(f"stage server on {args.host}:{port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=1).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
