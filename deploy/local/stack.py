"""The local stack in the background: Redis, Azurite, the stand-in scorer and one worker, tracked in .blobscore/."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import secrets
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from deploy.local.azurite import AzuriteUnavailableError, connection_string, start_azurite
from deploy.local.procs import ManagedProcess, ProcessExitedError, free_port, port_is_free, stopped_on_failure
from deploy.local.redis_local import RedisUnavailableError, ensure_redis, redis_answers
from deploy.local.supervise import read_state
from worker.deployment import account_from_connection_string
from worker.errors import BlobscoreError
from worker.settings import STACK_FILE, load_settings

PieceName = Literal["redis", "azurite", "standin", "worker"]
PIECES: tuple[PieceName, ...] = ("redis", "azurite", "standin", "worker")

AZURITE_PORT = 10000
LOCAL_HOST = "127.0.0.1"
STANDIN_MODEL = "resnet50"
SERVICE_NAME = "local"
STANDIN_KEY_ENV = "BLOBSCORE_STANDIN_KEY"
# The stand-in builds its model on its first start, which takes tens of seconds on a small machine.
STANDIN_START_TIMEOUT_S = 180.0
# Celery logs "<name> ready." only at INFO; at quieter levels we settle for "still alive after this long".
WORKER_SETTLE_S = 10.0
STOP_TIMEOUT_S: dict[str, float] = {"worker": 30.0}  # a warm shutdown lets running tasks finish
MASK = "***"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


class StackError(RuntimeError):
    """A piece of the local stack could not be started, or `up` was asked for something inconsistent."""


class Piece(BaseModel):
    """One piece as recorded in the state file."""

    name: PieceName
    started_by_us: bool
    pid: int | None = None
    start_ticks: int | None = None
    log: str | None = None

    def process(self) -> ManagedProcess | None:
        """A handle on its process, if we started one."""
        if self.pid is None or self.log is None:
            return None
        return ManagedProcess.attach(self.pid, Path(self.log), self.start_ticks)


class StackSettings(BaseModel):
    """What a client (the CLI, the worker) needs to reach the stack; blobscore's settings loader reads it."""

    broker_url: str
    blob_connection_string: str | None = None
    scoring_address: str | None = None
    scoring_port: int | None = None
    scoring_key: str | None = None
    scoring_service_name: str = SERVICE_NAME
    scoring_model: str = STANDIN_MODEL
    service: str = SERVICE_NAME

    def as_env(self) -> dict[str, str]:
        """The settings as BLOBSCORE_* environment variables (unset ones left out)."""
        return {f"BLOBSCORE_{key.upper()}": str(value) for key, value in self.model_dump(exclude_none=True).items()}

    def masked(self) -> StackSettings:
        """A copy safe to print: the scoring key hidden."""
        return self.model_copy(update={"scoring_key": MASK if self.scoring_key else None})


class StackState(BaseModel):
    """The state file `.blobscore/stack.json`."""

    pieces: list[Piece] = []
    settings: StackSettings
    # How many worker processes the supervisor keeps running (`stack up --workers N`).
    workers: int = 1

    def piece(self, name: str) -> Piece | None:
        """The recorded piece called `name`, if any."""
        return next((piece for piece in self.pieces if piece.name == name), None)

    def record(self, piece: Piece) -> None:
        """Record `piece`, replacing an earlier record of the same name; pieces stay in start order."""
        others = [known for known in self.pieces if known.name != piece.name]
        self.pieces = sorted([*others, piece], key=lambda known: PIECES.index(known.name))


class PieceStatus(BaseModel):
    """One piece as `status` reports it."""

    name: PieceName
    alive: bool
    started_by_us: bool
    pid: int | None
    log: str | None
    # The worker piece is a supervisor (deploy/local/supervise.py): its worker processes and how often it
    # restarted one that exited.
    children: list[int] = []
    restarts: int | None = None


class StackStatus(BaseModel):
    """What runs, and the settings (scoring key masked) a client needs to reach it."""

    model_config = ConfigDict(frozen=True)

    workdir: str
    running: bool
    pieces: list[PieceStatus]
    settings: StackSettings | None
    # The deployment namespace commands run here use (queue names and Redis keys): derived from this stack's
    # Azurite endpoint, so two stacks sharing the machine's Redis never see each other's tasks.
    namespace: str | None = None


class StackPaths:
    """Where the stack keeps its files under a working directory."""

    def __init__(self, workdir: Path) -> None:
        """Paths under `<workdir>/.blobscore/`."""
        self.workdir = workdir.resolve()
        self.state_file = self.workdir / STACK_FILE  # the file the settings loader reads
        self.root = self.state_file.parent
        self.lock_file = self.root / "stack.lock"
        self.key_file = self.root / "standin.key"
        self.logs = self.root / "logs"
        self.redis_dir = self.root / "redis"
        self.supervisor_state = self.root / "workers.json"
        self.azurite_dir = self.root / "azurite"

    def log(self, name: str) -> Path:
        """The log file of piece `name`."""
        return self.logs / f"{name}.log"


def up(
    workdir: Path, pieces: Iterable[PieceName] = PIECES, broker_url: str | None = None, workers: int | None = None
) -> StackStatus:
    """Start the pieces that do not run yet (all by default) and return the stack's status.

    Idempotent: running pieces are kept. The broker URL is `broker_url`, else the one recorded by an earlier
    `up`, else $BLOBSCORE_BROKER_URL, else the default; a Redis answering there is reused, not started.
    """
    wanted = set(pieces)
    unknown = wanted - set(PIECES)
    if unknown:
        raise StackError(f"unknown stack pieces {sorted(unknown)}; choose from {list(PIECES)}")
    paths = StackPaths(workdir)
    with _locked(paths):
        state = _load(paths) or StackState(settings=StackSettings(broker_url=_default_broker_url(paths.workdir)))
        _switch_broker(state, broker_url)
        if workers is not None and workers != state.workers:
            _stop_piece_named(state, "worker")  # started again below with the new count
            state.workers = workers
        for name in PIECES:
            if name in wanted and not _piece_alive(state.piece(name), state.settings):
                _start_piece(name, state, paths)
                _save(paths, state)  # after each piece, so `down` can stop it if a later one fails
        _save(paths, state)
        return _status(paths, state)


def down(workdir: Path) -> list[str]:
    """Stop what `up` started (never a Redis it found running) and return the names of the pieces stopped."""
    paths = StackPaths(workdir)
    if not paths.root.is_dir():
        return []
    with _locked(paths):
        state = _load(paths)
        if state is None:
            return []
        stopped: list[str] = [piece.name for piece in reversed(state.pieces) if _stop_piece(piece)]
        paths.state_file.unlink()  # stale settings must not steer commands run here any more
        return stopped


def status(workdir: Path) -> StackStatus:
    """Which pieces run, and the settings (scoring key masked) to reach them."""
    paths = StackPaths(workdir)
    return _status(paths, _load(paths))


def _status(paths: StackPaths, state: StackState | None) -> StackStatus:
    if state is None:
        return StackStatus(workdir=str(paths.workdir), running=False, pieces=[], settings=None)
    supervised = read_state(paths.supervisor_state)
    reports = [
        PieceStatus(
            name=piece.name,
            alive=_piece_alive(piece, state.settings),
            started_by_us=piece.started_by_us,
            pid=piece.pid,
            log=piece.log,
            **({"children": supervised.get("children", []), "restarts": supervised.get("restarts", 0)}
               if piece.name == "worker" and supervised.get("supervisor") == piece.pid else {}),
        )
        for piece in state.pieces
    ]
    running = bool(reports) and all(report.alive for report in reports)
    return StackStatus(workdir=str(paths.workdir), running=running, pieces=reports, settings=state.settings.masked(),
                       namespace=_namespace(paths))


def _namespace(paths: StackPaths) -> str | None:
    try:
        return load_settings(workdir=paths.workdir).namespace_in_use
    except (BlobscoreError, ValueError):
        return None  # no Azurite started yet, or settings that do not load: `stack status` still reports


def _default_broker_url(workdir: Path) -> str:
    # Through the one settings loader: $BLOBSCORE_BROKER_URL, the config file, or the default.
    return load_settings(workdir=workdir).broker_url


def _switch_broker(state: StackState, broker_url: str | None) -> None:
    if broker_url is None or broker_url == state.settings.broker_url:
        return
    running = [piece.name for piece in state.pieces if _piece_alive(piece, state.settings)]
    if running:
        raise StackError(
            f"the stack here runs with broker {state.settings.broker_url} ({', '.join(running)} running); "
            "run `blobscore stack down` first to switch brokers"
        )
    state.settings.broker_url = broker_url


def _piece_alive(piece: Piece | None, settings: StackSettings) -> bool:
    if piece is None:
        return False
    if not piece.started_by_us:
        return redis_answers(settings.broker_url)  # the only piece we reuse is a Redis
    process = piece.process()
    return process is not None and process.alive()


def _stop_piece(piece: Piece) -> bool:
    """Stop `piece` if we started it; True if it was running."""
    process = piece.process() if piece.started_by_us else None
    if process is None:
        return False
    was_alive = process.alive()
    # The worker supervisor gets the only TERM and passes one to each worker: a second TERM would turn their
    # warm shutdown (running images finish) into a cold one.
    process.stop(timeout=STOP_TIMEOUT_S.get(piece.name, 10.0), leader_first=piece.name == "worker")
    return was_alive


def _stop_piece_named(state: StackState, name: PieceName) -> None:
    piece = state.piece(name)
    if piece is not None:
        _stop_piece(piece)


def _start_piece(name: PieceName, state: StackState, paths: StackPaths) -> None:
    earlier = state.piece(name)
    if earlier is not None:
        _stop_piece(earlier)  # a dead leader may have left children behind
    starters: dict[PieceName, Callable[[StackSettings, StackPaths], Piece]] = {
        "redis": _start_redis, "azurite": _start_azurite, "standin": _start_standin,
        "worker": functools.partial(_start_worker, count=state.workers),
    }
    try:
        state.record(starters[name](state.settings, paths))
    except (RedisUnavailableError, AzuriteUnavailableError, ProcessExitedError, TimeoutError) as exc:
        raise StackError(f"could not start {name}: {exc}") from exc


def _piece(name: PieceName, process: ManagedProcess) -> Piece:
    return Piece(name=name, started_by_us=True, pid=process.pid, start_ticks=process.start_ticks, log=str(process.log))


def _start_redis(settings: StackSettings, paths: StackPaths) -> Piece:
    # Append-only, so tasks still queued survive `down` and `up`.
    process = ensure_redis(settings.broker_url, paths.redis_dir, appendonly=True)
    if process is None:
        return Piece(name="redis", started_by_us=False)
    return _piece("redis", process)


def _start_azurite(settings: StackSettings, paths: StackPaths) -> Piece:
    # The port recorded by an earlier `up` first: the endpoint is part of the account's identity, and so of the
    # deployment's namespace, and tasks still queued from before name it.
    earlier = _port_of(settings.blob_connection_string)
    port = next((candidate for candidate in (earlier, AZURITE_PORT) if candidate and port_is_free(candidate)), None)
    port = port or free_port()
    process = start_azurite(port, paths.log("azurite"), location=paths.azurite_dir)
    settings.blob_connection_string = connection_string(port)
    return _piece("azurite", process)


def _port_of(connection_string: str | None) -> int | None:
    if connection_string is None:
        return None
    endpoint = account_from_connection_string(connection_string).endpoint
    host = endpoint.split("/", 1)[0]
    return int(host.rsplit(":", 1)[1]) if ":" in host else None


def _start_standin(settings: StackSettings, paths: StackPaths) -> Piece:
    key = _standin_key(paths)
    port = free_port()
    argv = [sys.executable, "-m", "deploy.standin", "--port", str(port), "--model", STANDIN_MODEL]
    argv += ["--service-name", SERVICE_NAME]
    process = ManagedProcess.start(
        argv, paths.log("standin"), env=_child_env({STANDIN_KEY_ENV: key}), cwd=paths.workdir
    )
    with stopped_on_failure(process):
        process.wait_for_log(r"listening on \S+:\d+", STANDIN_START_TIMEOUT_S)
        process.wait_for_port(LOCAL_HOST, port, 30.0, "the stand-in scorer")
    settings.scoring_address = LOCAL_HOST
    settings.scoring_port = port
    settings.scoring_key = key
    settings.scoring_service_name = SERVICE_NAME
    settings.scoring_model = STANDIN_MODEL
    return _piece("standin", process)


def _start_worker(settings: StackSettings, paths: StackPaths, count: int = 1) -> Piece:
    # Under a supervisor, as Kubernetes or systemd would run workers: one that exits is started again.
    argv = [sys.executable, "-m", "deploy.local.supervise", "--count", str(count), "--state",
            str(paths.supervisor_state), "--", sys.executable, "-m", "worker"]
    process = ManagedProcess.start(argv, paths.log("worker"), env=_child_env(settings.as_env()), cwd=paths.workdir)
    with stopped_on_failure(process), contextlib.suppress(TimeoutError):  # alive all along is good enough
        process.wait_for_log(r"\bready\b", WORKER_SETTLE_S)
    return _piece("worker", process)


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    # The project root on PYTHONPATH lets `-m deploy.standin` / `-m worker` import from any working directory.
    path = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def _standin_key(paths: StackPaths) -> str:
    """The stand-in's API key: generated once, kept in a 0600 file."""
    if paths.key_file.is_file():
        return paths.key_file.read_text("utf-8").strip()
    key = secrets.token_urlsafe(32)
    _write_private(paths.key_file, key + "\n")
    return key


def _load(paths: StackPaths) -> StackState | None:
    try:
        text = paths.state_file.read_text("utf-8")
    except FileNotFoundError:
        return None
    return StackState.model_validate_json(text)


def _save(paths: StackPaths, state: StackState) -> None:
    # Unset settings are left out: the settings loader would take a null as a value.
    _write_private(paths.state_file, state.model_dump_json(exclude_none=True, indent=2) + "\n")


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path` atomically, readable by the owner only (it may hold a key)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, path)


@contextlib.contextmanager
def _locked(paths: StackPaths) -> Iterator[None]:
    """Serialize `up` and `down` on one working directory."""
    paths.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    with paths.lock_file.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
