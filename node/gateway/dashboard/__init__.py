"""The dashboard at ``/``: nodes with memory bars, instances with their stages drawn as a
pipeline, engine and reason, live tok/s and native-MTP acceptance (the page polls
``/dashboard/api/state`` every two seconds), and a "try it" chat box that streams from
``/v1/chat/completions``.

Plain HTML, CSS and JavaScript shipped as package data: no build step and nothing fetched from
elsewhere (a cluster's machines need no internet). Behind the API key like every other path; a
browser answers the gateway's Basic challenge with the key as the password.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from aiohttp import web

from node.client import MacmeshError
from node.gateway.generation import CLIENT, METRICS

PREFIX = "/dashboard/"
STATE_PATH = "/dashboard/api/state"
POLL_SECONDS = 2.0
_FILES = {"app.js": "text/javascript", "style.css": "text/css", "index.html": "text/html"}


def is_dashboard(path: str) -> bool:
    return path == "/" or path.startswith(PREFIX)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_get(STATE_PATH, state)
    app.router.add_get(PREFIX + "{name}", asset)


def _read(name: str) -> bytes:
    return resources.files(__package__).joinpath(name).read_bytes()


async def index(request: web.Request) -> web.Response:
    return web.Response(body=_read("index.html"), content_type="text/html", charset="utf-8")


async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in _FILES:
        raise web.HTTPNotFound(reason=f"no dashboard file {name!r}")
    return web.Response(body=_read(name), content_type=_FILES[name], charset="utf-8")


def acceptance_by_model(metrics: Any) -> dict[str, float]:
    """Accepted / proposed native-MTP drafts per model, over the requests this gateway served."""
    proposed: dict[str, float] = {}
    accepted: dict[str, float] = {}
    for counter, into in ((metrics.mtp_proposed, proposed), (metrics.mtp_accepted, accepted)):
        for family in counter.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    into[sample.labels["model"]] = sample.value
    return {m: accepted.get(m, 0.0) / p for m, p in proposed.items() if p > 0}


async def state(request: web.Request) -> web.Response:
    """Everything the page draws, in one poll."""
    try:
        status = await request.app[CLIENT].cluster_status(timeout=5.0)
    except MacmeshError as exc:
        return web.json_response({"ok": False, "error": exc.message, "nodes": [], "instances": []})
    names = {n.node_id: n.name for n in status.nodes}
    acceptance = acceptance_by_model(request.app[METRICS])
    instances = []
    for inst in status.instances:
        body = inst.model_dump(mode="json")
        for stage in body["stages"]:
            stage["name"] = names.get(stage["node_id"], stage["node_id"])
        # the gateway counts drafts by the name requests used: the instance id or the model
        mtp = inst.engine == "native_mtp"
        body["acceptance"] = (
            acceptance.get(inst.instance_id, acceptance.get(inst.model)) if mtp else None
        )
        instances.append(body)
    return web.json_response(
        {
            "ok": True,
            "error": None,
            "poll_seconds": POLL_SECONDS,
            "nodes": [n.model_dump(mode="json") for n in status.nodes],
            "instances": instances,
        }
    )
