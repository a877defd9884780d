"""The Ray Serve application: deployment `HerdLLMServer` with the FastAPI ingress.

    serve run configs/serve/default.yaml        # import_path services.deployment:build_app
    herd serve --model smollm2 [--config configs/serve/local.yaml]

`build_app(args)` is the import path's builder; `deploy()` / `shutdown()` are what `herd serve`
and the lifecycle (flows) call to run it on the local Ray cluster.

Each replica serves one pinned model version and moves to another without downtime
(services/rollout.py): Serve's `reconfigure` with a `user_config` naming the version (`model`),
or a watch on the alias (`watch_s`). Every response names the version that produced it: the
`x-herd-model-version` header and the body's `model` field.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import yaml
from ray import serve

from model.errors import HerdError
from services import proxy
from services import rollout as rollouts
from services.api.app import build_state, create_app
from services.config import load_server_config
from services.rollout import Pinned, Rollout, check_user_config, pin

log = logging.getLogger("herd.serve")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "serve" / "default.yaml"
DEPLOYMENT = "HerdLLMServer"

app = create_app()


@app.middleware("http")
async def name_the_version(request, call_next):
    """Pin the request to the version serving when it arrives, and say which one it was."""
    rollout = rollouts.current()  # this process's replica (Serve runs one replica per process)
    if rollout is None or rollout.state is None:
        return await call_next(request)
    state = rollout.state
    # The app's state is the rollout's current one; the request keeps the one it arrived with.
    request.app.state.herd = request.state.herd = state
    response = await call_next(request)
    response.headers["x-herd-model-version"] = state.version or state.model_name
    response.headers["x-herd-model-since"] = f"{state.since:.3f}"
    if rollout.error:
        response.headers["x-herd-rollout-error"] = rollout.error.splitlines()[0][:300]
    return response


@serve.deployment(
    name=DEPLOYMENT,
    max_ongoing_requests=32,
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=5,
)
@serve.ingress(app)
class HerdLLMServer:
    def __init__(self, args: dict[str, Any]):
        self.args = dict(args)
        self.model = load_server_config(self.args).model
        self.rollout = Rollout(self._build)
        self.rollout.start(pin(self.model))
        rollouts.set_current(self.rollout)

    def _build(self, pinned: Pinned):
        return build_state({**self.args, "model": pinned.uri})

    async def reconfigure(self, user_config: dict) -> None:
        """Serve's in-place update: `model` names the version to serve (default: the args' model),
        `watch_s` how often to re-resolve it (0: never). The load runs in the background, so the
        replica keeps answering with its current version until the new one is ready."""
        config = check_user_config(user_config)
        spec = config.get("model") or self.model
        self.rollout.watch(spec, float(config.get("watch_s", 0)))
        if config.get("model"):
            self.rollout.spawn(self.rollout.roll_to(spec))

    def check_health(self) -> None:
        engine = self.rollout.state.engine
        if not engine.healthy:
            raise RuntimeError(f"herd engine stopped: {engine.error!r}")

    def __del__(self):
        rollout = getattr(self, "rollout", None)
        if rollout is not None and rollout.state is not None:
            rollout.state.engine.shutdown()


def build_app(args: dict[str, Any]):
    """Serve's application builder: args `model` (folder, `smollm2`, models:/name@alias), optional
    `config` (a YAML file of settings) and any ServerConfig field."""
    load_server_config(args)  # fail at deploy time, with the field named, not in a replica
    return HerdLLMServer.bind(dict(args))


# --- local deployment (herd serve, the lifecycle) ----------------------------------------------


def read_serve_config(config: str | Path | dict | None) -> dict:
    """A Serve config (ServeDeploySchema) as a dict; None = configs/serve/default.yaml."""
    if isinstance(config, dict):
        return config
    path = Path(config) if config else DEFAULT_CONFIG
    if not path.is_file():
        raise HerdError(f"{path}: serve config not found")
    doc = yaml.safe_load(path.read_text())
    if not isinstance(doc, dict) or not doc.get("applications"):
        raise HerdError(f"{path}: not a Serve config (needs `applications:`)")
    return doc


def deploy(
    model_path: str | Path | None = None,
    config: str | Path | dict | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
    args: dict | None = None,
    deployment: dict | None = None,
    blocking: bool = False,
    ray_address: str | None = None,
    keep_running: bool = False,
) -> str:
    """Run the herd app of a Serve config on the local Ray cluster; returns the endpoint URL.

    model_path overrides the config's `args.model`; `args` / `deployment` override further args
    and deployment options (e.g. autoscaling_config, user_config). Without a Ray connection it
    starts a local Ray (RAY_ADDRESS or `ray_address` to join a cluster instead). keep_running:
    an app of that name already running is left as it is (its replicas follow their alias, see
    `user_config.watch_s`) instead of being replaced."""
    import ray

    doc = read_serve_config(config)
    apps = [a for a in doc["applications"] if a.get("import_path") == "services.deployment:build_app"]
    if not apps:
        raise HerdError("serve config: no application with import_path services.deployment:build_app")
    spec = apps[0]
    app_args = {**(spec.get("args") or {}), **(args or {})}
    if model_path is not None:
        app_args["model"] = str(model_path)
    options = {}
    for d in spec.get("deployments") or []:
        if d.get("name") == DEPLOYMENT:
            options = {k: v for k, v in d.items() if k != "name"}
    options.update(deployment or {})
    check_user_config(options.get("user_config"))
    http = doc.get("http_options") or {}
    host = host or http.get("host", "127.0.0.1")
    port = int(port or http.get("port", 8000))
    config = load_server_config(app_args)
    key = config.api_key()  # no key and no `auth: none`: refuse before starting anything
    if not ray.is_initialized():
        from flows.ray_runtime import init_ray

        os.environ.setdefault(proxy.CALLBACK_ENV, proxy.CALLBACK)  # the proxy a Ray started here drops them
        init_ray(
            address=ray_address or os.environ.get("RAY_ADDRESS") or "local",
            ignore_reinit_error=True,
            runtime_env={"env_vars": {config.api_key_env: key}} if key else None,
        )
    for attempt in range(3):  # on a busy machine the proxy may miss Serve's 60 s start-up window
        try:
            serve.start(
                http_options={"host": host, "port": port, **{k: v for k, v in http.items() if k == "request_timeout_s"}}
            )
            break
        except ray.exceptions.RayActorError:
            if attempt == 2:
                raise
            log.warning("Serve's HTTP proxy did not start; retrying")
    name, prefix = spec.get("name", "herd"), spec.get("route_prefix", "/")
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{port}{prefix.rstrip('/')}"
    running = serve.status().applications.get(name)
    if keep_running and running is not None and running.status == "RUNNING":
        log.info("Serve app %s is already running at %s; left as it is", name, url)
        return url
    bound = HerdLLMServer.options(**options).bind(app_args)
    serve.run(bound, name=name, route_prefix=prefix, blocking=blocking)
    return url


def shutdown(name: str | None = "herd") -> None:
    """Delete the herd application (name=None: shut Serve down entirely)."""
    if name is None:
        serve.shutdown()
    else:
        serve.delete(name)
