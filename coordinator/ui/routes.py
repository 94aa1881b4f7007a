"""The web pane (`/ui`): not yet built."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter

if TYPE_CHECKING:
    from coordinator.admin_api import AdminContext


def ui_router(ctx: AdminContext) -> APIRouter:
    del ctx
    return APIRouter()
