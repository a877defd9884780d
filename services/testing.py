"""Helpers for tests and benchmarks: a tiny random model folder, and the app on a uvicorn thread."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from pathlib import Path


def tiny_model_dir(out: str | Path, seed: int = 0, **overrides) -> Path:
    """A random `tiny` Llama 3 checkpoint (herd format + Llama 3 tokenizer): loads in a second."""
    import torch

    from model.checkpoint import save_checkpoint
    from model.config import get_preset
    from model.model import Transformer
    from model.tokenizer import llama3_tokenizer

    out = Path(out)
    if (out / "model.safetensors").is_file():
        return out
    cfg = dataclasses.replace(get_preset("tiny"), vocab_size=128256, **overrides)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights(seed=seed, std=0.2)
    save_checkpoint(model, out, tokenizer=llama3_tokenizer())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """Serve a FastAPI app with uvicorn on 127.0.0.1 in a daemon thread."""

    def __init__(self, app, port: int | None = None):
        import uvicorn

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", timeout_graceful_shutdown=1)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
