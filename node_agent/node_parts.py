"""What the node daemon's loops share (:class:`NodeParts`): the model manager, inventory,
metrics, telemetry, energy meter and journal, and what it reports of them.

:func:`build_manager` declares every model (``--model``, the usable files of the model
directories, ``--upstream``); :meth:`NodeParts.runtime_stats` and
:meth:`NodeParts.inventory_body` are what telemetry and INVENTORY frames carry;
:meth:`NodeParts.watch_inventory` polls the model directories and serves new files
(loaded on first request). :mod:`node_agent.daemon` runs the loops.
"""


from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from meshgate.node_messages import ModelLoad
from meshgate.openai import OpenAIError
from node_agent import report
from node_agent.accounting import Accounting
from node_agent.config import NodeOptions
from node_agent.energy import Uses, cpu_only
from node_agent.energy_meter import EnergyMeter, NvmlEnergy
from node_agent.inventory import Inventory, ModelFile, ollama_entry, read_model_file
from node_agent.journal import UsageJournal
from node_agent.metrics import NodeMetrics
from node_agent.models import ModelManager, model_name, parse_model_spec
from node_agent.nvml import NvmlSource
from node_agent.rapl import RaplSource
from node_agent.state import NodeState
from node_agent.telemetry import TelemetrySampler, TelemetryService

if TYPE_CHECKING:
    from node_agent.members import MemberLinks
    from node_agent.runtimes.llama.supervisor import LlamaRunner
    from node_agent.runtimes.mesh import MeshRuntime
    from node_agent.runtimes.ollama.host import OllamaHost

__all__ = ["NVML_MODULE_ENV", "NodeParts", "build_manager", "load_nvml_module"]

log = logging.getLogger(__name__)

#: ``module[:attribute]`` of an object that stands in for ``pynvml`` (tests, diagnostics).
NVML_MODULE_ENV = "MESHGATE_NVML_MODULE"
#: At most this many files are listed in one INVENTORY frame (``files_total`` says how many
#: there are); ~300 bytes each, well inside the tunnel's 16 MiB frame limit.
MAX_INVENTORY_FILES = 1000

_FILE_FIELDS = (
    "name",
    "path",
    "size_bytes",
    "usable",
    "reason",
    "architecture",
    "parameter_count",
    "quantization",
    "context_length",
    "block_count",
)


def load_nvml_module(env: dict[str, str] | os._Environ[str] = os.environ) -> Any | None:
    """The NVML stand-in named by MESHGATE_NVML_MODULE, else None (``pynvml``, lazily)."""
    spec = env.get(NVML_MODULE_ENV)
    if not spec:
        return None
    module_name, _, attr = spec.partition(":")
    obj: Any = importlib.import_module(module_name)
    if attr:
        obj = getattr(obj, attr)
        if callable(obj) and not hasattr(obj, "nvmlInit"):
            obj = obj()
    log.warning("using %s in place of pynvml", spec)
    return obj


def build_manager(
    opts: NodeOptions,
    state: NodeState,
    files: Sequence[ModelFile] = (),
    inventory: Callable[[], Sequence[ModelFile]] | None = None,
) -> tuple[ModelManager, dict[str, LlamaRunner]]:
    """The manager with every declared model, the usable files of the model dirs and upstreams.

    An unusable file found in a model directory is skipped (it stays in the
    inventory with its reason); a file given by ``--model`` is served as asked.
    """
    manager = ModelManager(run_dir=state.run_dir, inventory=inventory or (lambda: files))
    runners: dict[str, LlamaRunner] = {}
    specs = [parse_model_spec(spec) for spec in opts.models]
    taken = {name for name, _ in specs}
    for f in files:
        name = model_name(Path(f.path))
        if not f.usable:
            log.warning("not serving %s: %s", f.path, f.reason)
        elif name in taken:
            log.info("not serving %s: the name %s is taken", f.path, name)
        else:
            taken.add(name)
            specs.append((name, Path(f.path)))
    explicit = {name for name, _ in specs[: len(opts.models)]}
    for name, path in specs:
        try:
            runners[name] = manager.add_llama(
                name,
                path,
                n_ctx=opts.n_ctx,
                n_gpu_layers=opts.n_gpu_layers,
                keep_alive=opts.keep_alive,
            )
        except ValueError as exc:
            if name in explicit:
                raise
            log.warning("not serving %s from %s: %s", name, path, exc)
    for spec in opts.upstreams:
        name, _, url = spec.partition("=")
        manager.add_upstream(name, url)
    return manager, runners


def _ollama_host(url: str) -> OllamaHost:
    from node_agent.runtimes.ollama.host import OllamaHost  # deferred: only with --ollama

    return OllamaHost(url)


def _compact(f: ModelFile) -> dict[str, Any]:
    d = f.to_dict()
    return {k: d[k] for k in _FILE_FIELDS}


class NodeParts:
    """What the daemon's loops share: the manager, inventory, metrics and telemetry."""

    def __init__(self, opts: NodeOptions, state: NodeState) -> None:
        self.opts = opts
        self.state = state
        self.inventory = Inventory(opts.model_dirs)
        self.files: list[ModelFile] = []
        self.explicit: list[ModelFile] = []
        self.manager: ModelManager
        self.runners: dict[str, LlamaRunner] = {}
        self._served_from_dir: dict[str, str] = {}  # model-dir file path -> model name
        self.link: MemberLinks | None = None
        self.nvml = NvmlSource(load_nvml_module())
        self.ollama = _ollama_host(opts.ollama) if opts.ollama else None
        self.metrics: NodeMetrics
        self.telemetry: TelemetryService
        self.load_times = report.LoadTimes()
        self.energy_nvml = NvmlSource(load_nvml_module())  # its own: the sampler has a thread
        self.meter = EnergyMeter(
            [NvmlEnergy(self.energy_nvml), RaplSource(opts.powercap_dir)],
            period=opts.energy_period,
            price_per_kwh=opts.electricity_price_per_kwh,
        )
        self.journal = UsageJournal(state.path, opts.journal_max_bytes)
        self.accounting = Accounting(self.meter, self.journal, online=self.online,
                                     devices_for=self.devices_for)

    def devices_for(self, model: str) -> Uses | None:
        """A model with no layer on a GPU (latest telemetry) is metered on the CPU alone."""
        sample = self.telemetry.latest() if hasattr(self, "telemetry") else None
        entry = ((sample or {}).get("runtime") or {}).get(model)
        layers = entry.get("n_gpu_layers") if isinstance(entry, dict) else None
        return cpu_only if layers == 0 else None

    def online(self) -> bool:
        """Whether the coordinator can hear about requests now (True: no coordinator at all)."""
        return self.link is None or self.link.connected

    async def setup(self) -> None:
        self.files = await asyncio.to_thread(self.inventory.scan)
        self.explicit = await asyncio.to_thread(self._read_explicit)
        for f in self.files:
            if not f.usable:
                log.warning("unusable model file %s: %s", f.path, f.reason)
        self.manager, self.runners = build_manager(
            self.opts, self.state, self.files, inventory=lambda: self.files
        )
        self._served_from_dir = self._dir_models()
        if self.ollama is not None:
            await self.sync_ollama()
        self.metrics = NodeMetrics(
            served=self.manager.names, stats=self.runtime_stats, telemetry=self.latest,
            serves=self.manager.serves,
        )
        self.metrics.account(self.accounting)
        sampler = TelemetrySampler(self.opts.model_dirs, self.nvml)
        self.telemetry = TelemetryService(
            sampler,
            period=self.opts.telemetry_period,
            runtime_stats=self.runtime_stats,
            runtime_extra=_runner_memory,
        )

    def _read_explicit(self) -> list[ModelFile]:
        out = []
        for spec in self.opts.models:
            _, path = parse_model_spec(spec)
            with contextlib.suppress(OSError):
                out.append(read_model_file(path))
        return out

    def mesh_runtime(self, model: str) -> MeshRuntime | None:
        """Request path 1's way out: a model not served here, asked of the coordinator."""
        return self.link.mesh_runtime(model) if self.link is not None else None

    def latest(self) -> dict[str, Any] | None:
        return self.telemetry.latest()

    def runtime_stats(self) -> dict[str, Any]:
        """Per model: the manager's figures (recent token rates included) and the runner's pid."""
        out: dict[str, Any] = {}
        for name, stats in self.manager.stats().items():
            entry = dict(stats) if isinstance(stats, dict) else {}
            entry.setdefault("loaded", entry.get("state", "loaded") == "loaded")
            entry.setdefault("queue", entry.get("queued", 0))
            for ours, theirs in (
                ("prefill_tps", "prompt_tokens_per_s"),
                ("decode_tps", "generation_tokens_per_s"),
            ):
                if entry.get(ours) is None:
                    entry[ours] = entry.get(theirs)
            runtime = self.manager.get(name)
            own = runtime.describe() if runtime is not None else None
            if own and "loaded" in own:  # the runtime knows better (Ollama's own ps)
                entry["loaded"] = bool(own["loaded"])
            runner = self.runners.get(name)
            if "pid" not in entry and runner is not None:
                entry["pid"] = runner.pid
            out[name] = entry
        return report.clean_runtime(out)

    def inventory_body(self) -> dict[str, Any]:
        by_name = {model_name(Path(f.path)): f for f in [*self.explicit, *self.files]}
        models: list[dict[str, Any]] = []
        from_files: dict[str, ModelFile] = {}
        stats = self.manager.stats()
        for name in self.manager.names():
            got = stats.get(name)
            s: dict[str, Any] = got if isinstance(got, dict) else {}
            entry: dict[str, Any] = {
                "name": name,
                "loaded": s.get("state", "loaded") == "loaded",
                "kind": s.get("kind"),
            }
            from_file = name in self.runners or name in self._served_from_dir.values()
            f = by_name.get(name) if from_file else None
            if f is not None:
                entry.update(_compact(f))
                entry["name"] = name
                from_files[name] = f
                entry["context_length"] = min(self.opts.n_ctx, f.context_length or self.opts.n_ctx)
            entry["source"] = "gguf" if from_file else entry["kind"]
            models.append(entry)
        files = [_compact(f) for f in self.files]
        body: dict[str, Any] = {
            "models": models,
            "files": files[:MAX_INVENTORY_FILES],
            "files_total": len(files),
            "model_dirs": [str(d) for d in self.opts.model_dirs],
        }
        if self.ollama is not None:
            known = {m.name: ollama_entry(m) for m in self.ollama.models}
            for entry in models:
                if entry["kind"] == "ollama" and entry["name"] in known:
                    entry.update(known[entry["name"]])
                elif entry["kind"] == "ollama":  # gone from Ollama: requests get its 404
                    entry.update(loaded=False, available=False)
            body["ollama"] = {"url": self.ollama.url, "models": list(known.values())}
        body["models"] = report.annotate_inventory(models, stats, from_files, self.opts.n_ctx,
                                                   self.load_times)
        return body

    def load_state(self) -> dict[str, ModelLoad]:
        """In flight, queued and loaded per model now (each link sends deltas of it)."""
        stats = self.manager.load_states()
        now = time.monotonic()
        for name, state in stats.items():
            self.load_times.observe(name, state.get("state"), now)
        return report.load_state(stats)

    async def sync_ollama(self) -> None:
        """Serve the local Ollama's models; an Ollama that is down is a warning, not a failure."""
        assert self.ollama is not None
        try:
            added = await self.ollama.sync(self.manager)
        except OpenAIError as exc:
            log.warning(
                "ollama at %s: %s (will retry every %ss)",
                self.ollama.url,
                exc.message,
                self.opts.ollama_period,
            )
            return
        log.info("ollama at %s: serving %s", self.ollama.url, added)

    def inventory_changed(self) -> None:
        if self.link is not None:
            self.link.inventory_changed()

    async def watch_inventory(self) -> None:
        """Poll the model dirs (stat only); on a change rescan and tell the coordinator."""
        while True:
            await asyncio.sleep(self.opts.inventory_period)
            try:
                if not await asyncio.to_thread(self.inventory.changed):
                    continue
                before = {f.path for f in self.files}
                self.files = await asyncio.to_thread(self.inventory.scan)
            except OSError as exc:
                log.warning("cannot rescan the model directories: %s", exc)
                continue
            after = {f.path for f in self.files}
            log.info("model files changed: +%s -%s", sorted(after - before), sorted(before - after))
            for f in self.files:
                if f.path not in before and not f.usable:
                    log.warning("unusable model file %s: %s", f.path, f.reason)
            await self.serve_new_files(before - after)
            if self.link is not None:
                self.link.inventory_changed()

    def _dir_models(self) -> dict[str, str]:
        """path -> model name of the model-dir files being served (not the --model ones)."""
        explicit = {str(parse_model_spec(spec)[1]) for spec in self.opts.models}
        names = set(self.manager.names())
        return {
            f.path: model_name(Path(f.path))
            for f in self.files
            if f.usable and f.path not in explicit and model_name(Path(f.path)) in names
        }

    async def serve_new_files(self, gone: set[str]) -> None:
        """Serve usable files that appeared (loaded on first request); forget removed ones."""
        for path in sorted(gone):
            name = self._served_from_dir.pop(path, None)
            if name is not None and await self.manager.remove(name):
                log.info("model file %s is gone: no longer serving %s", path, name)
        for f in self.files:
            name = model_name(Path(f.path))
            if not f.usable or f.path in self._served_from_dir or name in self.manager.names():
                continue
            self.manager.declare(
                name,
                f.path,
                n_ctx=self.opts.n_ctx,
                n_gpu_layers=self.opts.n_gpu_layers,
                keep_alive=self.opts.keep_alive,
            )
            self._served_from_dir[f.path] = name
            log.info("new model file %s: serving it as %s (loaded on first request)", f.path, name)


def _runner_memory(runtime: dict[str, Any]) -> None:
    """Add each runner's resident memory (``rss_bytes``) where its pid is known (thread)."""
    for entry in runtime.values():
        pid = entry.get("pid") if isinstance(entry, dict) else None
        if not isinstance(pid, int) or entry.get("rss_bytes") is not None:
            continue
        try:
            entry["rss_bytes"] = psutil.Process(pid).memory_info().rss
        except (psutil.Error, OSError):
            entry["rss_bytes"] = None


