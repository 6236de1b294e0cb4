"""macmesh: one LLM inference cluster from a handful of Apple-silicon Macs."""

__version__ = "0.1.0"
