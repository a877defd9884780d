"""A real multi-node Ray cluster on one machine: each node in its own network namespace.

Namespaces `<prefix>-br` (a bridge, no address), `<prefix>-head`, `<prefix>-w<i>` (worker nodes)
and `<prefix>-client` are joined by veth pairs whose bridge ends live in `<prefix>-br`, so every
address (10.231.0.0/24) exists only inside namespaces made here and each node has its own port
space. Every node runs `ray start --block` under its own `--temp-dir`, with token auth (a token
made by `ray get-auth-token --generate`, passed as RAY_AUTH_TOKEN) and the GCS health check
shortened through `--system-config`, so a killed node is declared dead in about 3 s instead of 30.
The file system is shared: a folder under the cluster's root stands for the shared storage.

A node is killed, and the cluster torn down, only through its namespace's processes
(`ip netns pids NAME`); `ray stop` would stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
SUBNET = "10.231.0"
GCS_PORT = 6379
DASHBOARD_PORT = 8265
# The GCS pings each raylet every second and gives up after 3 missed answers.
HEALTH_CHECK = {
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 3,
}


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def netns_unavailable() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    name = f"herdprobe-{os.getpid()}"
    try:
        made = _ip("netns", "add", name, check=False)
        if made.returncode != 0:
            return f"`ip netns add` failed: {made.stderr.strip() or made.returncode} (needs root or CAP_SYS_ADMIN)"
        veth = _ip("-n", name, "link", "add", "a0", "type", "veth", "peer", "name", "b0", check=False)
        if veth.returncode != 0:
            return f"cannot make a veth pair in a namespace: {veth.stderr.strip()}"
    finally:
        _ip("netns", "del", name, check=False)
    return None


@dataclass
class Node:
    name: str  # head, w1, w2, ...
    ns: str
    ip: str
    temp_dir: Path
    proc: subprocess.Popen | None = None
    log: Path | None = None


@dataclass
class NetnsCluster:
    root: Path  # logs, HOME with the token; `shared` below it is the shared storage
    prefix: str = field(default_factory=lambda: f"h24-{os.getpid()}")
    nodes: dict[str, Node] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)
    token: str = ""
    next_host: int = 1

    @property
    def shared(self) -> Path:
        return self.root / "shared"

    @property
    def address(self) -> str:
        return f"{SUBNET}.1:{GCS_PORT}"

    @property
    def dashboard(self) -> str:
        return f"http://{SUBNET}.1:{DASHBOARD_PORT}"

    # --- network -------------------------------------------------------------------------------

    def _make_ns(self, role: str, host: int | None = None) -> tuple[str, str]:
        """A namespace plugged into the bridge: (name, address); nodes take .1 (the head), .2, ..."""
        ns = f"{self.prefix}-{role}"
        if host is None:
            host, self.next_host = self.next_host, self.next_host + 1
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        br = f"{self.prefix}-br"
        _ip("-n", br, "link", "add", f"v-{role}", "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("-n", br, "link", "set", f"v-{role}", "master", "br0")
        _ip("-n", br, "link", "set", f"v-{role}", "up")
        addr = f"{SUBNET}.{host}"
        _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        return ns, addr

    def setup(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.shared.mkdir(exist_ok=True)
        br = f"{self.prefix}-br"
        _ip("netns", "add", br)
        self.namespaces.append(br)
        _ip("-n", br, "link", "add", "br0", "type", "bridge")
        _ip("-n", br, "link", "set", "br0", "up")
        home = self.root / "home"
        home.mkdir(exist_ok=True)
        gen = subprocess.run(
            [RAY, "get-auth-token", "--generate"],
            env={**self._base_env(), "HOME": str(home)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        if gen.returncode != 0 or not gen.stdout.strip():
            raise RuntimeError(f"ray get-auth-token --generate failed: {gen.stderr[-2000:]}")
        self.token = gen.stdout.strip()
        self.client_ns, self.client_ip = self._make_ns("client", host=200)

    # --- processes -----------------------------------------------------------------------------

    def _base_env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        path = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return {**env, "PATH": path, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def env(self, **extra: str) -> dict:
        """Environment of every process in the cluster: token auth on, this checkout importable."""
        # gloo finds its own address from the host name, which here resolves to 127.0.0.1 in every
        # namespace: name the interface (on a real cluster the host name resolves to the node)
        return {
            **self._base_env(),
            "HOME": str(self.root / "home"),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "GLOO_SOCKET_IFNAME": "eth0",
            **extra,
        }

    def popen(self, ns: str, cmd: list[str], log: Path, **extra_env: str) -> subprocess.Popen:
        return subprocess.Popen(
            ["ip", "netns", "exec", ns, *cmd],
            env=self.env(**extra_env),
            cwd=REPO,
            start_new_session=True,
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
        )

    def run(self, ns: str, cmd: list[str], timeout: float, **extra_env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ip", "netns", "exec", ns, *cmd],
            env=self.env(**extra_env),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start_node(self, name: str, num_cpus: int, head: bool = False) -> Node:
        ns, ip = self._make_ns(name)
        # Ray's socket paths must stay short (AF_UNIX): a temp dir directly under /tmp
        temp = Path(tempfile.mkdtemp(prefix=f"herd-{name}-", dir="/tmp"))
        cmd = [
            RAY,
            "start",
            "--block",
            f"--node-ip-address={ip}",
            f"--num-cpus={num_cpus}",
            f"--temp-dir={temp}",
            "--object-store-memory=100000000",
            "--disable-usage-stats",
        ]
        if head:
            cmd += [
                "--head",
                f"--port={GCS_PORT}",
                "--include-dashboard=true",
                "--dashboard-host=0.0.0.0",
                f"--dashboard-port={DASHBOARD_PORT}",
                f"--system-config={json.dumps(HEALTH_CHECK)}",
            ]
        else:
            cmd += [f"--address={self.address}"]
        node = Node(name, ns, ip, temp, log=self.root / f"{name}.log")
        node.proc = self.popen(ns, cmd, node.log)
        self.nodes[name] = node
        return node

    def add_worker(self, num_cpus: int = 1) -> Node:
        """A new worker node (a replacement machine) under the next free name."""
        i = 1
        while f"w{i}" in self.nodes:
            i += 1
        return self.start_node(f"w{i}", num_cpus)

    def alive_nodes(self, timeout: float = 120) -> list[str]:
        """The addresses of the nodes the GCS counts alive (asked from the client namespace)."""
        code = (
            f"import ray, json; ray.init(address={self.address!r}, logging_level='ERROR'); "
            "print(json.dumps(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])))"
        )
        got = self.run(self.client_ns, [sys.executable, "-c", code], timeout=timeout)
        if got.returncode != 0:
            raise RuntimeError(f"asking the GCS for its nodes failed: {got.stderr[-3000:]}")
        return json.loads(got.stdout.strip().splitlines()[-1])

    def wait_for(self, ips: set[str], timeout: float = 240) -> float:
        """Wait until exactly these nodes are alive; returns the seconds it took."""
        t0 = time.time()
        while True:
            for node in self.nodes.values():
                if node.proc is not None and node.proc.poll() is not None and node.ip in ips:
                    raise RuntimeError(f"node {node.name} exited: {node.log.read_text()[-3000:]}")
            try:
                if set(self.alive_nodes()) == ips:
                    return time.time() - t0
            except RuntimeError:
                if time.time() - t0 > timeout:
                    raise
            if time.time() - t0 > timeout:
                raise TimeoutError(f"nodes {sorted(ips)} not all alive after {timeout:.0f}s")
            time.sleep(2)

    def pids(self, ns: str) -> list[int]:
        out = _ip("netns", "pids", ns, check=False).stdout.split()
        return [int(p) for p in out if p.isdigit()]

    def kill_namespace(self, ns: str, timeout: float = 30) -> int:
        """SIGKILL every process in one namespace (a node's whole machine going away); returns how many."""
        killed = 0
        deadline = time.time() + timeout
        while time.time() < deadline:
            pids = self.pids(ns)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        for node in self.nodes.values():
            if node.ns == ns and node.proc is not None:
                try:
                    node.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        return killed

    def kill_node(self, name: str) -> int:
        return self.kill_namespace(self.nodes[name].ns)

    def teardown(self) -> None:
        # workers first, the head last: nodes do not linger trying to reach a dead GCS
        order = (
            [n.ns for n in self.nodes.values() if n.name != "head"]
            + [n.ns for n in self.nodes.values() if n.name == "head"]
            + [self.namespaces[0]]
        )
        for ns in dict.fromkeys(order + self.namespaces):
            self.kill_namespace(ns)
            _ip("netns", "del", ns, check=False)
        for node in self.nodes.values():
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        self.namespaces.clear()
