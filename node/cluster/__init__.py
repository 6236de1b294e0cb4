"""The cluster as a product: instances, the per-instance engine selector, the InferenceService.

service.install(daemon)    host InferenceService + StageService on a daemon (before start)
service.py                 the gRPC servicer: turns each RPC into calls of the modules below
generate.py                one Generate on the coordinator: check, admit, run, stream
routing.py                 where a request goes (this node or a peer), the peers' view, the relay
peers.py                   calls to other nodes' InferenceService, one pooled channel per peer
convert.py                 the engine edge: API options -> engine request, last event -> stats
errors.py                  the gRPC status each failure goes out with
limits.py                  per-node request limits
coordinator.py             launch (plan, engine, load, progress), unload, peer failures, take-over
failover.py                who takes over a dead coordinator's instance, where lost layers go (pure)
admission.py               memory admission for launches (RESOURCE_EXHAUSTED, not out of memory)
live.py                    running instances: admission (the queue), cancellation, engines
instances.py               InstanceInfo (what every node sees), the registry, pick_instance
selector.py                the per-instance engine decision and per-request overrides
stage_host.py              the StageService a daemon hosts, orphaned-shard cleanup
catalog.py                 MODEL -> card + checkpoint; the model list
stops.py                   stop strings
local.py                   a throwaway cluster of daemons on this machine (macmesh demo)
"""
