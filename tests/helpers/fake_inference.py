"""TEST DOUBLE: a stand-in InferenceService for the gateway's and client's HTTP/gRPC-layer tests.

It is NOT the cluster's servicer (that lives in the daemon). It exists so the OpenAI gateway
and the typed client can be tested before the daemon serves InferenceService, and it is only
as clever as those layers need: one model, loaded from a real tiny checkpoint and run by the
REAL local runner (``node.inference.runner.LocalRunner``: native MTP or local decode), one
request on the device at a time, a fixed in-flight limit (RESOURCE_EXHAUSTED beyond it), and
stop strings applied to the streamed text. Place / Launch / Unload answer for that one model.

Every request's fate is appended to a JSONL events file (``started`` with the request as
received, then ``finished``, ``cancelled`` or ``failed``) so tests can see what reached the
node and that a disconnect cancelled the call.

Run: ``python tests/helpers/fake_inference.py --checkpoint DIR --events FILE [--port 0]``;
prints ``READY <port>`` on stdout once serving.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from pydantic import ValidationError

from node.cluster.convert import stats_to_proto
from node.cluster.stops import StopMatcher
from node.proto.macmesh.v1 import inference_pb2 as pb
from node.proto.macmesh.v1 import inference_pb2_grpc as pb_grpc
from node.rpc import bind, enable_reflection, make_server, mark_serving

SERVICE = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
DEFAULT_MAX_TOKENS = 256
LOCK_POLL_SECONDS = 0.05


class EventLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def write(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, "time": time.time(), **fields})
        with self._lock, self.path.open("a") as f:
            f.write(line + "\n")


class FakeInferenceService(pb_grpc.InferenceServiceServicer):
    def __init__(self, checkpoint: Path, model_id: str, events: EventLog, max_in_flight: int):
        from node.inference.loading import load_checkpoint
        from node.inference.runner import LocalRunner

        self.loaded = load_checkpoint(checkpoint)
        self.runner = LocalRunner(self.loaded)
        self.model_id = model_id
        self.events = events
        self.max_in_flight = max_in_flight
        self._device = threading.Lock()  # MLX runs one request at a time here
        self._count_lock = threading.Lock()
        self._in_flight = 0

    # ------------------------------------------------------------------ Generate

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator:
        rid = request.request_id
        self.events.write("started", request_id=rid, request=_request_dict(request))
        if request.model != self.model_id:
            self.events.write("failed", request_id=rid, code="NOT_FOUND")
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"model {request.model!r} is not launched (this node serves {self.model_id!r})",
            )
        with self._count_lock:
            admitted = self._in_flight < self.max_in_flight
            self._in_flight += admitted
        if not admitted:
            self.events.write("failed", request_id=rid, code="RESOURCE_EXHAUSTED")
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.max_in_flight} requests already in flight; try again later",
            )
        try:
            yield from self._generate(request, context)
        finally:
            with self._count_lock:
                self._in_flight -= 1

    def _generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator:
        from node.inference.errors import EngineUnavailable
        from node.inference.events import GenerationDone
        from node.inference.requests import RequestError, check_against_model, prompt_token_ids

        rid = request.request_id
        # Validate everything first, then send the response headers: that is the "accepted"
        # signal the gateway waits for before it answers 200 to a streaming HTTP request.
        try:
            engine_request = self._engine_request(request)
            prompt_ids = prompt_token_ids(engine_request, self.loaded.tokenizer)
            _, max_k = self.loaded.mtp_k_limits
            check_against_model(
                engine_request,
                prompt_ids,
                vocab_size=self.loaded.vocab_size,
                context_length=self.loaded.context_length,
                max_k=max_k,
            )
            self.runner.select(engine_request.engine)
        except (ValidationError, ValueError) as exc:  # RequestError is a ValueError
            self.events.write("failed", request_id=rid, code="INVALID_ARGUMENT")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, _message(exc))
        except EngineUnavailable as exc:
            self.events.write("failed", request_id=rid, code="FAILED_PRECONDITION")
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, exc.reason)
        context.send_initial_metadata(())
        while not self._device.acquire(timeout=LOCK_POLL_SECONDS):
            if not context.is_active():
                self.events.write("cancelled", request_id=rid, tokens=0)
                return
        stop = StopMatcher(list(request.stop))
        tokens = 0
        prompt_tokens = len(prompt_ids)
        try:
            for event in self.runner.generate(engine_request):
                if not context.is_active():
                    self.events.write("cancelled", request_id=rid, tokens=tokens)
                    return
                if isinstance(event, GenerationDone):
                    tail = stop.flush()
                    if tail:
                        yield pb.GenerateResponse(delta=pb.TextDelta(text=tail))
                    yield pb.GenerateResponse(
                        final=stats_to_proto(event.stats, event.finish_reason)
                    )
                    self.events.write("finished", request_id=rid, tokens=tokens)
                    return
                tokens += len(event.token_ids)
                text = stop.feed(event.text)
                if text or not stop.stopped:
                    delta = pb.TextDelta(text=text, token_ids=event.token_ids)
                    yield pb.GenerateResponse(delta=delta)
                if stop.stopped:
                    engine, reason = self.runner.select(engine_request.engine)
                    final = pb.GenerationStats(
                        engine=engine,
                        engine_reason=reason,
                        prompt_tokens=prompt_tokens,
                        generation_tokens=tokens,
                        finish_reason="stop",
                    )
                    yield pb.GenerateResponse(final=final)
                    self.events.write("finished", request_id=rid, tokens=tokens)
                    return
        except RequestError as exc:
            self.events.write("failed", request_id=rid, code="INVALID_ARGUMENT")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except EngineUnavailable as exc:
            self.events.write("failed", request_id=rid, code="FAILED_PRECONDITION")
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, exc.reason)
        except GeneratorExit:
            self.events.write("cancelled", request_id=rid, tokens=tokens)
            raise
        finally:
            self._device.release()

    def _engine_request(self, request: pb.GenerateRequest) -> Any:
        from node.inference.requests import GenerateRequest
        from node.inference.sampling import SamplingParams

        s = request.sampling
        sampling = SamplingParams(
            temperature=s.temperature,
            top_p=s.top_p or 1.0,
            top_k=s.top_k,
            min_p=s.min_p,
            repetition_penalty=s.repetition_penalty or 1.0,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            logit_bias=dict(s.logit_bias),
            seed=s.seed if s.HasField("seed") else None,
        )
        engine = request.engine or "auto"
        if engine == "pipeline":
            raise ValueError("engine='pipeline' needs a placement over several nodes")
        prompt: dict[str, Any]
        kind = request.WhichOneof("prompt")
        if kind == "text":
            prompt = {"prompt": request.text, "raw": request.raw}
        elif kind == "prompt_ids":
            prompt = {"prompt_ids": list(request.prompt_ids.ids)}
        elif kind == "messages":
            turns = [{"role": m.role, "content": m.content} for m in request.messages.messages]
            ids = self.loaded.tokenizer.apply_chat_template(
                turns, add_generation_prompt=True, tokenize=True
            )
            prompt = {"prompt_ids": list(ids)}
        else:
            raise ValueError("the request has no prompt (text, prompt_ids or messages)")
        return GenerateRequest(
            **prompt,
            max_tokens=request.max_tokens or DEFAULT_MAX_TOKENS,
            sampling=sampling,
            engine=engine,
            mtp_k=request.mtp_k or None,
            ignore_eos=request.ignore_eos,
        )

    # ------------------------------------------------------------------ the rest

    def ListModels(self, request: Any, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        from node.placement.cards import registry

        models = [self._model_info()]
        for card in registry().values():
            mtp = card.native_mtp
            models.append(
                pb.ModelInfo(
                    id=card.id,
                    model_type=card.model_type,
                    num_layers=card.num_layers,
                    bytes=card.bytes,
                    context_length=card.context_length,
                    native_mtp=pb.NativeMtp(default_k=mtp.default_k, max_k=mtp.max_k)
                    if mtp
                    else None,
                    launched=False,
                )
            )
        return pb.ListModelsResponse(models=models)

    def _model_info(self) -> pb.ModelInfo:
        card = self.loaded.card
        default_k, max_k = self.loaded.mtp_k_limits
        declares_mtp = card is not None and card.native_mtp is not None
        return pb.ModelInfo(
            id=self.model_id,
            model_type=str(self.loaded.config.get("model_type", "")),
            num_layers=self.loaded.num_layers,
            bytes=int(card.bytes) if card is not None else 0,
            context_length=self.loaded.context_length,
            native_mtp=pb.NativeMtp(default_k=default_k, max_k=max_k) if declares_mtp else None,
            launched=True,
        )

    def _instance(self) -> pb.Instance:
        engine, reason = self.runner.select("auto")
        return pb.Instance(
            instance_id=f"{self.model_id}-0",
            model=self.model_id,
            coordinator_node_id="fake-node",
            stages=[
                pb.StageStats(
                    node_id="fake-node",
                    address="127.0.0.1",
                    start_layer=0,
                    end_layer=self.loaded.num_layers,
                )
            ],
            engine=engine,
            engine_reason=reason,
            state="ready",
        )

    def ClusterStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        node = pb.ClusterNode(node_id="fake-node", name="fake", address="127.0.0.1", state="up")
        return pb.ClusterStatusResponse(nodes=[node], instances=[self._instance()])

    def Place(self, request: pb.PlaceRequest, context: grpc.ServicerContext) -> pb.Placement:
        self._known(request.model, context)
        stage = pb.PlannedStage(
            node_id="fake-node", start_layer=0, end_layer=self.loaded.num_layers
        )
        return pb.Placement(model=request.model, stages=[stage], explanation="one node")

    def Launch(self, request: pb.LaunchRequest, context: grpc.ServicerContext) -> Iterator:
        self._known(request.model, context)
        yield pb.LaunchProgress(message=f"{self.model_id} is already loaded on fake-node")
        yield pb.LaunchProgress(instance=self._instance())

    def Unload(self, request: pb.UnloadRequest, context: grpc.ServicerContext) -> Any:
        self._known(request.model, context)
        return pb.UnloadResponse(unloaded=0)

    def _known(self, model: str, context: grpc.ServicerContext) -> None:
        if model != self.model_id:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {model!r}")


def _message(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "request"
        return f"{where}={err.get('input')!r}: {err['msg']}"
    return str(exc)


def _request_dict(request: pb.GenerateRequest) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(request, preserving_proto_field_name=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--model-id", default="tiny-mtp")
    parser.add_argument("--events", type=Path, required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--max-in-flight", type=int, default=4)
    parser.add_argument("--write-checkpoint", action="store_true", help="build it first if absent")
    args = parser.parse_args(argv)

    if args.write_checkpoint and not (args.checkpoint / "config.json").is_file():
        sys.path.insert(0, str(Path(__file__).parent))
        from tiny_checkpoint import write_tiny_checkpoint

        write_tiny_checkpoint(args.checkpoint)

    service = FakeInferenceService(
        args.checkpoint, args.model_id, EventLog(args.events), args.max_in_flight
    )
    server, health = make_server()
    pb_grpc.add_InferenceServiceServicer_to_server(service, server)
    enable_reflection(server, [SERVICE])
    port = bind(server, "127.0.0.1", args.port)
    server.start()
    mark_serving(health, [SERVICE])
    print(f"READY {port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
