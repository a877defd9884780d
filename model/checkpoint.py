"""Checkpoint I/O: herd's native directory, plus import from GGUF / HF / Meta and export to HF.

Native layout (a directory):
  herd.json          ModelConfig fields
  model.safetensors  state dict with herd's (Meta-style) names, rotate-half rotary layout
  tokenizer.json     the tokenizer (model/tokenizer.py's own format)
A training checkpoint's `model/` folder holds the weights as torch.distributed.checkpoint (DCP)
shards (`.metadata`, `__<rank>_<n>.distcp`) in place of model.safetensors; `read_weights` and
`load_model` consolidate them offline, in one process, and `consolidate` writes the native folder.

Only safetensors and `torch.load(weights_only=True)` touch weight files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from model.config import ConfigError, ModelConfig, RopeScaling
from model.errors import HerdError
from model.model import Transformer

NATIVE_CONFIG = "herd.json"
WEIGHTS = "model.safetensors"
DCP_METADATA = ".metadata"


# --- native format ---------------------------------------------------------------------------


def save_checkpoint(model: Transformer, out_dir: str | Path, tokenizer=None) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save(out / NATIVE_CONFIG)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS), metadata={"format": "herd"})
    if tokenizer is not None:
        tokenizer.save(out)
    return out


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load a herd directory, an HF directory or a .gguf file; returns (model, config)."""
    path = Path(path)
    if not path.exists():
        raise HerdError(f"{path}: model not found")
    if path.suffix == ".gguf":
        cfg, state = read_gguf(path)
    elif (path / NATIVE_CONFIG).is_file():
        cfg = ModelConfig.load(path / NATIVE_CONFIG)
        state = read_weights(path)
    elif (path / "config.json").is_file():
        cfg, state = read_hf(path)
    elif (path / "model" / NATIVE_CONFIG).is_file():  # a training checkpoint: its model/ folder
        return load_model(path / "model", dtype, device)
    else:
        raise HerdError(f"{path}: not a herd checkpoint ({NATIVE_CONFIG}), HF directory (config.json) or .gguf file")
    return build_model(cfg, state, source=path, dtype=dtype, device=device), cfg


def build_model(cfg: ModelConfig, state: dict, source, dtype=torch.float32, device="cpu") -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise HerdError(
            f"{source}: weights do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise HerdError(
                f"{source}: tensor {name} has shape {tuple(state[name].shape)}, config expects {tuple(tensor.shape)}"
            )
    model = model.to_empty(device=device)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    model.init_rope()
    return model.to(dtype=dtype).eval()


def read_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """A native folder's weights: model.safetensors, or DCP shards consolidated (no processes)."""
    model_dir = Path(model_dir)
    if (model_dir / WEIGHTS).is_file() or not (model_dir / DCP_METADATA).is_file():
        return _read_safetensors(model_dir / WEIGHTS)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(model_dir))
    try:
        meta = reader.read_metadata()
        state = {
            k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
            for k, m in meta.state_dict_metadata.items()
            if isinstance(m, TensorStorageMetadata)
        }
        dcp.load(state, storage_reader=reader, no_dist=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise HerdError(f"{model_dir}: unreadable sharded (DCP) weights ({e})") from None
    return state


def consolidate(model_dir: str | Path, out_dir: str | Path) -> Path:
    """A training checkpoint's model/ folder (DCP shards) as a native folder (one safetensors file)."""
    import shutil

    from safetensors.torch import save_file

    src, out = Path(model_dir), Path(out_dir)
    cfg = ModelConfig.load(src / NATIVE_CONFIG)
    state = build_model(cfg, read_weights(src), source=src).state_dict()  # checks names and shapes
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != DCP_METADATA and f.suffix != ".distcp":
            shutil.copy2(f, out / f.name)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / WEIGHTS), metadata={"format": "herd"})
    return out


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise HerdError(f"{path}: weights file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise HerdError(f"{path}: unreadable safetensors file ({e})") from None


# --- rotary layout ---------------------------------------------------------------------------


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta/GGUF store q,k rows with rotary pairs interleaved; herd (like HF) rotates halves."""
    out_dim = w.shape[0]
    return w.view(n_heads, out_dim // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out_dim = w.shape[0]
    return w.view(n_heads, 2, out_dim // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# --- GGUF --------------------------------------------------------------------------------------

_GGUF_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_norm": "attention_norm",
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
}


def read_gguf(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Dequantize every tensor to float32 and undo llama.cpp's rotary permutation."""
    import gguf

    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on short files
        raise HerdError(f"{path}: unreadable GGUF file ({type(e).__name__}: {e})") from None

    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise HerdError(f"{path}: GGUF architecture {arch!r} is not llama")
    vocab = field("llama.vocab_size") or len(field("tokenizer.ggml.tokens", []))
    names = {t.name for t in reader.tensors}
    eos = [int(field("tokenizer.ggml.eos_token_id"))]
    try:
        cfg = ModelConfig(
            dim=int(field("llama.embedding_length")),
            n_layers=int(field("llama.block_count")),
            n_heads=int(field("llama.attention.head_count")),
            n_kv_heads=int(field("llama.attention.head_count_kv", field("llama.attention.head_count"))),
            vocab_size=int(vocab),
            ffn_hidden_dim=int(field("llama.feed_forward_length")),
            norm_eps=float(field("llama.attention.layer_norm_rms_epsilon")),
            rope_theta=float(field("llama.rope.freq_base", 10000.0)),
            max_seq_len=int(field("llama.context_length", 8192)),
            tie_embeddings="output.weight" not in names,
            bos_token_id=field("tokenizer.ggml.bos_token_id"),
            eos_token_ids=tuple(eos),
            tokenizer="gguf",
        )
    except (TypeError, ConfigError) as e:
        raise HerdError(f"{path}: incomplete llama metadata ({e})") from None

    state = {}
    for t in reader.tensors:
        name = _gguf_to_herd_name(t.name)
        if name is None:
            continue
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise HerdError(f"{path}: tensor {t.name} cannot be dequantized ({e})") from None
        w = torch.from_numpy(arr.copy()).float()
        if name.endswith("attention.wq.weight"):
            w = interleaved_to_half(w, cfg.n_heads)
        elif name.endswith("attention.wk.weight"):
            w = interleaved_to_half(w, cfg.n_kv_heads)
        state[name] = w
    return cfg, state


def _gguf_to_herd_name(name: str) -> str | None:
    if name in _GGUF_NAMES:
        return _GGUF_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if m and m.group(2) in _GGUF_LAYER_NAMES:
        return f"layers.{m.group(1)}.{_GGUF_LAYER_NAMES[m.group(2)]}.weight"
    return None  # e.g. rope_freqs: recomputed from the config


# --- Hugging Face ----------------------------------------------------------------------------

_HF_LAYER_NAMES = {
    "input_layernorm": "attention_norm",
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
}
_HF_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}


def hf_to_herd_name(name: str) -> str | None:
    if name in _HF_NAMES:
        return _HF_NAMES[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name)
    if m and m.group(2) in _HF_LAYER_NAMES:
        return f"layers.{m.group(1)}.{_HF_LAYER_NAMES[m.group(2)]}.weight"
    return None


def herd_to_hf_name(name: str) -> str:
    for hf, herd in _HF_NAMES.items():
        if name == herd:
            return hf
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", name)
    for hf, herd in _HF_LAYER_NAMES.items():
        if m and m.group(2) == herd:
            return f"model.layers.{m.group(1)}.{hf}.weight"
    raise KeyError(name)


def read_hf(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    path = Path(path)
    try:
        hf = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise HerdError(f"{path / 'config.json'}: not valid JSON ({e})") from None
    if hf.get("model_type") != "llama":
        raise HerdError(f"{path / 'config.json'}: model_type {hf.get('model_type')!r} is not llama")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    scaling = None
    if rope.get("rope_type", rope.get("type")) == "llama3":
        scaling = RopeScaling(
            rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"]
        )
    eos = hf.get("eos_token_id")
    try:
        cfg = ModelConfig(
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
            vocab_size=hf["vocab_size"],
            ffn_hidden_dim=hf["intermediate_size"],
            norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            max_seq_len=hf.get("max_position_embeddings", 8192),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [eos] if eos is not None else []),
            tokenizer="llama3" if hf["vocab_size"] == 128256 else "external",
        )
    except KeyError as e:
        raise HerdError(f"{path / 'config.json'}: missing field {e}") from None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise HerdError(f"{path}: no *.safetensors weights")
    state = {}
    for f in files:
        for name, tensor in _read_safetensors(f).items():
            herd = hf_to_herd_name(name)
            if herd is not None:
                state[herd] = tensor
    if cfg.tie_embeddings:
        state.pop("output.weight", None)
    return cfg, state


def hf_config_dict(cfg: ModelConfig) -> dict:
    """transformers' LlamaConfig fields for this config."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope = {
            "rope_type": "llama3",
            "rope_theta": cfg.rope_theta,
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
    eos = list(cfg.eos_token_ids)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope if cfg.rope_scaling is not None else None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": (eos if len(eos) > 1 else eos[0]) if eos else None,
        "torch_dtype": "float32",
    }


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    return {herd_to_hf_name(k): v.contiguous() for k, v in model.state_dict().items()}


def export_hf(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Write config.json + model.safetensors that transformers' LlamaForCausalLM loads."""
    from safetensors.torch import save_file

    model, cfg = load_model(model_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config_dict(cfg), indent=2) + "\n")
    save_file(hf_state_dict(model), str(out / WEIGHTS), metadata={"format": "pt"})
    return out


# --- Meta ------------------------------------------------------------------------------------

# Model-parallel shards are cut along these dims (Meta's ColumnParallel=0, RowParallel/ParallelEmbedding=1).
_META_SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def read_meta(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """`consolidated.*.pth` + `params.json`, as Meta's llama3 repo ships them."""
    path = Path(path)
    try:
        params = json.loads((path / "params.json").read_text())
    except FileNotFoundError:
        raise HerdError(f"{path / 'params.json'}: not found") from None
    except json.JSONDecodeError as e:
        raise HerdError(f"{path / 'params.json'}: not valid JSON ({e})") from None
    dim = params["dim"]
    hidden = int(2 * 4 * dim / 3)
    if params.get("ffn_dim_multiplier"):
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    multiple_of = params.get("multiple_of", 256)
    hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
    cfg = ModelConfig(
        dim=dim,
        n_layers=params["n_layers"],
        n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
        vocab_size=params["vocab_size"],
        ffn_hidden_dim=hidden,
        norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=params.get("rope_theta", 500000.0),
        rope_scaling=RopeScaling() if params.get("use_scaled_rope") else None,
        max_seq_len=params.get("max_seq_len", 8192),
        tie_embeddings=False,
    )
    shards = sorted(path.glob("consolidated.*.pth"))
    if not shards:
        raise HerdError(f"{path}: no consolidated.*.pth files")
    loaded = []
    for f in shards:
        try:
            loaded.append(torch.load(f, map_location="cpu", weights_only=True))
        except Exception as e:
            raise HerdError(f"{f}: unreadable checkpoint ({e})") from None
    state = {}
    for name in loaded[0]:
        if name.endswith("rope.freqs"):
            continue
        short = name.split(".")[-2]
        parts = [s[name] for s in loaded]
        w = torch.cat(parts, dim=_META_SHARD_DIM[short]) if len(parts) > 1 and short in _META_SHARD_DIM else parts[0]
        if short == "wq":
            w = interleaved_to_half(w, cfg.n_heads)
        elif short == "wk":
            w = interleaved_to_half(w, cfg.n_kv_heads)
        state[name] = w.float()
    return cfg, state


# --- import entry point ----------------------------------------------------------------------


def import_checkpoint(fmt: str, src: str | Path, out_dir: str | Path, tokenizer_spec: str | None = None) -> Path:
    """Convert GGUF / HF / Meta weights into a native herd directory, tokenizer included."""
    from model.tokenizer import load_tokenizer

    src = Path(src)
    if not src.exists():
        raise HerdError(f"{src}: not found")
    readers = {"gguf": read_gguf, "hf": read_hf, "meta": read_meta}
    if fmt not in readers:
        raise HerdError(f"unknown import format {fmt!r}; choose gguf, hf or meta")
    cfg, state = readers[fmt](src)
    if tokenizer_spec is None:
        if fmt == "gguf":
            tokenizer_spec = str(src)
        elif fmt == "meta" and (src / "tokenizer.model").is_file():
            tokenizer_spec = str(src / "tokenizer.model")
        elif cfg.vocab_size == 128256:
            tokenizer_spec = "llama3"
        else:
            raise HerdError(f"{src}: cannot tell the tokenizer; pass --tokenizer llama3|PATH")
    tokenizer = load_tokenizer(tokenizer_spec)
    model = build_model(cfg, state, source=src)
    return save_checkpoint(model, out_dir, tokenizer)


def import_gguf(src: str | Path, out_dir: str | Path) -> Path:
    return import_checkpoint("gguf", src, out_dir)
