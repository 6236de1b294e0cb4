"""The cluster as a product: instances, the per-instance engine selector, the InferenceService.

service.install(daemon)    host InferenceService + StageService on a daemon (before start)
service.py                 the gRPC servicer: Generate, ListModels, ClusterStatus, Place,
                           Launch, Unload; forwarding to coordinators; status codes
coordinator.py             launch (plan, engine, load, progress), unload, peer failures
live.py                    running instances: admission, cancellation, local / pipeline
instances.py               InstanceInfo (what every node sees), the registry, pick_instance
selector.py                the per-instance engine decision and per-request overrides
catalog.py                 MODEL -> card + checkpoint; the model list
peers.py                   calls to other nodes' InferenceService
convert.py                 wire <-> engine requests and stats
stops.py                   stop strings
local.py                   a throwaway cluster of daemons on this machine (macmesh demo)
"""
