"""Typed node -> coordinator messages, defined once for both sides.

The node builds these (``node_agent/report.py``) and sends them as control
frames (``msgspec.to_builtins`` -> msgpack); the coordinator validates every
one with :func:`parse` before it touches the registry. A message that fails
(wrong type, NaN or infinite, negative, past a bound, an unknown version) is
a :class:`~meshgate.protocol.ProtocolViolation`: the coordinator closes that
node's session with one log line. Fields a message does not know are ignored
(a newer node may say more); a missing field is "not known".

- :class:`Hello`: who the node is (rides in the handshake's ``info``).
- :class:`Inventory` (``INVENTORY`` frame): per model what scheduling needs:
  loaded, the context it really runs with (``n_ctx``), the memory estimate
  (weights + KV cache), the load time (``load_time_measured`` once measured,
  an estimate until then) and capacity (parallel slots; ``None`` means not
  capped by the node: an upstream that pushes back with its own 429/503).
- :class:`Telemetry` (``TELEMETRY`` frame, at its period): host, GPUs, and per
  model :class:`ModelLoad` (in flight, queued, measured prefill/decode tok/s).
- :class:`LoadDelta` (``TELEMETRY`` frame with ``delta: true``): only the
  models whose load changed, coalesced by the node (at most one per
  ``DELTA_COALESCE_S``).

Version 1; a message without ``v`` is version 1 (nodes from before it was
written). A TELEMETRY body is decoded once, as a full report, whose ``delta``
field says when it is a delta instead (then decoded as one). Decoding is
``msgspec.convert`` over the frame's map (or msgspec's msgpack decoder over its
bytes), checked in C:
measured ~14 us for a full telemetry of a 4-GPU, 4-model node (the msgpack
decode before it, in the tunnel, ~38 us), so 10,000 nodes at 1 Hz cost ~14%
of a core to validate; a hand-written validator in Python would cost more.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import msgpack
import msgspec
from msgspec import Meta, Struct

from meshgate.protocol import ProtocolViolation

PROTOCOL_VERSION = 1
DELTA_COALESCE_S = 0.1

# Bounds: far above any real box, far below what hurts the coordinator (issue 9).
MAX_MODELS = 512  # models in one inventory / telemetry / delta
MAX_NAME = 256  # characters in a model name
MAX_TEXT = 1024  # any other string
MAX_PATH = 4096
MAX_FILES = 1000  # files listed in one inventory (node_agent's MAX_INVENTORY_FILES)
MAX_GPUS = 64
MAX_CORES = 4096
MAX_BYTES = 1 << 50  # 1 PiB
MAX_COUNT = 1_000_000  # requests in flight or queued, parallel slots, context tokens
MAX_CTX = 16 * 1024 * 1024
MAX_TPS = 1e7  # tokens per second
MAX_SECONDS = 86_400.0
MAX_PCT = 1000.0

Version = Annotated[int, Meta(ge=1, le=PROTOCOL_VERSION)]
Name = Annotated[str, Meta(min_length=1, max_length=MAX_NAME)]
Text = Annotated[str, Meta(max_length=MAX_TEXT)]
Path = Annotated[str, Meta(max_length=MAX_PATH)]
Bytes = Annotated[int, Meta(ge=0, le=MAX_BYTES)]
Count = Annotated[int, Meta(ge=0, le=MAX_COUNT)]
Ctx = Annotated[int, Meta(ge=0, le=MAX_CTX)]
Rate = Annotated[float, Meta(ge=0.0, le=MAX_TPS)]
Seconds = Annotated[float, Meta(ge=0.0, le=MAX_SECONDS)]
Pct = Annotated[float, Meta(ge=0.0, le=MAX_PCT)]
Timestamp = Annotated[float, Meta(ge=0.0, le=1e11)]


class _Msg(Struct, kw_only=True, omit_defaults=True, gc=False):
    pass


class Hello(_Msg):
    v: Version = PROTOCOL_VERSION
    host: Text = ""
    version: Text = ""


class ModelInfo(_Msg):
    """One model a node serves, as its inventory states it."""

    name: Name
    loaded: bool = True
    n_ctx: Ctx | None = None  # the context it runs with (llama.cpp n_ctx)
    context_length: Ctx | None = None  # the model's own (GGUF metadata)
    memory_bytes: Bytes | None = None  # estimate: weights + KV cache at n_ctx
    size_bytes: Bytes | None = None  # file size
    load_time_s: Seconds | None = None
    load_time_measured: bool = False
    capacity: Count | None = None  # parallel slots; None: not capped by the node
    kind: Text | None = None
    source: Text | None = None
    available: bool = True

    @property
    def ctx(self) -> int | None:
        """The context it really runs with: n_ctx, else the model's own."""
        return self.n_ctx or self.context_length or None


class FileInfo(_Msg):
    path: Path = ""
    size_bytes: Bytes | None = None
    context_length: Ctx | None = None
    usable: bool = True
    reason: Text | None = None


class Inventory(_Msg):
    v: Version = PROTOCOL_VERSION
    models: Annotated[list[Name | ModelInfo], Meta(max_length=MAX_MODELS)] = []
    files: Annotated[list[FileInfo], Meta(max_length=MAX_FILES)] = []
    files_total: Count = 0

    def entries(self) -> dict[str, ModelInfo]:
        """name -> ModelInfo (a bare name is a model with nothing else known); first wins."""
        out: dict[str, ModelInfo] = {}
        for entry in self.models:
            info = ModelInfo(name=entry) if isinstance(entry, str) else entry
            out.setdefault(info.name, info)
        return out


class ModelLoad(_Msg):
    """One model's load right now (telemetry and deltas)."""

    loaded: bool | None = None
    in_flight: Count | None = None
    queued: Count | None = None
    queue: Count | None = None  # older nodes' name for `queued`
    prefill_tps: Rate | None = None
    decode_tps: Rate | None = None
    load_time_s: Seconds | None = None
    load_time_measured: bool = False
    capacity: Count | None = None
    n_ctx: Ctx | None = None
    memory_bytes: Bytes | None = None
    rss_bytes: Bytes | None = None

    @property
    def waiting(self) -> int:
        return self.queued if self.queued is not None else (self.queue or 0)


class HostInfo(_Msg):
    cpu_count: Annotated[int, Meta(ge=0, le=MAX_CORES)] | None = None
    cpu_util_pct: Pct | None = None
    load_avg: Annotated[list[Annotated[float, Meta(ge=0, le=1e6)]], Meta(max_length=3)] = []
    mem_total_bytes: Bytes | None = None
    mem_available_bytes: Bytes | None = None
    swap_total_bytes: Bytes | None = None
    swap_used_bytes: Bytes | None = None


class GpuInfo(_Msg):
    index: Annotated[int, Meta(ge=0, le=MAX_GPUS)] = 0
    name: Text | None = None
    uuid: Text | None = None
    vram_total_bytes: Bytes | None = None
    vram_used_bytes: Bytes | None = None
    vram_free_bytes: Bytes | None = None
    gpu_util_pct: Pct | None = None
    mem_util_pct: Pct | None = None
    temperature_c: Annotated[float, Meta(ge=-100, le=300)] | None = None
    power_draw_w: Annotated[float, Meta(ge=0, le=1e5)] | None = None


class Telemetry(_Msg):
    v: Version = PROTOCOL_VERSION
    ts: Timestamp | None = None
    host: HostInfo | None = None
    gpus: Annotated[list[GpuInfo], Meta(max_length=MAX_GPUS)] = []
    runtime: Annotated[dict[Name, ModelLoad], Meta(max_length=MAX_MODELS)] = {}
    delta: Any = None
    """Never set on a full report (left out of its map): a TELEMETRY body that decodes
    with ``delta: true`` is a :class:`LoadDelta`, decoded again as one. Here so that one
    typed pass reads a full report and its kind at once (`parse_telemetry`)."""


class LoadDelta(_Msg):
    delta: Literal[True]
    v: Version = PROTOCOL_VERSION
    models: Annotated[dict[Name, ModelLoad], Meta(max_length=MAX_MODELS)] = {}


M = TypeVar("M", bound=_Msg)


def parse(body: Any, kind: type[M]) -> M:
    """Validate a control frame's body as `kind`, or raise ProtocolViolation saying why."""
    if not isinstance(body, dict):
        raise ProtocolViolation(f"{kind.__name__.lower()} must be a map")
    try:
        return msgspec.convert(body, kind)
    except msgspec.ValidationError as exc:
        raise ProtocolViolation(f"bad {kind.__name__.lower()}: {_short(str(exc))}") from None


class _DeltaOrNot(Struct):
    delta: Any = None


_WHICH = msgspec.msgpack.Decoder(_DeltaOrNot)
_TELEMETRY = msgspec.msgpack.Decoder(Telemetry)
_DELTA = msgspec.msgpack.Decoder(LoadDelta)


def parse_telemetry(body: Any) -> Telemetry | LoadDelta:
    """A TELEMETRY frame: the full report, or a load delta (``delta: true``). `body` is the
    decoded map, or its msgpack bytes (the coordinator's tunnel hands telemetry on
    undecoded, `Mux(raw_bodies=...)`): decoded here straight into the typed message, one
    pass in C, with the same checks (unknown fields are skipped unread)."""
    if isinstance(body, bytes):
        return _parse_msgpack(body)
    if isinstance(body, dict) and body.get("delta") is True:
        return parse(body, LoadDelta)
    return parse(body, Telemetry)


def as_received(body: bytes) -> dict[str, Any]:
    """The map of a message that `parse_telemetry` took as msgpack bytes, decoded as the
    tunnel decodes any control body (str keys, no ext types), for views of what a node
    sent; {} if it does not decode so (only unknown fields, skipped by the typed decode,
    can hold such things)."""
    try:
        value = msgpack.unpackb(body, raw=False, strict_map_key=True, max_ext_len=0)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        return {}
    return value if isinstance(value, dict) else {}


def _parse_msgpack(body: bytes) -> Telemetry | LoadDelta:
    if not body or not (0x80 <= body[0] <= 0x8F or body[0] in (0xDE, 0xDF)):
        raise ProtocolViolation("telemetry must be a map")
    try:  # the usual message, a full report: one typed pass reads it and its kind
        report = _TELEMETRY.decode(body)
        if report.delta is not True:
            return report
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        pass  # worded below, as the kind its `delta` says (a delta is read as one)
    return _parse_by_kind(body)


def _parse_by_kind(body: bytes) -> Telemetry | LoadDelta:
    kind: type[_Msg] = Telemetry
    try:
        if _WHICH.decode(body).delta is True:
            kind = LoadDelta
            return _DELTA.decode(body)
        return _TELEMETRY.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ProtocolViolation(f"bad {kind.__name__.lower()}: {_short(str(exc))}") from None
    except RecursionError:
        raise ProtocolViolation(f"bad {kind.__name__.lower()}: nested too deep") from None


def to_wire(message: _Msg) -> dict[str, Any]:
    """The map to send: defaults left out, the version always in."""
    out: dict[str, Any] = msgspec.to_builtins(message)
    version = getattr(message, "v", None)
    if version is not None:
        out["v"] = version
    return out


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
