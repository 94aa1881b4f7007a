"""Fixtures shared by the store's test files (tests/coordinator/test_store*.py)."""

from tests.coordinator.store_harness import open_store, store

__all__ = ["open_store", "store"]
