"""The HTTP gateway over a node's gRPC InferenceService: OpenAI (chat, completions, responses),
Anthropic Messages and Ollama APIs, Prometheus ``/metrics`` and the dashboard."""

from node.gateway.app import create_app
from node.gateway.openapi import openapi_document

__all__ = ["create_app", "openapi_document"]
