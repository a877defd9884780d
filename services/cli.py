"""`herd serve`: run the OpenAI-compatible endpoint on the local Ray cluster (Ray Serve)."""

from __future__ import annotations

import time


def _cmd_serve(args) -> int:
    from services.deployment import deploy, shutdown

    overrides = {}
    if args.dtype:
        overrides["dtype"] = args.dtype
    url = deploy(args.model, args.config, host=args.host, port=args.port, args=overrides)
    print(
        f"herd: serving {args.model} at {url}  (OpenAI API: {url}/v1, chat page: {url}/, "
        f"metrics: {url}/metrics); Ctrl-C stops",
        flush=True,
    )
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("herd: stopping", flush=True)
        shutdown()
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model with an OpenAI-compatible API (Ray Serve)",
        description="Deploy the herd Serve app locally and block until Ctrl-C. The config is a "
        "Ray Serve config (the same file `serve run` and the KubeRay RayService use).",
    )
    p.add_argument(
        "--model", required=True, help="a model folder, `smollm2`, or a registry URI such as models:/herd@champion"
    )
    p.add_argument("--config", default=None, help="Serve config YAML (default: configs/serve/default.yaml)")
    p.add_argument("--host", default=None, help="HTTP host (default: the config's http_options, else 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's, else 8000)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="override args.dtype")
    p.set_defaults(func=_cmd_serve)
