"""OpenAI-compatible HTTP gateway over a node's gRPC InferenceService."""

from node.gateway.app import create_app
from node.gateway.openapi import openapi_document

__all__ = ["create_app", "openapi_document"]
