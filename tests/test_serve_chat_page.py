"""The chat page at / in headless Chromium (Debian's `chromium`), driven over the DevTools protocol:
type a message, watch the reply stream in, compare it with the API's answer."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import time

import httpx
import pytest
import torch

from services.api.app import build_state, create_app
from services.testing import ServerThread, free_port, tiny_model_dir

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class DevTools:
    def __init__(self, ws_url: str):
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self.ids = itertools.count(1)

    def call(self, method: str, **params):
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(msg["error"])
                return msg.get("result", {})

    def js(self, expr: str):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(r["exceptionDetails"])
        return r["result"].get("value")

    def wait(self, expr: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expr)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(expr)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    before = torch.get_num_threads()
    state = build_state(
        {
            "model": str(tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")),
            "num_threads": 1,
            "default_max_tokens": 40,
            "auth": "none",
            "engine": {"max_num_seqs": 2, "max_model_len": 256},
        }
    )
    with ServerThread(create_app(state)) as srv:
        yield srv
    state.engine.shutdown()
    torch.set_num_threads(before)


@pytest.fixture
def browser(tmp_path):
    if CHROMIUM is None:
        reason = "chromium is not installed (apt-get install chromium): chat page test skipped"
        print(reason)
        pytest.skip(reason)
    port = free_port()
    proc = subprocess.Popen(
        [
            CHROMIUM,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-extensions",
            f"--remote-debugging-port={port}",
            "--remote-allow-origins=*",
            f"--user-data-dir={tmp_path / 'profile'}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                pages = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=2).json()
                page = next(p for p in pages if p["type"] == "page")
                break
            except (httpx.HTTPError, StopIteration, ValueError):
                assert time.monotonic() < deadline, "chromium did not open its DevTools port"
                time.sleep(0.2)
        tools = DevTools(page["webSocketDebuggerUrl"])
        yield tools
        tools.ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_chat_page_streams_a_reply(server, browser):
    browser.call("Page.enable")
    browser.call("Page.navigate", url=f"{server.url}/")
    browser.wait("document.readyState === 'complete' && !!document.getElementById('prompt')")
    assert (
        browser.wait(
            "document.getElementById('model').textContent !== '…' && document.getElementById('model').textContent"
        )
        == "herd"
    )
    # Count the reply's updates: a streamed reply arrives in several pieces.
    browser.js("""window.__updates = 0;
        new MutationObserver(() => window.__updates++).observe(document.getElementById('messages'),
            {subtree: true, characterData: true, childList: true});
        document.getElementById('prompt').value = 'Hello there';
        document.getElementById('form').requestSubmit(); true""")
    browser.wait("['done', 'error'].includes(document.getElementById('messages').dataset.state)")
    state = browser.js("document.getElementById('messages').dataset.state")
    reply = browser.js("document.querySelector('.msg.assistant').textContent")
    updates = browser.js("window.__updates")
    assert state == "done", browser.js("document.getElementById('messages').innerText")
    expected = httpx.post(
        f"{server.url}/v1/chat/completions",
        timeout=60,
        json={"messages": [{"role": "user", "content": "Hello there"}], "temperature": 0},
    ).json()
    print(f"chat page: {updates} DOM updates while streaming, reply {reply[:60]!r}...")
    assert reply == expected["choices"][0]["message"]["content"] and reply
    assert updates >= 3
    assert browser.js("document.querySelector('.msg.user').textContent") == "Hello there"
