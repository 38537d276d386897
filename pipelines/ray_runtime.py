"""Connect to a Ray cluster, or start an in-process one, with token authentication on.

`init_ray()` is what every pipeline calls first (DESIGN.md section 5, "Where it runs"):

- `address` given, or `RAY_ADDRESS` set (what `ray job submit` sets for the job's driver), or a cluster
  started on this machine with `ray start`: connect to it.
- otherwise: start an in-process local runtime (the embedded default), sized by `num_cpus`/`num_gpus`.
- Ray already initialised in this process: return the running context (ignore_reinit_error semantics).

Token authentication (Ray >= 2.52; turned on by default for local clusters since Ray 2.59). Ray reads
`RAY_AUTH_MODE` (`token` or `disabled`) from the environment, and takes the token from, in order,
`RAY_AUTH_TOKEN`, the file named by `RAY_AUTH_TOKEN_PATH`, then `~/.ray/auth_token`
(https://docs.ray.io/en/latest/ray-security/token-auth.html). Here it is ON by default:

- local start: `RAY_AUTH_MODE` unset -> we set it to `token` (whatever the Ray version's default),
  and `ray.init` generates `~/.ray/auth_token` when there is none and hands it to its processes.
- connecting: `RAY_AUTH_MODE` unset and a token available (the three places above) -> `token`, so the
  client authenticates; Ray itself only does this for clusters it finds on its own, not for an
  explicit address.
- `RAY_AUTH_MODE=disabled` set by the user is respected, with a warning; it is never turned off here.

One GPU machine with `ray start --head` and `ray job submit` (the same commands on a cluster head;
`ray job submit` talks to the dashboard's job server, which needs `pip install "ray[default]"`):

    ray get-auth-token --generate          # once per machine: writes the shared secret ~/.ray/auth_token
    export RAY_AUTH_MODE=token             # ray start and ray job submit then authenticate with it
    ray start --head --num-gpus=1          # `ray start` without a token would run WITHOUT authentication
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m pipelines.train --config CFG.yaml
    ray stop

Other machines (worker nodes, a laptop submitting through the dashboard at http://HEAD:8265) need the
same token: copy ~/.ray/auth_token there (chmod 600), or export RAY_AUTH_TOKEN=$(ray get-auth-token),
or RAY_AUTH_TOKEN_PATH=/path/to/token; and export RAY_AUTH_MODE=token there too. The job's driver
inherits the cluster's settings, so `init_ray()` inside the job just connects. The dashboard asks for
the token in the browser.

    .venv/bin/python -c "from pipelines.ray_runtime import init_ray; print(init_ray(num_cpus=2).address_info['gcs_address'])"
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ray

log = logging.getLogger(__name__)

AUTH_MODE_ENV = "RAY_AUTH_MODE"
AUTH_MODES = ("token", "disabled")
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"  # where the State API of the runtime we started is served
DATA_LOG_ENV = "RAY_DATA_LOG_LEVEL"  # read by Ray Data in every process of the runtime
WARNINGS_ENV = "PYTHONWARNINGS"  # read by every Python process the runtime starts
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # read by every Ray Train controller the runtime starts
TRAIN_POLL_S = "0.5"
_ENV_SET: set[str] = set()  # variables init_ray set for the runtime it started (shutdown_ray removes them)


def token_available() -> bool:
    """Whether Ray would find an auth token: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return Path(path).expanduser().is_file()
    return (Path.home() / ".ray" / "auth_token").is_file()


def _set_token_mode() -> None:
    os.environ[AUTH_MODE_ENV] = "token"
    # Ray caches its config (RAY_AUTH_MODE included) when ray._raylet is imported; without a refresh the
    # driver would believe auth is off, skip creating the token, and the GCS it starts (which reads the
    # environment) would abort for lack of one. Ray's own ray.init refreshes it the same way.
    from ray._raylet import Config

    Config.initialize("")


def _will_connect(address: str | None) -> bool:
    """Whether ray.init(address) joins an existing cluster (address, RAY_ADDRESS or a `ray start`ed one)."""
    from ray._private import services  # the resolution ray.init itself uses

    try:
        return services.canonicalize_bootstrap_address(address) is not None
    except ConnectionError:
        return True  # "auto" with nothing running: let ray.init raise its own message


def configure_auth(connecting: bool) -> str:
    """Apply the token-auth policy of this module; returns the effective mode ("token"/"disabled")."""
    mode = os.environ.get(AUTH_MODE_ENV)
    if mode is not None and mode.lower() not in AUTH_MODES:
        raise ValueError(f"{AUTH_MODE_ENV}={mode!r} is not a Ray auth mode; valid: {list(AUTH_MODES)}")
    if mode is None and (not connecting or token_available()):
        _set_token_mode()
        return "token"
    if mode is not None and mode.lower() == "disabled":
        log.warning("Ray token authentication is DISABLED (%s=disabled in the environment): anyone who can reach "
                    "this cluster's ports can run code on it. Unset it to turn authentication back on.", AUTH_MODE_ENV)
        return "disabled"
    return (mode or "disabled").lower()


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None, *,
             log_level: int | str = logging.WARNING, **init_kwargs):
    """Connect to `address` / RAY_ADDRESS / a running local cluster, else start a local runtime.

    num_cpus / num_gpus size a local start only (a cluster has its own resources; they are ignored with
    a warning when connecting). address="local" forces a new local runtime. Extra keyword arguments go
    to `ray.init` (e.g. runtime_env, object_store_memory). Returns the RayContext.

    A local start runs the dashboard on 127.0.0.1 and names its address to every process of the runtime
    (RAY_API_SERVER_ADDRESS): Ray's State API is served there, and Ray Train's placement-group cleaner needs it
    to free the resources of a Train run that was killed (a Tune trial stopped early). Without the dashboard the
    cleaner logs "Failed to query Ray Train Controller actor state" every few seconds; without the explicit
    address it finds several runtimes on a machine that runs two, and gives up. Either way the resources stay
    reserved and the next trial waits for them forever.
    """
    if ray.is_initialized():
        log.info("Ray already initialised in this process; reusing it")
        return ray.init(ignore_reinit_error=True)
    connecting = _will_connect(address)
    configure_auth(connecting)
    level = logging.getLevelName(log_level) if isinstance(log_level, str) else log_level
    kwargs = dict(logging_level=level, ignore_reinit_error=True, **init_kwargs)
    # Ray Data logs every execution ("execution finished in ...") at INFO and, in every SplitCoordinator actor
    # (a few per epoch), that progress bars are off (they are, when the console is not a terminal): below INFO
    # only its errors reach the console. The actors read RAY_DATA_LOG_LEVEL (a user's own setting wins).
    # Ray's own deprecation warnings (e.g. Ray Train's DataConfig setting ExecutionOptions.exclude_resources in
    # every DatasetManager) are for Ray's developers: off in the runtime's processes unless verbose.
    data_level = "INFO" if level <= logging.INFO else "ERROR"
    logging.getLogger("ray.data").setLevel(data_level)
    process_env = {DATA_LOG_ENV: data_level}
    if level > logging.INFO:
        process_env[WARNINGS_ENV] = "ignore::DeprecationWarning"
    if not connecting:
        # Ray Train V2's controller polls its workers every 2 s by default, and a run's end waits for two polls
        # (one collects the last report, the next sees the workers done). One worker group on one machine polls
        # cheaply; on a cluster the cluster's own setting stands.
        process_env[TRAIN_POLL_ENV] = TRAIN_POLL_S
    for name, value in process_env.items():
        if name not in os.environ:  # a user's own setting wins
            os.environ[name] = value
            _ENV_SET.add(name)
    if connecting:
        if num_cpus is not None or num_gpus is not None:
            log.warning("connecting to an existing Ray cluster: num_cpus=%s num_gpus=%s are ignored", num_cpus, num_gpus)
        return ray.init(address=address, **kwargs)
    port = _free_port()
    # the runtime's processes inherit this process's environment when they start: set it before ray.init
    os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
    ctx = ray.init(address=address, num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=True,
                   dashboard_host="127.0.0.1", dashboard_port=port, **kwargs)
    if ctx.dashboard_url and ctx.dashboard_url.rsplit(":", 1)[-1] != str(port):  # taken meanwhile: Ray moved it
        log.warning("the dashboard started on %s, not on port %d: Ray Train cannot clean up after killed runs",
                    ctx.dashboard_url, port)
    return ctx


#: the dashboard's port is drawn from here: above Ray's worker ports (10002-19999 by default), below the kernel's
#: ephemeral range (Linux: 32768-60999), so no process the runtime starts can be handed it by `bind(0)` between our
#: check and the dashboard's bind (an ephemeral pick once took it: "Failed to find a valid port for dashboard").
DASHBOARD_PORTS = range(20000, 32768)


def _ephemeral_ports() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return range(low, high + 1)
    except (OSError, ValueError):  # not Linux: the range IANA names for ephemeral ports
        return range(49152, 65536)


def _free_port() -> int:
    """A port free on 127.0.0.1 now, from DASHBOARD_PORTS outside the ephemeral range (else any free port)."""
    import random
    import socket

    ephemeral = _ephemeral_ports()
    candidates = [p for p in random.sample(DASHBOARD_PORTS, 64) if p not in ephemeral] + [0]
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free TCP port on 127.0.0.1")  # unreachable: port 0 always binds


def shutdown_ray() -> None:
    """Stop the local runtime (or disconnect from a cluster); a no-op when Ray is not running."""
    if ray.is_initialized():
        ray.shutdown()
    os.environ.pop(API_SERVER_ENV, None)
    for name in _ENV_SET:
        os.environ.pop(name, None)
    _ENV_SET.clear()


def quiet_train_worker_logs() -> None:
    """In a Ray Train worker: drop Ray Train V2's INFO line per ``ray.train.report`` ("Reporting training result
    N: TrainingReport(...)"). Its logger is named after its file, outside the ``ray.train`` hierarchy that
    ``RunConfig(logging_config=...)`` sets, so that setting does not reach it; ``--verbose`` keeps it."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray version: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
