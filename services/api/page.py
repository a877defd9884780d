"""GET /: the chat page (static HTML + JS; streams from /v1/chat/completions)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()
PAGE = Path(__file__).resolve().parents[1] / "static" / "chat.html"


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def chat_page():
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))
