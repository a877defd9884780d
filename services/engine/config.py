"""Engine settings (the `engine` part of a Serve config's args)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    max_num_seqs: int = 32  # KV-cache slots = sequences decoded together
    max_model_len: int = 2048  # prompt + completion, per sequence (<= the model's max_seq_len)
    max_num_batched_tokens: int = 512  # token budget of one step (decode tokens + prefill chunks)
    prefill_chunk: int = 256  # longest prefill chunk of one sequence in one step
    block_size: int = 16  # tokens per KV-cache block (paging and prefix-cache granularity)
    enable_prefix_caching: bool = True
    max_queue: int = 256  # waiting requests beyond the slots; more are refused (503)
    num_blocks: int = 0  # KV-cache blocks (0: enough for max_num_seqs sequences of max_model_len)
    cuda_graphs: bool = True  # capture decode steps as CUDA graphs (HERD_CUDA_GRAPHS=0 turns them off)
    cuda_graph_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)  # batch-size buckets, up to max_num_seqs

    @property
    def max_in_flight(self) -> int:
        """Requests the engine holds at once (running and waiting); one more is refused."""
        return self.max_num_seqs + self.max_queue

    @property
    def blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.block_size)

    @property
    def total_blocks(self) -> int:
        """Blocks of the cache, the null block included."""
        return self.num_blocks or self.max_num_seqs * self.blocks_per_seq + 1

    def __post_init__(self):
        for name in ("max_num_seqs", "max_model_len", "max_num_batched_tokens", "prefill_chunk", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"engine.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_blocks and self.num_blocks < 2:
            raise ValueError(f"engine.num_blocks must be 0 (auto) or >= 2, got {self.num_blocks}")
        if self.max_queue < 0:
            raise ValueError(f"engine.max_queue must be >= 0, got {self.max_queue}")
