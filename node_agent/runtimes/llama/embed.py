"""Embeddings in the llama.cpp runner: a second context, made on the first request.

What llama-cpp-python needs for OpenAI-style embeddings of a generative model:

- a context created with ``embedding=True`` and a pooling type: a model like
  SmolLM2 declares none, so llama.cpp would hand back one vector per token;
  we ask for mean pooling (a model that declares its own pooling keeps it);
- ``n_batch`` and ``n_ubatch`` as large as its context: a pooled sequence
  must fit one micro-batch;
- vectors normalised to unit length, as OpenAI's and Ollama's are.

The generating context could be made with ``embedding=True`` too (llama.cpp
still samples from it), but then every prompt token outputs logits, which
costs memory and prefill time on every chat request. So the runner keeps its
generating ``Llama`` as it is and opens a second ``Llama`` on the same file
for embeddings, lazily, on the first ``/v1/embeddings`` request. Both map the
same GGUF file (mmap), so the weights are in memory once; the second context
costs its KV cache and compute buffers, and llama.cpp still computes logits
for every input token (n_vocab floats each, ~0.4 MiB a token for SmolLM2's
49k vocabulary), so its context is short: ``--embed-n-ctx``, 512 tokens by
default; a longer input is OpenAI's 400 ``context_length_exceeded``.
Measured with ``scripts/bench/embed_memory.py`` (SmolLM2-135M Q4_1, n_ctx
2048): the runner's USS 131 MiB generating only, 211 MiB after a first short
embedding (+80), 343 MiB after a 460-token one (+211; RSS +303). Requests
still run one at a time on the runner's single worker thread.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable
from typing import Any

import llama_cpp
from gguf import GGUFReader

from meshgate.openai import OpenAIError, context_exceeded

__all__ = ["Embedder", "encode_vector", "open_embedder"]


def open_embedder(
    model_path: str, *, n_ctx: int, n_gpu_layers: int = 0, n_threads: int | None = None
) -> llama_cpp.Llama:
    """A ``Llama`` on `model_path` for embeddings: mean pooling unless the model says."""
    declared = any(k.endswith(".pooling_type") for k in GGUFReader(model_path).fields)
    pooling = (llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED if declared
               else llama_cpp.LLAMA_POOLING_TYPE_MEAN)
    return llama_cpp.Llama(
        model_path=model_path,
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        n_gpu_layers=n_gpu_layers,
        n_threads=n_threads,
        embedding=True,
        pooling_type=pooling,
        verbose=False,
    )


def encode_vector(vector: list[float], encoding: str | None) -> list[float] | str:
    """One embedding as OpenAI sends it: floats, or base64 of little-endian float32."""
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


class Embedder:
    """Answers ``/v1/embeddings`` bodies with a ``Llama`` made on first use (worker thread)."""

    def __init__(self, name: str, make: Callable[[], llama_cpp.Llama]) -> None:
        self.name = name
        self._make = make
        self.llm: llama_cpp.Llama | None = None

    def _texts(self, llm: llama_cpp.Llama, given: Any) -> list[str]:
        items = [given] if isinstance(given, str) else list(given)
        if items and isinstance(items[0], int):  # one array of token ids
            items = [items]
        return [x if isinstance(x, str) else llm.detokenize(x).decode("utf-8", "replace")
                for x in items]

    def open(self) -> llama_cpp.Llama:
        if self.llm is None:
            self.llm = self._make()
        return self.llm

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        """The OpenAI response for a validated embeddings request body."""
        llm = self.open()
        texts = self._texts(llm, body["input"])
        window = llm.n_ctx()
        for text in texts:
            count = len(llm.tokenize(text.encode("utf-8")))
            if count > window:
                raise context_exceeded(window, count, None, param="input", hop="runner")
        dims = body.get("dimensions")
        if dims is not None and dims != llm.n_embd():
            raise OpenAIError(400, f"{self.name} makes embeddings of {llm.n_embd()} dimensions; "
                              f"it cannot make {dims}", param="dimensions", hop="runner")
        vectors, tokens = llm.embed(texts, normalize=True, truncate=False, return_count=True)
        encoding = body.get("encoding_format")
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": encode_vector(v, encoding)}
                for i, v in enumerate(vectors)
            ],
            "model": self.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None
