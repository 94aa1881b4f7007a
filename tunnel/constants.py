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

# Header byte in front of every chunk
HDR_COMPRESSED = 0x01
HDR_MORE = 0x02
HDR_KNOWN = HDR_COMPRESSED | HDR_MORE

# Rekey policy (applied by the asyncio layer, which has a clock)
REKEY_AFTER_MESSAGES = 1 << 20
REKEY_AFTER_S = 600.0

# Flow control (mux): credit in DATA body bytes. Each side starts with these windows for
# the other; a receiver configured with larger ones grants the difference up front.
INITIAL_STREAM_WINDOW = 256 * 1024
INITIAL_CONNECTION_WINDOW = 4 * 1024 * 1024
MAX_WINDOW = 2**31 - 1  # credit may never grow past this (as HTTP/2)
