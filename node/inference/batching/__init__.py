"""Continuous batching for single-node instances.

``scheduler.BatchScheduler`` owns the device of one instance: a worker thread that admits
requests into the running batch between steps (up to ``max_batch``), steps every batch, and
streams each sequence's events to its caller. What one step computes is a pluggable
``StepFunction`` (``steps.py``): plain batched decode on mlx-lm's ``BatchGenerator``, and batched
native MTP (``mtp_step.py``: the batch drafts and verifies together).
"""
