"""Running a model: loading, sampling, the local, native-MTP and batched engines, pipeline stages
and the pipeline coordinators. Everything below the cluster layer that touches tensors lives
here; docs/architecture.md#module-map has one line per module."""
