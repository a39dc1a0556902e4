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
- The python backend compiles `model.py` on import; a `__pycache__` written into a version dir would
  make Triton see the model as modified and reload it on every later load. Version dirs are written
  with their bytecode already compiled.
"""

import contextlib
import fcntl
import importlib.util
import json
import py_compile
import shutil
import tempfile
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
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from fashionserve.plans import record_plan
from fashionserve.registry import (
    ALIAS,
    GATE_FORCED_TAG,
    RegistryError,
    bundle_digest,
    download_bundle,
    file_sha256,
    first_line,
    mlflow_errors,
    one_line,
)
from fashionserve.repository import (
    RenderError,
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
PLAN_STORE_INDEX = "plans.json"
COMPOSING_VERSIONS = 2  # the live version and the one before it, see the module docstring
CHECK_DYNAMIC_SIZE = 32  # size of a dynamic input dimension (e.g. any image height) in the post-load check
_SETTLE_TIMEOUT_S = 60.0
_POLL_S = 0.2


# ---------------------------------------------------------------------------------------------------
# Sync


@dataclass(frozen=True)
class SyncResult:
    mlflow_version: str
    triton_version: int
    changed: bool
    seconds: float


class _Triton:
    """The repository API and readiness checks of one Triton server, with one-line errors."""

    def __init__(self, url: str, load_timeout: float):
        self.url = url
        try:
            self.client = httpclient.InferenceServerClient(
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
            index = self.client.get_model_repository_index()
        except InferenceServerException as exc:
            raise RegistryError(f"Triton at {self.url}: {first_line(exc)}") from None
        return {
            int(entry["version"]): (entry.get("state", ""), entry.get("reason", ""))
            for entry in index
            if entry["name"] == model and entry.get("version", "").isdigit()
        }

    def ready(self, model: str, version: int) -> bool:
        try:
            return self.client.is_model_ready(model, str(version))
        except InferenceServerException:
            return False

    def load(self, model: str) -> str | None:
        """Ask Triton to (re)load `model`; its error message, or None."""
        try:
            self.client.load_model(model)
        except InferenceServerException as exc:
            return first_line(exc)
        return None

    def unload(self, model: str) -> None:
        """Unload `model` and the models it uses (best effort: called while undoing a failed sync)."""
        with contextlib.suppress(InferenceServerException):
            self.client.unload_model(model, unload_dependents=True)

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
        except InferenceServerException as exc:
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


def _prepare(staged: Path, pipeline: str, version: int) -> list[str]:
    """Pin the staged ensemble to `version`, keep two versions of each composing model loaded and
    compile each python-backend model.py in place; returns the composing model names."""
    ensemble = read_config(staged / pipeline / "config.pbtxt")
    composing = list(dict.fromkeys(step.model_name for step in ensemble.ensemble_scheduling.step))
    for step in ensemble.ensemble_scheduling.step:
        step.model_version = version
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


class _Changes:
    """Files put into the served repository by one sync, undone in reverse order if the sync fails."""

    def __init__(self, repository: Path, staged: Path, version: int):
        self.repository, self.staged, self.version = repository, staged, version
        self._undo: list[Callable[[], None]] = []

    def install(self, model: str) -> None:
        """Version dir (copied aside, then renamed: Triton never sees half of it), then the config."""
        source, dest = self.staged / model, self.repository / model
        if not dest.exists():
            dest.mkdir()
            self._undo.append(lambda: shutil.rmtree(dest, ignore_errors=True))
        aside = dest / f".{self.version}.partial"  # not numeric: Triton ignores it
        shutil.copytree(source / str(self.version), aside)
        aside.rename(dest / str(self.version))
        self._undo.append(lambda: shutil.rmtree(dest / str(self.version), ignore_errors=True))
        config = dest / "config.pbtxt"
        if config.exists():
            old = config.read_bytes()
            self._undo.append(lambda: _write_atomic(config, old))
        _write_atomic(config, (source / "config.pbtxt").read_bytes())

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


def _write_atomic(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    partial.replace(path)


def _read_state(repository: Path) -> dict:
    path = repository / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


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
    for network, entries in json.loads(index.read_text()).items():
        for entry in entries:
            target = bundle_dir / entry["file"]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / entry["file"], target)
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
) -> SyncResult:
    """Make Triton serve the version `alias` points at, as a new Triton version in `repository` (the
    folder Triton serves, explicit model control): every ensemble the bundle serves (e.g. `hair`:
    hair_transfer and hair_edit) and their composing models. Idempotent: nothing changes when it
    already does. On the gpu target, `plans` is the plan store the plan builder wrote the version's
    plans into."""
    started = time.monotonic()
    repository = repository.resolve()
    repository.mkdir(parents=True, exist_ok=True)
    triton = _Triton(triton_url, load_timeout)
    with mlflow_errors(f"reading alias '{alias}' of '{name}'"):
        model_version = client.get_model_version_by_alias(name, alias)
    wanted = {"mlflow_version": model_version.version, "target": target, "variant": variant}
    with _locked(repository):
        for leftover in repository.glob("*/.*.partial"):  # from a sync that was killed mid-copy
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        state = _read_state(repository).get(name, {})
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
        with tempfile.TemporaryDirectory(prefix="fashionserve-sync-") as tmp:
            log(f"{name} alias '{alias}' -> version {model_version.version}: downloading")
            manifest, staged, version = _stage(
                model_version, client, Path(tmp), repository, state, target, variant, plans
            )
            contracts = _manifest_contracts(manifest)
            ensembles = list(contracts)
            composing = list(dict.fromkeys(m for e in ensembles for m in _prepare(staged, e, version)))
            changes = _Changes(repository, staged, version)
            try:
                if live is None:
                    log(f"writing Triton version {version} ({target}, {variant}) and loading it")
                    for model in [*composing, *ensembles]:
                        changes.install(model)
                    for ensemble in ensembles:
                        _load_ready(triton, ensemble, version, f"{ensemble} version {version}")
                else:
                    log(f"writing Triton version {version} ({target}, {variant}) beside live version {live}")
                    _swap(triton, changes, ensembles, composing, version, live)
                for ensemble, contract in contracts.items():
                    triton.check_inference(ensemble, version, contract)
            except BaseException:
                changes.undo()
                for ensemble in ensembles:
                    if live is None:  # nothing served before: nothing stays loaded
                        triton.unload(ensemble)
                    else:  # Triton drops what the repository no longer has and keeps the live version
                        triton.load(ensemble)
                raise
        state = {
            **wanted,
            "triton_version": version,
            **contracts[ensembles[0]],
            "ensembles": contracts,
            "synced_at": datetime.now(UTC).isoformat(),
        }
        _write_atomic(repository / STATE_FILE, json.dumps({**_read_state(repository), name: state}).encode())
        _mark_live(client, name, model_version.version, version)
        _prune(triton, repository, ensembles, composing, version, live, log)
    seconds = time.monotonic() - started
    log(f"live: {name} version {model_version.version} as Triton version {version} ({seconds:.1f} s)")
    return SyncResult(model_version.version, version, True, seconds)


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
    target), render it as the next Triton version into tmp/staged; returns (manifest, staged
    repository, Triton version)."""
    name = model_version.name
    # A corrupted artifact stops here, before anything reaches the served repository.
    bundle, configs, manifest = download_bundle(client, model_version, tmp / "download")
    if plans is not None and target == "gpu":
        manifest = attach_plans(bundle, manifest, plan_store_dir(plans, name, bundle_digest(bundle)))
    ensembles = pipeline_ensembles(manifest)
    models = [
        *ensembles,
        *(
            step.model_name
            for ensemble in ensembles
            for step in read_config(configs / ensemble / "config.pbtxt").ensemble_scheduling.step
        ),
    ]
    used = [state.get("triton_version", 0), *(v for m in models for v in _numeric_dirs(repository / m))]
    version = max(used, default=0) + 1
    try:
        render_repository(
            bundle, manifest, tmp / "staged", target, version, source=configs, variant=variant,
            force=model_version.tags.get(GATE_FORCED_TAG) == "true",
        )  # fmt: skip
    except RenderError as exc:
        raise RegistryError(f"'{name}' version {model_version.version}: {exc}") from None
    return manifest, tmp / "staged", version


def _load_ready(triton: _Triton, name: str, version: int, what: str) -> None:
    error = triton.load(name)
    if error or not triton.ready(name, version):
        raise RegistryError(f"Triton could not load {what}: {error or 'not ready after loading'}")


def _swap(
    triton: _Triton, changes: _Changes, ensembles: list[str], composing: list[str], version: int, live: int
) -> None:
    for model in [*ensembles, *composing]:
        live_config = changes.repository / model / "config.pbtxt"
        new_config = changes.staged / model / "config.pbtxt"
        if live_config.exists() and _tensors(read_config(live_config)) != _tensors(read_config(new_config)):
            raise RegistryError(
                f"{model} of the new version has other tensors than the live one; configs are shared by all "
                "versions, so it cannot be swapped in live: serve it from a fresh repository"
            )
    for model in composing:
        changes.install(model)
    # The ensembles' configs still pin the live version: their loads reload the changed composing models
    # and cannot fail because of them.
    errors = [error for error in map(triton.load, ensembles) if error]
    for model in composing:
        if not triton.ready(model, version):
            reason = triton.versions(model).get(version, ("", ""))[1] or next(iter(errors), "not ready")
            raise RegistryError(
                f"Triton could not load {model} version {version}: {one_line(reason)} "
                f"(version {live} keeps serving)"
            )
    for ensemble in ensembles:
        changes.install(ensemble)
    for ensemble in ensembles:
        what = f"{ensemble} version {version} (version {live} is being restored)"
        _load_ready(triton, ensemble, version, what)


def _prune(
    triton: _Triton,
    repository: Path,
    ensembles: list[str],
    composing: list[str],
    version: int,
    live: int | None,
    log: Callable[[str], None],
) -> None:
    """Remove version dirs Triton no longer serves: all but `version` for the ensembles, all but
    `version` and the previous live one for composing models. Waits for Triton to finish unloading."""
    if not triton.wait_settled([*ensembles, *composing]):
        log("Triton is still loading or unloading; old versions are pruned by the next sync")
        return
    keep = {version} if live is None else {version, live}
    for model, kept in [*((e, {version}) for e in ensembles), *((m, keep) for m in composing)]:
        for old in _numeric_dirs(repository / model):
            if old not in kept:
                shutil.rmtree(repository / model / str(old))
