"""herd's serving engine: a pure core (no Ray), vLLM-like.

* `scheduler.Scheduler` decides each step: admission into KV-cache slots, prefix-cache reuse,
  chunked prefill under a token budget, decode of every running sequence, cancellation.
  It is plain Python and never touches tensors.
* `runner.ModelRunner` executes a step: batched decode over the selected slots, padded batched
  prefill chunks, prefix copies between slots, per-request sampling.
* `engine.LLMEngine` joins the two (`add_request`, `abort`, `step`); `async_engine.AsyncLLMEngine`
  runs it on a background thread and streams outputs to asyncio callers.
"""

from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine, RequestOutput
from services.engine.errors import ContextLengthError, EngineError, QueueFullError
from services.engine.sequence import Sequence

__all__ = [
    "EngineConfig",
    "LLMEngine",
    "RequestOutput",
    "Sequence",
    "ContextLengthError",
    "EngineError",
    "QueueFullError",
]
