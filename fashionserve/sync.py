"""Sync: the version an MLflow alias names, served live by Triton.

The aliased version is downloaded, validated again, rendered as a new numeric Triton version and swapped
in while the old one keeps serving (see `sync_once`), then tagged live in MLflow. The plan store holds
the TensorRT plans of registered bundles for the gpu target.

How the swap stays exact and never fails a request (Triton 2.51, explicit model control):
- The ensemble pins each step to the Triton version it was written with (`model_version: N`), and
  Triton resolves a request's composing models when the request starts, so a request never mixes
  versions. Composing models keep the two newest versions loaded (`latest { num_versions: 2 }`), so
  the old ensemble still has its versions until its last request is done.
- Composing models load first, through a load of the unchanged (still old-pinned) ensemble: a version
  that fails to load leaves the ensemble, and so the service, untouched. Only when every composing
  model has the new version ready does the ensemble get its new version, which Triton swaps in after
  it is ready. (A failed ensemble load would unload the old ensemble, so it comes last.)
- Config files are shared by all versions of a model, so a version whose tensors differ from the live
  one's cannot be swapped in live; sync refuses it.
- Each ensemble config names the registered model version it serves (SERVED_PARAMETERS), so any
  client can read what is live from Triton's model-config API (the repository index needs the admin
  key); `web/status.py` does.
- The python backend compiles `model.py` on import; a `__pycache__` written into a version dir would
  make Triton see the model as modified and reload it on every later load. Version dirs are written
  with their bytecode already compiled.

How it stays safe when it is killed or stopped at any moment:
- Served configs are rendered from the tracked configs (model_repository/), never from a version's
  artifacts, and every name a version gives is validated (fashionserve.registry): nothing a registered
  version says can place a file outside the served repository.
- One state file per repository holds an entry per registered model, so one process can serve several
  (mlflow/sync.py --model A --model B): each model's swap has its own journal, and what one model's
  sync cleans up never touches the files of another model's unfinished swap.
- A journal in the state file (`pending`: the Triton version being swapped in, its models, the folders
  it created) is written before the served repository changes; each config it replaces is kept beside
  it (CONFIG_BACKUP). Every sync starts by finishing that journal: it keeps the new version if Triton
  already serves it, else rolls it back (version dirs removed, configs restored, live ensembles
  reloaded). Only versions a state records count: the live one and, for composing models, the one
  before it; any other version dir is removed once Triton has settled, so a killed sync's leftovers
  never shift the two-version window. Downloads go to one temp folder per repository (work_dir),
  emptied at every start.
- A stop (SIGTERM, Ctrl-C: request_stop) is deferred to the next safe point: after a step Triton has
  finished, the swap is rolled back (or, once the ensembles switched, finished), so Triton serves one
  version when the process exits.
"""

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import py_compile
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import np_to_triton_dtype

from fashionserve.plans import record_plan
from fashionserve.registry import (
    ALIAS,
    GATE_FORCED_TAG,
    RANDOM_INIT,
    RegistryError,
    bundle_digest,
    bundle_path,
    check_model_name,
    download_bundle,
    file_sha256,
    first_line,
    mlflow_errors,
    one_line,
)
from fashionserve.repository import (
    RenderError,
    ensemble_steps,
    pipeline_ensembles,
    read_config,
    render_repository,
    write_config,
)

LIVE_TAG = "triton.live"
TRITON_VERSION_TAG = "triton.version"
LIVE_VERSION_TAG = "triton.live_version"  # on the registered model
STATE_FILE = ".fashionserve-sync.json"  # in the served repository; Triton only looks at folders
LOCK_FILE = ".fashionserve-sync.lock"
CONFIG_BACKUP = ".config.pbtxt.previous"  # in a model folder while a swap replaces its config
PLAN_STORE_INDEX = "plans.json"
# Triton's model-control API answers only requests with this header when it runs with
# --http-restricted-api / --grpc-restricted-protocol model-repository:<ADMIN_HEADER>=<key> (k8s, compose).
ADMIN_HEADER = "fashionserve-admin-key"
ADMIN_KEY_ENV = "TRITON_ADMIN_KEY"  # where mlflow/sync.py reads the key from
# Ensemble config parameters naming what the ensemble serves: registered model, its MLflow version, and
# "true" when that version has random-init weights (outputs are noise).
SERVED_PARAMETERS = ("registered_model", "registered_version", "random_init")
COMPOSING_VERSIONS = 2  # the live version and the one before it, see the module docstring
CHECK_DYNAMIC_SIZE = 32  # size of a dynamic input dimension (e.g. any image height) in the post-load check
_SETTLE_TIMEOUT_S = 60.0
_QUERY_TIMEOUT_S = 60.0  # every Triton call but a load
_POLL_S = 0.2
_stop = threading.Event()


# ---------------------------------------------------------------------------------------------------
# Sync


@dataclass(frozen=True)
class SyncResult:
    mlflow_version: str
    triton_version: int
    changed: bool
    seconds: float


class SyncStopped(RegistryError):
    """A stop request ended the sync at a safe point; the message says which version Triton serves."""


def request_stop() -> None:
    """Ask the running sync to stop at its next safe point (callable from a signal handler)."""
    _stop.set()


def stop_requested(wait: float = 0.0) -> bool:
    """Whether a stop was requested, waiting up to `wait` seconds for one."""
    return _stop.wait(wait) if wait > 0 else _stop.is_set()


def _checkpoint(message: str) -> None:
    if _stop.is_set():
        raise SyncStopped(message)


def work_dir(repository: Path) -> Path:
    """The temp folder of syncs into `repository` (one per repository, emptied at every start, so a
    killed sync's download does not stay behind)."""
    key = hashlib.sha256(str(repository.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"fashionserve-sync-{key}"


class TritonControl:
    """The repository API and readiness checks of one Triton server, with one-line errors. Sends the
    admin key header (ADMIN_HEADER) when given one."""

    def __init__(self, url: str, load_timeout: float, admin_key: str | None = None):
        self.url = url
        self.headers = {ADMIN_HEADER: admin_key} if admin_key else None
        try:
            self.client = httpclient.InferenceServerClient(
                url, connection_timeout=10.0, network_timeout=_QUERY_TIMEOUT_S
            )
            self.loader = httpclient.InferenceServerClient(
                url, connection_timeout=10.0, network_timeout=load_timeout
            )
            live = self.client.is_server_live()
        except Exception as exc:  # tritonclient raises several types for a refused connection
            raise RegistryError(f"cannot reach Triton at {url} over HTTP: {first_line(exc)}") from None
        if not live:
            raise RegistryError(f"Triton at {url} is not live")

    def versions(self, model: str) -> dict[int, tuple[str, str]]:
        """Version -> (state, reason) of `model` as Triton's repository index reports it."""
        try:
            index = self.client.get_model_repository_index(headers=self.headers)
        except Exception as exc:  # a refusal, a lost connection or a timeout: one line all the same
            raise RegistryError(f"Triton at {self.url}: {first_line(exc)}") from None
        return {
            int(entry["version"]): (entry.get("state", ""), entry.get("reason", ""))
            for entry in index
            if entry["name"] == model and entry.get("version", "").isdigit()
        }

    def ready(self, model: str, version: int) -> bool:
        try:
            return self.client.is_model_ready(model, str(version))
        except Exception:  # not ready as far as anyone can tell
            return False

    def load(self, model: str) -> str | None:
        """Ask Triton to (re)load `model`; its error message (a refusal, or e.g. the call timing out
        while Triton goes on loading), or None."""
        try:
            self.loader.load_model(model, headers=self.headers)
        except Exception as exc:
            return first_line(exc)
        return None

    def unload(self, model: str) -> None:
        """Unload `model` and the models it uses (best effort: called while rolling back)."""
        with contextlib.suppress(Exception):
            self.loader.unload_model(model, headers=self.headers, unload_dependents=True)

    def check_inference(self, model: str, version: int, manifest: dict) -> None:
        """One real request (batch 1, zero inputs; a dynamic dimension gets a small size) to `version`,
        outputs as the contract says (a dynamic output dimension matches any size)."""
        inputs = []
        for spec in manifest["input_contract"]:
            shape = [CHECK_DYNAMIC_SIZE if size < 0 else size for size in spec["shape"]]
            array = np.zeros([1, *shape], dtype=spec["dtype"])
            tensor = httpclient.InferInput(spec["name"], list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        try:
            result = self.client.infer(model, inputs, model_version=str(version))
        except Exception as exc:
            raise RegistryError(f"inference on {model} version {version} failed: {first_line(exc)}") from None
        for spec in manifest["output_contract"]:
            output = result.as_numpy(spec["name"])
            expected = (1, *spec["shape"])
            if (
                output is None
                or len(output.shape) != len(expected)
                or any(e >= 0 and o != e for o, e in zip(output.shape, expected, strict=True))
                or output.dtype != np.dtype(spec["dtype"])
            ):
                got = "nothing" if output is None else f"{output.dtype} {list(output.shape)}"
                raise RegistryError(
                    f"{model} version {version} returned {got} for '{spec['name']}', "
                    f"expected {spec['dtype']} {list(expected)}"
                )

    def wait_settled(self, models: list[str]) -> bool:
        """Wait (bounded) until none of `models` has a version loading or unloading."""
        deadline = time.monotonic() + _SETTLE_TIMEOUT_S
        while any(
            state in ("LOADING", "UNLOADING") for m in models for state, _ in self.versions(m).values()
        ):
            if time.monotonic() > deadline:
                return False
            time.sleep(_POLL_S)
        return True


def _numeric_dirs(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(
        int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and p.name[0] != "0"
    )


def _prepare(staged: Path, pipeline: str, version: int, served: dict[str, str]) -> list[str]:
    """Pin the staged ensemble to `version` and label it with `served` (SERVED_PARAMETERS), keep two
    versions of each composing model loaded and compile each python-backend model.py in place; returns
    the composing model names."""
    ensemble = read_config(staged / pipeline / "config.pbtxt")
    composing = list(dict.fromkeys(step.model_name for step in ensemble.ensemble_scheduling.step))
    for step in ensemble.ensemble_scheduling.step:
        step.model_version = version
    for key, value in served.items():
        ensemble.parameters[key].string_value = value
    write_config(ensemble, staged / pipeline / "config.pbtxt")
    for name in composing:
        config = read_config(staged / name / "config.pbtxt")
        config.version_policy.latest.num_versions = COMPOSING_VERSIONS
        write_config(config, staged / name / "config.pbtxt")
        for source in (staged / name / str(version)).glob("*.py"):
            py_compile.compile(str(source), cfile=importlib.util.cache_from_source(str(source)), doraise=True)
    return composing


def _tensors(config: mc.ModelConfig) -> list[tuple]:
    return [(t.name, t.data_type, list(t.dims)) for t in [*config.input, *config.output]]


def _install(repository: Path, staged: Path, model: str, version: int) -> None:
    """Version dir (copied aside, then renamed: Triton never sees half of it), then the config, the one
    it replaces kept as CONFIG_BACKUP for a rollback."""
    source, dest = staged / model, repository / model
    dest.mkdir(exist_ok=True)
    aside = dest / f".{version}.partial"  # not numeric: Triton ignores it
    shutil.copytree(source / str(version), aside)
    aside.rename(dest / str(version))
    config, backup = dest / "config.pbtxt", dest / CONFIG_BACKUP
    if config.exists() and not backup.exists():
        _write_atomic(backup, config.read_bytes())
    _write_atomic(config, (source / "config.pbtxt").read_bytes())


def _write_atomic(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    partial.replace(path)


def _read_state(repository: Path) -> dict:
    path = repository / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_state(repository: Path, name: str, entry: dict) -> None:
    _write_atomic(repository / STATE_FILE, json.dumps({**_read_state(repository), name: entry}).encode())


@contextlib.contextmanager
def _locked(repository: Path) -> Iterator[None]:
    with open(repository / LOCK_FILE, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RegistryError(
                f"another sync is writing to {repository}; try again when it is done"
            ) from None
        yield


def _mark_live(client: MlflowClient, name: str, version: str, triton_version: int) -> None:
    """Tag `version` as the one Triton serves (and no other); writes only what differs."""
    with mlflow_errors(f"tagging the live version of '{name}'"):
        for other in client.search_model_versions(f"name='{name}'"):
            if other.version != version and LIVE_TAG in other.tags:
                client.delete_model_version_tag(name, other.version, LIVE_TAG)
        current = client.get_model_version(name, version).tags
        wanted = {LIVE_TAG: "true", TRITON_VERSION_TAG: str(triton_version)}
        for key, value in wanted.items():
            if current.get(key) != value:
                client.set_model_version_tag(name, version, key, value)
        if client.get_registered_model(name).tags.get(LIVE_VERSION_TAG) != version:
            client.set_registered_model_tag(name, LIVE_VERSION_TAG, version)


# ---------------------------------------------------------------------------------------------------
# Plan store: TensorRT plans of registered bundles, built on the GPU host
#
# Plans are derived artifacts (one per TensorRT version and GPU architecture), so they are not
# registered; the plan builder (deploy/plan_builder.py) writes them into a folder shared with sync, per
# registered model and bundle digest, and sync on the gpu target takes them from there.


def plan_store_dir(store: Path, name: str, digest: str) -> Path:
    """The folder of one bundle's plans: a plan only ever serves the ONNX it was built from."""
    return store / name / digest


def publish_plans(bundle_dir: Path, manifest: dict, dest: Path) -> list[str]:
    """Copy the plans the manifest lists (built by fashionserve.plans.build_bundle_plans) into `dest` and
    index them, with their sha256, in dest/plans.json, beside the plans already there. Each file is
    copied aside and renamed, the index last: a reader never sees half a plan. Returns the files."""
    index = dest / PLAN_STORE_INDEX
    stored = {"plans": json.loads(index.read_text()) if index.is_file() else {}}
    published = []
    for network, entries in manifest.get("plans", {}).items():
        for entry in entries:
            target = dest / entry["file"]
            target.parent.mkdir(parents=True, exist_ok=True)
            aside = target.with_name(f".{target.name}.partial")
            shutil.copyfile(bundle_dir / entry["file"], aside)
            aside.replace(target)
            stored = record_plan(stored, network, {**entry, "sha256": file_sha256(target)})
            published.append(entry["file"])
    _write_atomic(index, json.dumps(stored["plans"], indent=2).encode())
    return published


def attach_plans(bundle_dir: Path, manifest: dict, source: Path) -> dict:
    """Copy the plans stored in `source` (publish_plans) into the bundle, each checked against its
    sha256; returns the manifest listing them."""
    index = source / PLAN_STORE_INDEX
    if not index.is_file():
        raise RegistryError(
            f"no TensorRT plans for this bundle in {source}: build them on this GPU host with "
            "deploy/plan_builder.py (the plan-builder service)"
        )
    stored = {"plans": manifest.get("plans", {})}
    label = f"plan store {source}"
    for network, entries in json.loads(index.read_text()).items():
        check_model_name(network, f"{label}: network")
        for entry in entries:  # the store is a shared folder: its paths stay inside it and the bundle
            target = bundle_path(bundle_dir.resolve(), entry["file"], label)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundle_path(source.resolve(), entry["file"], label), target)
            if file_sha256(target) != entry["sha256"]:
                raise RegistryError(f"plan {source / entry['file']} differs from its sha256 (corrupted?)")
            stored = record_plan(stored, network, entry)
    return {**manifest, "plans": stored["plans"]}


def sync_once(
    client: MlflowClient,
    name: str,
    repository: Path,
    triton_url: str,
    alias: str = ALIAS,
    target: str = "cpu",
    variant: str = "fp32",
    load_timeout: float = 600.0,
    log: Callable[[str], None] = print,
    plans: Path | None = None,
    admin_key: str | None = None,
) -> SyncResult:
    """Make Triton serve the version `alias` points at, as a new Triton version in `repository` (the
    folder Triton serves, explicit model control): every ensemble the bundle serves (e.g. `hair`:
    hair_transfer and hair_edit) and their composing models. Idempotent: nothing changes when it
    already does. First finishes what an interrupted sync left (see the module docstring). On the gpu
    target, `plans` is the plan store the plan builder wrote the version's plans into; `admin_key` is
    sent with Triton's model-control calls (ADMIN_HEADER)."""
    started = time.monotonic()
    check_model_name(name, "registered model")
    repository = repository.resolve()
    repository.mkdir(parents=True, exist_ok=True)
    triton = TritonControl(triton_url, load_timeout, admin_key)
    with mlflow_errors(f"reading alias '{alias}' of '{name}'"):
        model_version = client.get_model_version_by_alias(name, alias)
    wanted = {"mlflow_version": model_version.version, "target": target, "variant": variant}
    with _locked(repository):
        _checkpoint("stopped before changing anything")
        work = work_dir(repository)
        shutil.rmtree(work, ignore_errors=True)  # a killed sync's download
        for leftover in repository.glob("*/.*.partial"):  # a killed sync's copy in progress
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        _finish_interrupted(triton, repository, name, log)
        # the models of swaps of other registered models that a killed sync left: their rollback needs them
        unfinished = {
            model
            for entry in _read_state(repository).values()
            for model in entry.get("pending", {}).get("models", [])
        }
        for backup in repository.glob(f"*/{CONFIG_BACKUP}"):  # of a swap that was finished
            if backup.parent.name not in unfinished:
                backup.unlink()
        state = _read_state(repository).get(name, {})
        _prune(triton, repository, name, state, log)
        served = _served_contracts(state, name)  # ensemble -> contract of what is live
        primary = next(iter(served))
        ready = [v for v, (s, _) in triton.versions(primary).items() if s == "READY"]
        live = max(ready) if ready else None
        current = state.get("triton_version")
        if all(state.get(k) == v for k, v in wanted.items()) and current in _numeric_dirs(
            repository / primary
        ):
            if live != current:  # e.g. Triton restarted: the files are there, load them again
                log(f"{name} version {model_version.version} is not loaded in Triton; loading it")
                for ensemble, contract in served.items():
                    _load_ready(triton, ensemble, current, f"{ensemble} version {current}")
                    triton.check_inference(ensemble, current, contract)
            _mark_live(client, name, model_version.version, current)
            return SyncResult(model_version.version, current, live != current, time.monotonic() - started)
        try:
            work.mkdir(parents=True)
            log(f"{name} alias '{alias}' -> version {model_version.version}: downloading")
            manifest, staged, version = _stage(
                model_version, client, work, repository, state, target, variant, plans
            )
            contracts = _manifest_contracts(manifest)
            ensembles = list(contracts)
            labels = _served_labels(model_version)
            composing = list(
                dict.fromkeys(m for e in ensembles for m in _prepare(staged, e, version, labels))
            )
            _checkpoint(f"stopped before writing Triton version {version}; nothing was changed")
            models = [*composing, *ensembles]
            new_state = {
                **wanted,
                "triton_version": version,
                "previous_triton_version": current,
                **contracts[ensembles[0]],
                "ensembles": contracts,
                "composing": composing,
                "last_version": version,
            }
            created = [model for model in models if not (repository / model).exists()]
            journal = {"triton_version": version, "models": models, "created": created, "state": new_state}
            _write_state(repository, name, {**state, "last_version": version, "pending": journal})
            try:
                if live is None:
                    log(f"writing Triton version {version} ({target}, {variant}) and loading it")
                    for model in models:
                        _install(repository, staged, model, version)
                    for ensemble in ensembles:
                        _load_ready(triton, ensemble, version, f"{ensemble} version {version}")
                else:
                    log(f"writing Triton version {version} ({target}, {variant}) beside live version {live}")
                    _swap(triton, repository, staged, ensembles, composing, version, live, log)
                for ensemble, contract in contracts.items():
                    triton.check_inference(ensemble, version, contract)
            except BaseException:
                try:
                    _finish_interrupted(triton, repository, name, log, keep_new=False)
                except RegistryError as exc:  # reported; the next sync finishes the rollback
                    log(f"error: {exc}")
                raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        _commit(repository, name, {**new_state, "synced_at": datetime.now(UTC).isoformat()}, models)
        _mark_live(client, name, model_version.version, version)
        _prune(triton, repository, name, _read_state(repository)[name], log)
    seconds = time.monotonic() - started
    log(f"live: {name} version {model_version.version} as Triton version {version} ({seconds:.1f} s)")
    return SyncResult(model_version.version, version, True, seconds)


def _commit(repository: Path, name: str, entry: dict, models: list[str]) -> None:
    """Record `entry` as what is served (the journal goes with the old entry), then drop the configs
    the swap kept for a rollback."""
    _write_state(repository, name, entry)
    for model in models:
        (repository / model / CONFIG_BACKUP).unlink(missing_ok=True)


def _finish_interrupted(
    triton: TritonControl, repository: Path, name: str, log: Callable[[str], None], keep_new: bool = True
) -> None:
    """Finish the swap the journal records as in progress, if any: keep its version when Triton already
    serves it (and `keep_new`), else roll it back. Nothing is touched while Triton is still loading."""
    entry = _read_state(repository).get(name, {})
    journal = entry.get("pending")
    if journal is None:
        return
    version, models = journal["triton_version"], journal["models"]
    contracts = journal["state"]["ensembles"]
    if not triton.wait_settled(models):
        raise RegistryError(
            f"Triton is still loading models of the unfinished Triton version {version} of '{name}'; "
            "the next sync finishes or rolls it back"
        )
    if keep_new and all(triton.ready(model, version) for model in models):
        try:
            for ensemble, contract in contracts.items():
                triton.check_inference(ensemble, version, contract)
        except RegistryError as exc:
            log(f"Triton version {version} of an interrupted sync is loaded but failed: {exc}")
        else:
            _commit(repository, name, journal["state"], models)
            log(f"an interrupted sync had switched '{name}' to Triton version {version}: kept")
            return
    live = entry.get("triton_version")
    if live is None:  # nothing was served before: nothing stays loaded
        for ensemble in contracts:
            triton.unload(ensemble)
    for model in models:
        folder = repository / model
        if (folder / CONFIG_BACKUP).exists():
            (folder / CONFIG_BACKUP).replace(folder / "config.pbtxt")
        shutil.rmtree(folder / str(version), ignore_errors=True)
    for model in journal["created"]:
        shutil.rmtree(repository / model, ignore_errors=True)
    if live is not None:  # Triton drops what the repository no longer has and keeps the live version
        served = _served_contracts(entry, name)
        errors = [error for error in map(triton.load, served) if error]
        settled = triton.wait_settled([*served, *models])
        if not settled or not all(triton.ready(ensemble, live) for ensemble in served):
            raise RegistryError(
                f"rolled back Triton version {version} of '{name}', but Triton did not reload version "
                f"{live}: {next(iter(errors), 'not ready')}"
            )
    _write_state(repository, name, {k: v for k, v in entry.items() if k != "pending"})
    log(f"rolled back Triton version {version} of '{name}'" + (f"; version {live} serves" if live else ""))


def _served_labels(model_version: ModelVersion) -> dict[str, str]:
    """The SERVED_PARAMETERS of an ensemble that serves `model_version`."""
    random_init = "true" if RANDOM_INIT in model_version.tags else "false"
    values = (model_version.name, model_version.version, random_init)
    return dict(zip(SERVED_PARAMETERS, values, strict=True))


def _manifest_contracts(manifest: dict) -> dict[str, dict]:
    """Ensemble -> its input and output contract, for every ensemble the bundle serves."""
    top = {key: manifest[key] for key in ("input_contract", "output_contract")}
    return {e: manifest.get("ensembles", {}).get(e, top) for e in pipeline_ensembles(manifest)}


def _served_contracts(state: dict, name: str) -> dict[str, dict]:
    """Ensemble -> contract of what a sync recorded as served for registered model `name` (a state
    written before bundles could serve several ensembles has one, named like the model)."""
    return state.get("ensembles") or {name: state}


def _stage(
    model_version: ModelVersion,
    client: MlflowClient,
    tmp: Path,
    repository: Path,
    state: dict,
    target: str,
    variant: str,
    plans: Path | None,
) -> tuple[dict, Path, int]:
    """Download and validate the version (with its plans from the plan store `plans` on the gpu
    target), render it from the tracked configs as the next Triton version into tmp/staged; returns
    (manifest, staged repository, Triton version)."""
    name = model_version.name
    # A corrupted or crafted artifact stops here, before anything reaches the served repository.
    bundle, manifest = download_bundle(client, model_version, tmp / "download")
    if plans is not None and target == "gpu":
        manifest = attach_plans(bundle, manifest, plan_store_dir(plans, name, bundle_digest(bundle)))
    ensembles = pipeline_ensembles(manifest)
    models = [*ensembles, *(step.model_name for ensemble in ensembles for step in ensemble_steps(ensemble))]
    # Never a number used before, even by a version that was rolled back: Triton may still know it.
    used = [
        state.get("triton_version") or 0,
        state.get("last_version") or 0,
        *(v for m in models for v in _numeric_dirs(repository / m)),
    ]
    version = max(used) + 1
    try:
        render_repository(
            bundle, manifest, tmp / "staged", target, version, variant=variant,
            force=model_version.tags.get(GATE_FORCED_TAG) == "true",
        )  # fmt: skip
    except RenderError as exc:
        raise RegistryError(f"'{name}' version {model_version.version}: {exc}") from None
    return manifest, tmp / "staged", version


def _load_ready(triton: TritonControl, name: str, version: int, what: str) -> None:
    error = triton.load(name)
    if error:  # a call that timed out or lost its connection did not stop Triton: see where it got to
        triton.wait_settled([name])
        error = None if triton.ready(name, version) else error
    if error or not triton.ready(name, version):
        raise RegistryError(f"Triton could not load {what}: {error or 'not ready after loading'}")


def _swap(
    triton: TritonControl,
    repository: Path,
    staged: Path,
    ensembles: list[str],
    composing: list[str],
    version: int,
    live: int,
    log: Callable[[str], None],
) -> None:
    for model in [*ensembles, *composing]:
        live_config = repository / model / "config.pbtxt"
        new_config = staged / model / "config.pbtxt"
        if live_config.exists() and _tensors(read_config(live_config)) != _tensors(read_config(new_config)):
            raise RegistryError(
                f"{model} of the new version has other tensors than the live one; configs are shared by all "
                "versions, so it cannot be swapped in live: serve it from a fresh repository"
            )
    for model in composing:
        _install(repository, staged, model, version)
    # The ensembles' configs still pin the live version: their loads reload the changed composing models
    # and cannot fail because of them.
    log(f"loading the composing models of Triton version {version}")
    errors = [error for error in map(triton.load, ensembles) if error]
    if errors:  # e.g. a load call that timed out: Triton goes on loading, wait for it
        triton.wait_settled([*ensembles, *composing])
    for model in composing:
        if not triton.ready(model, version):
            reason = triton.versions(model).get(version, ("", ""))[1] or next(iter(errors), "not ready")
            raise RegistryError(
                f"Triton could not load {model} version {version}: {one_line(reason)} "
                f"(version {live} keeps serving)"
            )
    _checkpoint(f"stopped before switching to Triton version {version}; version {live} keeps serving")
    log(f"switching the ensembles to Triton version {version}")
    for ensemble in ensembles:
        _install(repository, staged, ensemble, version)
    for ensemble in ensembles:
        what = f"{ensemble} version {version} (version {live} is being restored)"
        _load_ready(triton, ensemble, version, what)


def _prune(
    triton: TritonControl, repository: Path, name: str, state: dict, log: Callable[[str], None]
) -> None:
    """Remove the version dirs `state` does not record (all but the live one for ensembles, all but the
    live and the previous one for composing models) once Triton has settled; Triton drops any of them
    it had loaded."""
    current = state.get("triton_version")
    if current is None or "pending" in state:
        return
    ensembles = list(_served_contracts(state, name))
    composing = state.get("composing") or [s.model_name for e in ensembles for s in ensemble_steps(e)]
    keep = {current, state.get("previous_triton_version") or current}
    stale = {m: [v for v in _numeric_dirs(repository / m) if v not in keep] for m in composing}
    stale.update({e: [v for v in _numeric_dirs(repository / e) if v != current] for e in ensembles})
    if not any(stale.values()):
        return
    if not triton.wait_settled([*ensembles, *composing]):
        log("Triton is still loading or unloading; old versions are pruned by the next sync")
        return
    loaded = any(triton.versions(m).get(v, ("",))[0] == "READY" for m, vs in stale.items() for v in vs)
    for model, old in stale.items():
        for number in old:
            shutil.rmtree(repository / model / str(number))
    if loaded:  # versions no sync finished (e.g. left by a killed one): Triton drops them on a reload
        for ensemble in ensembles:
            triton.load(ensemble)
        triton.wait_settled([*ensembles, *composing])
