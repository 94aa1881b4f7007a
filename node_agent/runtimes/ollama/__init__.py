"""A local Ollama server's models as runtimes (through the official ``ollama`` client)."""

from node_agent.runtimes.ollama.host import OllamaHost, OllamaModel, merge_models, ollama_error
from node_agent.runtimes.ollama.runtime import OllamaRuntime

__all__ = ["OllamaHost", "OllamaModel", "OllamaRuntime", "merge_models", "ollama_error"]
