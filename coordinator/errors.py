"""The coordinator's one exception tree, translated at the edges (HTTP, tunnel, CLI)."""

from __future__ import annotations


class CoordinatorError(Exception):
    """Any failure the coordinator reports with a message meant for a person."""


class EnrollmentRefused(CoordinatorError):
    """An enrollment token cannot be redeemed; the message says why."""


class UnknownNode(CoordinatorError):
    """No enrolled node has this did."""

    def __init__(self, did: str) -> None:
        super().__init__(f"unknown node {did}")
        self.did = did


class UnknownKey(CoordinatorError):
    """No API key has this id or name."""

    def __init__(self, key: str) -> None:
        super().__init__(f"unknown API key {key!r} (see 'meshgate-coordinator key list')")
        self.key = key


class KeyNameTaken(CoordinatorError):
    """A live API key already has this name; revoke it or pick another name."""

    def __init__(self, name: str, key_id: str) -> None:
        super().__init__(
            f"an API key named {name!r} already exists ({key_id}); "
            "revoke or rotate it, or pick another name"
        )
        self.name = name
        self.key_id = key_id


class StateError(CoordinatorError):
    """The state directory or a file in it is missing, damaged or unsafe."""


class UnknownToken(CoordinatorError):
    """No enrollment token has this id."""

    def __init__(self, token_id: str) -> None:
        super().__init__(f"unknown enrollment token {token_id!r} "
                         "(see 'meshgate-coordinator token list')")
        self.token_id = token_id
