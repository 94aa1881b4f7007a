"""Every protocol constant of the tunnel, in one place (as wireguard-go's constants.go)."""

from __future__ import annotations

# Handshake
PROTOCOL_NAME = b"Noise_IK_25519_ChaChaPoly_BLAKE2s"
PROLOGUE = b"meshgate/1"
HELLO_VERSION = 1
BINDING_CONTEXT = b"meshgate-tunnel-key-v1:"
MAX_SKEW_MS = 5 * 60 * 1000
MAX_HANDSHAKE_MESSAGE = 4096  # message 1 and 2 ride in an HTTP header, base64 encoded
HANDSHAKE_HEADER = "X-Meshgate-Handshake"

# Noise transport
MAX_MESSAGE = 65535  # one websocket message = one Noise transport message, tag included
TAG_LEN = 16
MAX_NONCE = 2**64 - 1  # reserved by the Noise spec for rekey(); never used for a message

# Frames
MAX_ID = 2**31 - 1  # stream ids, seq numbers and flags are 0 .. MAX_ID
MAX_FRAME = 16 * 1024 * 1024  # reassembled, decompressed msgpack payload of one frame
COMPRESS_MIN = 512  # payloads shorter than this are never compressed
# ... and per frame type, where a larger floor measures better. TELEMETRY (11): a node's
# report (~1 KiB, `node_frames.py`) goes once a second to one coordinator that reads
# thousands: zstd costs the node ~11 us and the coordinator ~3-5 us a frame to save
# ~0.5-0.8 KiB a second a node (SCHEDULER.md, "seventh pass"); larger ones are compressed.
COMPRESS_MIN_BY_TYPE: dict[int, int] = {11: 4096}

# Header byte in front of every chunk
HDR_COMPRESSED = 0x01
HDR_MORE = 0x02
HDR_KNOWN = HDR_COMPRESSED | HDR_MORE

# Rekey policy (applied by the asyncio layer, which has a clock)
REKEY_AFTER_MESSAGES = 1 << 20
REKEY_AFTER_S = 600.0

# Liveness (`Connection.tick`). The coordinator pings every node every RTT_PING_S (its
# RTT, and the node's proof that the coordinator lives), each link at its own phase; the
# node pings only after QUIET_PING_S of hearing nothing at all (the period plus slack for
# a late timer); a PING unanswered for PING_TIMEOUT_S drops the link. Bounds: a node drops
# a silent coordinator (or a proxy that keeps TCP open and forwards nothing) within
# QUIET_PING_S + PING_TIMEOUT_S (90 s) of the last frame it heard; a coordinator drops a
# silent node within RTT_PING_S + PING_TIMEOUT_S (80 s; its links' shared timer adds up to
# TIMER_GRAIN_S, 0.25 s: tunnel/timers.py). An idle healthy link carries one PING and one
# PONG per RTT_PING_S.
RTT_PING_S = 60.0
QUIET_PING_S = 70.0
PING_TIMEOUT_S = 20.0

# Flow control (mux): credit in DATA body bytes. Each side starts with these windows for
# the other; a receiver configured with larger ones grants the difference up front.
INITIAL_STREAM_WINDOW = 256 * 1024
INITIAL_CONNECTION_WINDOW = 4 * 1024 * 1024
MAX_WINDOW = 2**31 - 1  # credit may never grow past this (as HTTP/2)

# Coalescing: several small whole frames in one Noise message (header bit 2), each
# prefixed by its length (2 bytes, big-endian). Frames that are compressed or need
# fragmenting always go alone.
HDR_BATCH = 0x04
# Frame flags (bits of a frame's `flags`; a receiver ignores bits it does not know)
# On OPEN: the opener reads an END that carries the answer's (last) DATA (FLAG_DATA), so
# the peer may send a whole answer as one frame (`Connection.send_last`).
FLAG_FUSE = 0x01
# On END: its body's "data" (bytes) is the stream's last DATA, before the END: credit and
# events as if it had come as its own DATA frame first.
FLAG_DATA = 0x01
BATCH_LEN = 2

# -- Bounds on what a peer may make this side hold (hostile-node defence) ----------------
# Per-type caps on a frame's decoded msgpack payload, checked *before* decompressing (a
# zstd frame declares its size; the type is read from its first two bytes). Measured on a
# real node (SmolLM2 on llama.cpp, `scripts/bench/node_frames.py`, 2026-11-26): TELEMETRY
# 996 bytes, INVENTORY 95 bytes (one model; node_agent/daemon.py estimates ~300 bytes a
# model with files), GOAWAY 40 bytes. Caps leave wide headroom over those (256x for
# TELEMETRY, a box with ~10,000 models), and sit far below MAX_FRAME, so a burst of
# frames declaring 16 MiB each is refused at the first one.
KiB = 1024
MiB = 1024 * 1024
# OPEN carries one API request: the public API's body limit is 4 MiB of JSON, and msgpack
# of parsed JSON is at most ~2x it (floats: 9 bytes for "0.1,").
FRAME_CAPS: dict[int, int] = {
    1: 8 * MiB,  # OPEN
    # 2 DATA: bounded by the receiver's stream window (credit); see DATA_CAP_SLACK
    3: 64 * KiB,  # END (usage, a few fields)
    4: 64 * KiB,  # ERROR (status, message)
    5: 64,  # CANCEL (nil)
    6: 64,  # WINDOW {"credit": int}
    7: 64,  # PING {"t": int}
    8: 64,  # PONG {"t": int}
    9: 8 * KiB,  # GOAWAY {"reason", "last_stream"}
    10: 64,  # KEY_UPDATE (nil)
    11: 256 * KiB,  # TELEMETRY (996 bytes measured)
    12: 4 * MiB,  # INVENTORY (95 bytes for one model; ~300 a model with files: ~10,000)
    13: 1 * MiB,  # COMMAND
    14: 1 * MiB,  # RESULT
}
DATA_CAP_SLACK = 64  # msgpack framing around a DATA body as large as the whole window
# Streams the peer may hold open at once on one link. Upward (node-opened, at the
# coordinator): a node relays its local apps' requests for models it lacks; 256 is well
# past a box's concurrent local clients. Downward (coordinator-opened, at the node): the
# coordinator is trusted more, but a cap still bounds memory.
MAX_UPWARD_STREAMS = 256
MAX_DOWNWARD_STREAMS = 4096
# OPEN payload bytes of the peer's streams that are open now, per link: what a peer can
# make this side hold in request bodies at once (DATA is bounded by credit).
MAX_OPEN_BYTES = 64 * MiB
# Decoded control frames (stream 0) queued for the control handler, per link: past this
# the reader stops reading the socket until the handler catches up (backpressure).
MAX_CONTROL_QUEUED = 4 * MiB
