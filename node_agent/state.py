"""The node's state directory: its identity keys and what enrollment pinned.

Everything secret is written with mode 0600 from the moment the file exists
(os.open with the mode, never chmod afterwards), and the directory is 0700.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tunnel import Identity

IDENTITY_FILE = "identity.key"
ENROLLMENT_FILE = "coordinator.json"


@dataclass(frozen=True, slots=True)
class Enrollment:
    """What `meshgate-node enroll` learned and pinned: where to connect and whom to trust."""

    url: str
    coordinator_key: bytes
    did: str
    labels: dict[str, str]
    enrolled_at: float

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["coordinator_key"] = base64.b64encode(self.coordinator_key).decode()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Enrollment:
        return cls(
            url=str(data["url"]),
            coordinator_key=base64.b64decode(data["coordinator_key"]),
            did=str(data["did"]),
            labels={str(k): str(v) for k, v in dict(data.get("labels") or {}).items()},
            enrolled_at=float(data["enrolled_at"]),
        )


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(path)


class NodeState:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)

    @property
    def run_dir(self) -> Path:
        run = self.path / "run"
        run.mkdir(exist_ok=True, mode=0o700)
        return run

    def identity(self) -> Identity:
        """The node's identity, created on first use."""
        from tunnel import Identity  # deferred: the tunnel (and its crypto) only when needed

        key_file = self.path / IDENTITY_FILE
        if key_file.exists():
            return Identity.from_bytes(key_file.read_bytes())
        identity = Identity.generate()
        _write_private(key_file, identity.to_bytes())
        return identity

    def enrollment(self) -> Enrollment | None:
        path = self.path / ENROLLMENT_FILE
        if not path.exists():
            return None
        return Enrollment.from_json(json.loads(path.read_text()))

    def save_enrollment(self, enrollment: Enrollment) -> None:
        data = json.dumps(enrollment.to_json(), indent=2).encode()
        _write_private(self.path / ENROLLMENT_FILE, data)
