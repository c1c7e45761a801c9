"""Owns every model version the server serves: loading, readiness, unloading.

Each model loads on its own worker thread, so a slow or broken model never
blocks the others; a failure leaves that model UNAVAILABLE with its reason.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from taskserve.server.errors import ModelNotFound, ModelNotReady, TaskServeError, caller_safe, quoted
from taskserve.server.metrics import ServerMetrics
from taskserve.server.repository.config import ModelConfig, ModelLimits, load_model_config
from taskserve.server.repository.paths import (
    MAX_NAME_CHARS,
    check_name_length,
    model_dir_inside,
    model_dir_names,
    resolve_inside,
    without_server_paths,
)
from taskserve.server.repository.versions import available_versions, select_versions
from taskserve.server.runtimes.memory import release_freed_memory
from taskserve.server.serving.factory import load_version
from taskserve.server.serving.loaded_model import LoadedModel

log = logging.getLogger(__name__)

# Characters of a load failure's reason that are kept (RepositoryIndex carries every reason).
MAX_REASON_CHARS = 1024


class ModelState(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass
class ModelIndexEntry:
    name: str
    version: str
    state: ModelState
    reason: str = ""


@dataclass
class _ModelSlot:
    """Everything known about one model directory."""

    name: str
    state: ModelState = ModelState.LOADING
    reason: str = ""
    config: ModelConfig | None = None
    versions: dict[str, LoadedModel] = field(default_factory=dict)
    default_version: str = ""


def _merged_limits(own: ModelLimits, defaults: ModelLimits) -> ModelLimits:
    """A model's limits: its config.yaml ``limits`` where set, the server's elsewhere."""
    return defaults.model_copy(update=own.model_dump(exclude_none=True))


class ModelManager:
    """Loads and serves the models of one repository directory.

    Coroutines run on the server's event loop; blocking work (loading, warmup)
    runs on worker threads. ``get`` is cheap and called on every request.
    """

    def __init__(
        self,
        repository: Path,
        metrics: ServerMetrics,
        default_limits: ModelLimits | None = None,
        max_name_chars: int = MAX_NAME_CHARS,
        *,
        retire_grace_s: float = 30.0,
    ) -> None:
        self.repository = repository
        # Longest model name or version a request may name, checked before any lookup.
        self.max_name_chars = max_name_chars
        # How long a version leaving service (reload, unload) waits for the requests that
        # already resolved it before it stops; what still runs then is refused (UNAVAILABLE).
        self._retire_grace_s = retire_grace_s
        # The server's request limits; a model's config.yaml ``limits`` overrides them.
        self._default_limits = default_limits or ModelLimits()
        self._metrics = metrics
        self._slots: dict[str, _ModelSlot] = {}
        self._listeners: list[Callable[[str, bool], None]] = []
        # One lock per model name, kept apart from the slots: an Unload deletes the slot,
        # and a Load waiting on that slot's lock would then fill an orphan nobody frees.
        self._locks: dict[str, asyncio.Lock] = {}
        # Checks a version must pass before it is READY (the front end wires its typed
        # task's build and options check here: the manager and the tasks are sibling rooms
        # and neither imports the other), and callbacks for versions leaving service (to
        # drop their caches).
        self._load_checks: list[Callable[[LoadedModel], Awaitable[None]]] = []
        # Checks of a config before any version loads (the tasks' options and the files they name).
        self._config_checks: list[Callable[[Path, ModelConfig], None]] = []
        self._retire_listeners: list[Callable[[LoadedModel], None]] = []
        self.startup_complete = False

    # -- queries ---------------------------------------------------------------

    def add_listener(self, listener: Callable[[str, bool], None]) -> None:
        """Called with (model name, ready) whenever a model's readiness changes."""
        self._listeners.append(listener)

    def add_load_check(self, check: Callable[[LoadedModel], Awaitable[None]]) -> None:
        """``await check(model)`` runs on each loaded version before it serves; raising
        fails the load with the error's message as the model's reason."""
        self._load_checks.append(check)

    def add_config_check(self, check: Callable[[Path, ModelConfig], None]) -> None:
        """``check(model_dir, config)`` runs on each parsed config before anything of the model
        is loaded or read; raising fails the load with the error's message as the reason."""
        self._config_checks.append(check)

    def add_retire_listener(self, listener: Callable[[LoadedModel], None]) -> None:
        """Called with each version as it leaves service (unload, reload, failed load)."""
        self._retire_listeners.append(listener)

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def model_names(self) -> list[str]:
        return sorted(self._slots)

    def check_name(self, name: str, version: str = "") -> None:
        """LimitExceeded (INVALID_ARGUMENT) for a name or version over ``max_name_chars``."""
        if len(name) > self.max_name_chars or len(version) > self.max_name_chars:
            check_name_length(name, self.max_name_chars)
            check_name_length(version, self.max_name_chars, "model version")

    def get(self, name: str, version: str = "") -> LoadedModel:
        self.check_name(name, version)
        slot = self._slots.get(name)
        if slot is None:
            raise ModelNotFound(
                f"model {quoted(name)} is not in the repository; available models: {self.model_names()}"
            )
        if slot.state != ModelState.READY:
            detail = f": {slot.reason}" if slot.reason else ""
            raise ModelNotReady(f"model {name!r} is {slot.state.value}{detail}")
        key = version or slot.default_version
        model = slot.versions.get(key)
        if model is None:
            raise ModelNotFound(
                f"model {name!r} has no version {quoted(version)} being served; "
                f"served versions: {sorted(slot.versions)}"
            )
        return model

    def versions(self, name: str) -> list[str]:
        slot = self._slots.get(name)
        return sorted(slot.versions, key=int) if slot else []

    def is_ready(self, name: str, version: str = "") -> bool:
        """Whether ``name`` (``version``) serves; raises only for a name or version over the limit."""
        self.check_name(name, version)
        try:
            self.get(name, version)
        except TaskServeError:
            return False
        return True

    def all_ready(self) -> bool:
        return bool(self._slots) and all(s.state == ModelState.READY for s in self._slots.values())

    def loaded_models(self) -> list[LoadedModel]:
        return [m for s in self._slots.values() for m in s.versions.values()]

    def index(self) -> list[ModelIndexEntry]:
        """Every model directory found, including ones that failed or are not loaded."""
        entries: list[ModelIndexEntry] = []
        known = set(self._slots)
        if self.repository.is_dir():
            known |= set(model_dir_names(self.repository))
        for name in sorted(known):
            slot = self._slots.get(name)
            if slot is None:
                entries.append(ModelIndexEntry(name, "", ModelState.UNAVAILABLE, "unloaded"))
            elif slot.versions:
                entries.extend(
                    ModelIndexEntry(name, v, slot.state, slot.reason) for v in sorted(slot.versions, key=int)
                )
            else:
                entries.append(ModelIndexEntry(name, "", slot.state, slot.reason))
        return entries

    # -- lifecycle -------------------------------------------------------------

    def discover(self) -> list[str]:
        """Model directories in the repository (each holds config.yaml or version folders)."""
        if not self.repository.is_dir():
            raise FileNotFoundError(f"model repository {self.repository} is not a directory")
        return [
            name
            for name in model_dir_names(self.repository)
            if (self.repository / name / "config.yaml").exists() or available_versions(self.repository / name)
        ]

    async def load_all(self) -> None:
        """Load every model found, concurrently; failures are recorded, never raised."""
        names = self.discover()
        for name in names:
            self._slots.setdefault(name, _ModelSlot(name))
        await asyncio.gather(*(self.load(name) for name in names))
        self.startup_complete = True

    async def load(self, name: str) -> None:
        """(Re)load a model from disk. A failure marks it UNAVAILABLE and raises nothing;
        the reason is in ``index()``. Loading a model that is loaded replaces it once
        the new one is ready."""
        self.check_name(name)
        model_dir = model_dir_inside(self.repository, name)  # refuses names that leave the repository
        if not model_dir.is_dir():
            raise ModelNotFound(f"model {quoted(name)} is not in the model repository")
        async with self._lock(name):
            slot = self._slots.setdefault(name, _ModelSlot(name))
            old = dict(slot.versions)
            slot.state, slot.reason = (ModelState.LOADING, "") if not old else (slot.state, slot.reason)
            started = time.perf_counter()
            try:
                config = await asyncio.to_thread(load_model_config, model_dir)
                _check_config_files(model_dir, config)
                for config_check in self._config_checks:
                    config_check(model_dir, config)
                config = config.model_copy(update={"limits": _merged_limits(config.limits, self._default_limits)})
                new_versions = await self._load_versions(name, model_dir, config)
            except Exception as err:  # any failure stays with this model
                reason = err.message if isinstance(err, TaskServeError) else f"{type(err).__name__}: {err}"
                # Callers read reasons (RepositoryIndex, each refused request) and every load logs
                # one: no server paths, addresses or tracebacks, and short.
                reason = caller_safe(without_server_paths(reason, self.repository), MAX_REASON_CHARS)
                log.error("model %s failed to load: %s", name, reason)
                self._metrics.forget(name, keep=old)  # series of versions that never served
                if not old:
                    slot.state, slot.reason = ModelState.UNAVAILABLE, reason
                    self._notify(name, False)
                else:
                    log.warning("keeping the previously loaded versions of %s", name)
                if not isinstance(err, TaskServeError):
                    log.debug("load traceback", exc_info=True)
                return
            slot.config = config
            slot.versions = new_versions
            slot.default_version = max(new_versions, key=int)
            slot.state, slot.reason = ModelState.READY, ""
            for model in new_versions.values():
                model.metrics.set_ready(True)
            elapsed = time.perf_counter() - started
            log.info("model %s ready (versions %s) in %.1fs", name, sorted(new_versions, key=int), elapsed)
            self._notify(name, True)
            # Reload: the new versions serve from here on; the old ones finish what they
            # hold and free their runtimes. Under the lock, so a racing Unload or Load
            # finds the old ones gone and nothing leaks.
            await self._retire(old.values(), keep=new_versions)

    async def _load_versions(self, name: str, model_dir: Path, config: ModelConfig) -> dict[str, LoadedModel]:
        versions = select_versions(available_versions(model_dir), config.version_policy)
        if not versions:
            raise ModelNotReady(
                f"{name}: no version directory to serve (expected e.g. {name}/1/{config.default_model_filename})"
            )
        loaded: dict[str, LoadedModel] = {}
        try:
            for version in versions:
                metrics = self._metrics.for_model(name, str(version))
                model = loaded[str(version)] = await load_version(name, str(version), model_dir, config, metrics)
                for check in self._load_checks:
                    await check(model)
        except BaseException:
            # The previously loaded versions (a reload) keep serving, and their series.
            await self._retire(loaded.values(), keep=self._slots[name].versions if name in self._slots else {})
            raise
        return loaded

    async def unload(self, name: str, drain: bool = True) -> None:
        """Stop serving a model: refuse new requests, finish queued ones, free the runtimes."""
        self.check_name(name)
        if name not in self._slots:
            raise ModelNotFound(f"model {quoted(name)} is not loaded; loaded models: {self.model_names()}")
        async with self._lock(name):
            slot = self._slots.get(name)
            if slot is None:  # unloaded while this call waited for the lock
                return
            slot.state = ModelState.UNLOADING
            self._notify(name, False)
            await self._retire(slot.versions.values(), drain)
            del self._slots[name]
            self._metrics.forget(name)

    async def _retire(
        self, models: Iterable[LoadedModel], drain: bool = True, keep: Mapping[str, LoadedModel] | None = None
    ) -> None:
        """Stop and free ``models``. Versions in ``keep`` (a reload's new ones) share their
        metric series with the old: those stay, with ready 1; the others' series go.

        No new request finds ``models`` any more (the slot serves the new versions, or is
        UNLOADING); with ``drain`` the requests that resolved them before are answered by
        them first (their leases), then their tasks are dropped and their schedulers stop."""
        retired = list(models)
        for model in retired:
            if keep is None or model.version not in keep:
                model.metrics.set_ready(False)
            if drain and not await model.leases.wait_released(self._retire_grace_s):
                log.warning(
                    "model %s version %s: %d requests still running after %.0fs; stopping it anyway",
                    model.name, model.version, model.leases.held, self._retire_grace_s,
                )  # fmt: skip
            for listener in self._retire_listeners:
                listener(model)
            # The scheduler owns the runtimes: stopping it closes them on their own threads.
            await model.lifecycle.stop(drain=drain)
            if keep is not None and model.version not in keep:
                self._metrics.forget(model.name, model.version)
        if retired:
            # Their runtimes closed, so their sessions are freed; without this the freed
            # pages stay in the process's RSS (runtimes/memory.py).
            await asyncio.to_thread(release_freed_memory)

    async def stop(self, drain: bool = True) -> None:
        """Unload everything (graceful shutdown)."""
        for name in list(self._slots):
            await self.unload(name, drain)

    def _notify(self, name: str, ready: bool) -> None:
        for listener in self._listeners:
            listener(name, ready)


def _check_config_files(model_dir: Path, config: ModelConfig) -> None:
    """Files the config itself names must stay inside the model directory: refused at load,
    before anything is read (tasks check their own task_options files where they open them)."""
    if config.labels is not None:
        resolve_inside(model_dir, config.labels, "labels")
    resolve_inside(model_dir, f"1/{config.default_model_filename}", "default_model_filename")
