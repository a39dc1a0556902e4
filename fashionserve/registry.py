"""The MLflow registry of bundles and its sync into a live Triton repository.

- register: a bundle is validated (manifest, every listed file present, sha256 as recorded, ONNX
  checker, renders against the Triton configs), then logged as one run (all files, the source Triton
  configs, metrics, tags) and registered as the next version of the registered model named after its
  pipeline. Nothing is logged or registered before validation passed.
- promote / rollback: the alias `production` names the promoted version; every move is appended to a
  registered-model tag, so a rollback returns exactly to the previous holder.
- sync: the aliased version is downloaded, validated again, rendered as a new numeric Triton version
  and swapped in while the old one keeps serving (see `sync_once`), then tagged live in MLflow.

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
import hashlib
import importlib.util
import json
import logging
import os
import py_compile
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import tritonclient.http as httpclient
from mlflow.entities import Metric, Param
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from fashionserve.plans import record_plan
from fashionserve.repository import (
    TRACKED_REPOSITORY,
    RenderError,
    pipeline_ensembles,
    read_config,
    render_repository,
    write_config,
)

ALIAS = "production"
DEFAULT_TRACKING_URI = "http://127.0.0.1:5000"
MANIFEST = "manifest.json"  # as fashionserve.tryon.bundle, which is not imported here: it pulls in torch
RANDOM_INIT = "random-init"
BUNDLE_ARTIFACTS = "bundle"  # run artifact folders of a registered version
CONFIG_ARTIFACTS = "model_repository"
GATE_TAG = "quality_gate"
GATE_FORCED_TAG = "quality_gate_forced"
LIVE_TAG = "triton.live"
TRITON_VERSION_TAG = "triton.version"
LIVE_VERSION_TAG = "triton.live_version"  # on the registered model
STATE_FILE = ".fashionserve-sync.json"  # in the served repository; Triton only looks at folders
LOCK_FILE = ".fashionserve-sync.lock"
PLAN_STORE_INDEX = "plans.json"
COMPOSING_VERSIONS = 2  # the live version and the one before it, see the module docstring
CHECK_DYNAMIC_SIZE = 32  # size of a dynamic input dimension (e.g. any image height) in the post-load check
_HISTORY_LIMIT = 100
_SETTLE_TIMEOUT_S = 60.0
_POLL_S = 0.2


class RegistryError(Exception):
    """An expected failure (bad bundle, unknown version, refused promotion, failed swap): one line."""


def _one_line(text: str, default: str = "unknown error") -> str:
    line = next((line.strip() for line in text.splitlines() if line.strip()), default)
    return line if len(line) <= 400 else line[:397] + "..."


def _first_line(exc: BaseException) -> str:
    if isinstance(exc, InferenceServerException):
        return _one_line(str(exc.message()), type(exc).__name__)
    return _one_line(str(exc.message if isinstance(exc, MlflowException) else exc), type(exc).__name__)


@contextlib.contextmanager
def _mlflow_errors(what: str) -> Iterator[None]:
    try:
        yield
    except MlflowException as exc:
        raise RegistryError(f"{what}: {_first_line(exc)}") from None


def tracking_uri_default() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def connect(tracking_uri: str) -> MlflowClient:
    """A client for the registry at `tracking_uri`; an HTTP server is checked first, so a server that
    is down is one clear line instead of minutes of client retries."""
    if tracking_uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=10.0) as response:
                healthy = response.status == 200
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RegistryError(f"cannot reach MLflow at {tracking_uri}: {reason}") from None
        if not healthy:
            raise RegistryError(f"MLflow at {tracking_uri} is not healthy")
    # The CLIs report progress themselves; MLflow's INFO lines ("Waiting up to 300 seconds...") are noise.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


# ---------------------------------------------------------------------------------------------------
# Bundle validation


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _listed_files(manifest: dict) -> Iterator[tuple[str, str | None]]:
    """(bundle-relative path, recorded sha256 or None) of every file the manifest names."""
    for model in manifest["models"].values():
        yield model["file"], model.get("sha256")
    for variant in manifest.get("variants", {}).values():
        for network in variant.get("networks", {}).values():
            yield network["file"], network.get("sha256")
    for plans in manifest.get("plans", {}).values():
        for plan in plans:
            yield plan["file"], plan.get("sha256")


def validate_bundle(bundle_dir: Path, label: str | None = None) -> dict:
    """The bundle's manifest, once every file it lists exists inside the bundle, matches its recorded
    sha256 and (ONNX) passes the ONNX checker; RegistryError naming the first problem otherwise.
    `label` names the bundle in messages (default: its folder)."""
    label = label or f"bundle {bundle_dir}"
    path = bundle_dir / MANIFEST
    if not bundle_dir.is_dir():
        raise RegistryError(f"{label} does not exist")
    if not path.is_file():
        raise RegistryError(f"{label} is not a bundle: it has no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{label}: {MANIFEST} is not valid JSON: {exc}") from None
    missing = [key for key in ("pipeline", "models", "max_batch_size") if key not in manifest]
    if missing:
        raise RegistryError(f"{label}: {MANIFEST} lacks {', '.join(missing)}")
    partial = sorted(p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*.partial"))
    if partial:
        raise RegistryError(f"{label} is still being written ({partial[0]} exists)")
    root = bundle_dir.resolve()
    for relative, sha256 in _listed_files(manifest):
        file = (root / relative).resolve()
        if not file.is_relative_to(root):
            raise RegistryError(f"{label}: the manifest names {relative}, which lies outside the bundle")
        if not file.is_file():
            raise RegistryError(f"{label}: {relative} (listed in the manifest) is missing")
        if sha256 is not None and _sha256(file) != sha256:
            raise RegistryError(f"{label}: {relative} differs from its sha256 in the manifest (corrupted?)")
        if file.suffix == ".onnx":
            try:
                onnx.checker.check_model(str(file))
            except Exception as exc:  # the checker raises protobuf, ValidationError and OS errors alike
                raise RegistryError(
                    f"{label}: {relative} is not a valid ONNX model: {_first_line(exc)}"
                ) from None
    return manifest


def quality_gate(manifest: dict) -> tuple[str, str]:
    """('passed' | 'failed', reason): a bundle fails when any quantized variant it records failed its
    gate; fp32 alone has no gate and passes."""
    failed = [
        f"{name}: {record.get('reason') or 'failed'}"
        for name, record in manifest.get("variants", {}).items()
        if not record.get("passed")
    ]
    return ("failed", "; ".join(failed)) if failed else ("passed", "")


def _source_configs(ensembles: list[str], source: Path, dest: Path) -> None:
    """Copy the ensembles' and their composing models' config.pbtxt from `source` into `dest`."""
    for ensemble in ensembles:
        config = read_config(source / ensemble / "config.pbtxt")
        for name in [ensemble, *(step.model_name for step in config.ensemble_scheduling.step)]:
            if not (dest / name).exists():  # composing models may serve several ensembles
                (dest / name).mkdir(parents=True)
                shutil.copyfile(source / name / "config.pbtxt", dest / name / "config.pbtxt")


# ---------------------------------------------------------------------------------------------------
# Register


def _numeric_leaves(prefix: str, value: object) -> Iterator[tuple[str, float]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _numeric_leaves(f"{prefix}/{key}", item)
    elif isinstance(value, bool | int | float) and np.isfinite(float(value)):
        yield prefix, float(value)


def bundle_metrics(manifest: dict) -> dict[str, float]:
    """Parity errors per model output, each variant's gate and quality, latency and the training
    report (e.g. the classifier's macro F1) where the manifest has them."""
    metrics = {}
    for model, record in manifest["models"].items():
        metrics.update(_numeric_leaves(f"parity_max_error/{model}", record.get("parity_max_error", {})))
    for variant, record in manifest.get("variants", {}).items():
        metrics[f"{variant}/gate_passed"] = float(bool(record.get("passed")))
        metrics.update(_numeric_leaves(variant, record.get("quality", {})))
    metrics.update(_numeric_leaves("latency", manifest.get("latency", {})))
    metrics.update(_numeric_leaves("training", manifest.get("training_report", {})))
    return metrics


def bundle_tags(manifest: dict, digest: str) -> dict[str, str]:
    """The manifest's key facts as version tags; `random-init` is its own tag, visible at a glance."""
    config = manifest.get("config", {})
    gate, reason = quality_gate(manifest)
    variants = manifest.get("variants", {})
    tags = {
        "pipeline": manifest["pipeline"],
        "architecture": str(manifest.get("architecture", "unknown")),
        "weights": str(manifest.get("weights", "unknown")),
        "opset": str(manifest.get("opset", "unknown")),
        "max_batch_size": str(manifest["max_batch_size"]),
        "bundle_sha256": digest,
        GATE_TAG: gate,
        "variants": ", ".join(f"{v}={'passed' if r.get('passed') else 'failed'}" for v, r in variants.items())
        or "none (fp32 only)",
    }
    if "height" in config and "width" in config:
        tags["resolution"] = f"{config['height']}x{config['width']}"
    elif "resolution" in config:  # square outputs (the fashion generator)
        tags["resolution"] = f"{config['resolution']}x{config['resolution']}"
    if reason:
        tags["quality_gate_reason"] = reason
    if manifest.get("random_init") or manifest.get("weights") == RANDOM_INIT:
        tags[RANDOM_INIT] = "true (untrained weights: outputs are noise)"
    for key in ("seed", "checkpoint_sha256", "condition_checkpoint_sha256", "image_checkpoint_sha256"):
        if key in manifest:
            tags[key] = str(manifest[key])
    return tags


def _bundle_params(manifest: dict) -> dict[str, str]:
    params = {f"config.{key}": str(value) for key, value in manifest.get("config", {}).items()}
    for key in ("architecture", "weights", "opset", "max_batch_size", "torch_version", "onnxruntime_version"):
        if key in manifest:
            params[key] = str(manifest[key])
    return params


def _experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


def register_bundle(
    client: MlflowClient, bundle_dir: Path, model: str | None = None, log: Callable[[str], None] = print
) -> ModelVersion:
    """Validate `bundle_dir`, log it as a run and register it as the next version of `model` (default:
    the bundle's pipeline). A bad bundle raises RegistryError before anything reaches MLflow."""
    manifest = validate_bundle(bundle_dir)
    pipeline = manifest["pipeline"]
    name = model or pipeline
    if name != pipeline:
        raise RegistryError(
            f"bundle {bundle_dir} is the '{pipeline}' pipeline; register it as --model {pipeline}"
        )
    with tempfile.TemporaryDirectory(prefix="fashionserve-register-") as tmp:
        configs = Path(tmp) / CONFIG_ARTIFACTS
        _source_configs(pipeline_ensembles(manifest), TRACKED_REPOSITORY, configs)
        try:  # the check sync will need: the bundle renders against the configs it is logged with
            render_repository(bundle_dir, manifest, Path(tmp) / "rendered", target="cpu", source=configs)
        except RenderError as exc:
            raise RegistryError(f"bundle {bundle_dir} does not fit the Triton configs: {exc}") from None
        tags = bundle_tags(manifest, bundle_digest(bundle_dir))
        log(f"bundle {bundle_dir} is valid ({len(manifest['models'])} models, quality gate {tags[GATE_TAG]})")
        with _mlflow_errors(f"registering {bundle_dir}"):
            run = client.create_run(
                _experiment_id(client, name),
                run_name=bundle_dir.name,
                tags={**tags, "bundle_path": str(bundle_dir.resolve())},
            )
            run_id = run.info.run_id
            try:
                now = int(time.time() * 1000)
                client.log_batch(
                    run_id,
                    metrics=[Metric(k, v, now, 0) for k, v in bundle_metrics(manifest).items()],
                    params=[Param(k, v) for k, v in _bundle_params(manifest).items()],
                )
                log(f"uploading {bundle_dir} to run {run_id}")
                client.log_artifacts(run_id, str(bundle_dir), BUNDLE_ARTIFACTS)
                client.log_artifacts(run_id, str(configs), CONFIG_ARTIFACTS)
                client.set_terminated(run_id)
                try:
                    client.create_registered_model(
                        name, description=f"Bundles of the '{name}' pipeline; alias '{ALIAS}' is served"
                    )
                except MlflowException as exc:
                    if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # it does from the first version on
                        raise
                weights = f" [{RANDOM_INIT}: outputs are noise]" if RANDOM_INIT in tags else ""
                return client.create_model_version(
                    name,
                    source=run.info.artifact_uri,
                    run_id=run_id,
                    tags=tags,
                    description=f"{tags['architecture']} {tags.get('resolution', '')} bundle{weights}",
                )
            except BaseException:
                # Nothing half-registered: the run of a failed registration goes to the trash.
                with contextlib.suppress(MlflowException):
                    client.delete_run(run_id)
                raise


# ---------------------------------------------------------------------------------------------------
# Promote and roll back


def _history_tag(alias: str) -> str:
    return f"{alias}.history"


def _history(client: MlflowClient, name: str, alias: str) -> tuple[list[str], str | None]:
    """(versions the alias was moved to, oldest first; its current holder or None)."""
    with _mlflow_errors(f"reading registered model '{name}'"):
        model = client.get_registered_model(name)
    history = json.loads(model.tags.get(_history_tag(alias), "[]"))
    return history, model.aliases.get(alias)


def _move_alias(client: MlflowClient, name: str, alias: str, version: str, history: list[str]) -> None:
    # The alias first: if the history write fails, the history no longer ends with the holder and a
    # rollback refuses instead of guessing.
    client.set_registered_model_alias(name, alias, version)
    client.set_registered_model_tag(name, _history_tag(alias), json.dumps(history[-_HISTORY_LIMIT:]))


def promote(client: MlflowClient, name: str, version: str, alias: str = ALIAS, force: bool = False) -> str:
    """Move `alias` to `version`; refuses a version whose quality gate failed unless `force`."""
    history, current = _history(client, name, alias)
    with _mlflow_errors(f"'{name}' version {version}"):
        model_version = client.get_model_version(name, version)
    if model_version.tags.get(GATE_TAG) == "failed" and not force:
        reason = model_version.tags.get("quality_gate_reason", "see its tags")
        raise RegistryError(
            f"'{name}' version {version} failed its quality gate ({reason}); --force promotes it anyway"
        )
    if current == version:
        return f"'{name}' version {version} already holds alias '{alias}'"
    if current is not None and (not history or history[-1] != current):
        history.append(current)  # the alias was set outside promote.py: remember the holder anyway
    with _mlflow_errors(f"moving alias '{alias}' of '{name}'"):
        if force and model_version.tags.get(GATE_TAG) == "failed":
            client.set_model_version_tag(name, version, GATE_FORCED_TAG, "true")
        _move_alias(client, name, alias, version, [*history, version])
    previous = f" (was version {current})" if current else ""
    return f"'{name}' alias '{alias}' -> version {version}{previous}"


def rollback(client: MlflowClient, name: str, alias: str = ALIAS) -> str:
    """Move `alias` back to its previous holder, as recorded by promote."""
    history, current = _history(client, name, alias)
    if current is None:
        raise RegistryError(f"'{name}' has no alias '{alias}' to roll back")
    if not history or history[-1] != current:
        raise RegistryError(
            f"alias '{alias}' of '{name}' was moved outside promote.py (its history ends at "
            f"{history[-1] if history else 'nothing'}, the alias is on version {current}); "
            "promote a version explicitly"
        )
    if len(history) < 2:
        raise RegistryError(
            f"version {current} is the first holder of '{name}' alias '{alias}': nothing to roll back to"
        )
    target = history[-2]
    with _mlflow_errors(f"moving alias '{alias}' of '{name}' back to version {target}"):
        client.get_model_version(name, target)  # deleted since? then refuse rather than point at nothing
        _move_alias(client, name, alias, target, history[:-1])
    return f"'{name}' alias '{alias}' rolled back to version {target} (was version {current})"


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
            raise RegistryError(f"cannot reach Triton at {url} over HTTP: {_first_line(exc)}") from None
        if not live:
            raise RegistryError(f"Triton at {url} is not live")

    def versions(self, model: str) -> dict[int, tuple[str, str]]:
        """Version -> (state, reason) of `model` as Triton's repository index reports it."""
        try:
            index = self.client.get_model_repository_index()
        except InferenceServerException as exc:
            raise RegistryError(f"Triton at {self.url}: {_first_line(exc)}") from None
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
            return _first_line(exc)
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
            raise RegistryError(
                f"inference on {model} version {version} failed: {_first_line(exc)}"
            ) from None
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
    with _mlflow_errors(f"tagging the live version of '{name}'"):
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


def download_bundle(client: MlflowClient, model_version: ModelVersion, dest: Path) -> tuple[Path, Path, dict]:
    """Download a registered version into `dest` and validate it again (a corrupted artifact stops
    here); returns (bundle dir, Triton configs dir, manifest)."""
    if not model_version.run_id:
        raise RegistryError(
            f"version {model_version.version} has no run: it was not registered by register.py"
        )
    with _mlflow_errors(f"downloading version {model_version.version}"):
        bundle = client.download_artifacts(model_version.run_id, BUNDLE_ARTIFACTS, str(dest))
        configs = client.download_artifacts(model_version.run_id, CONFIG_ARTIFACTS, str(dest))
    label = f"'{model_version.name}' version {model_version.version} in MLflow"
    return Path(bundle), Path(configs), validate_bundle(Path(bundle), label)


def bundle_digest(bundle_dir: Path) -> str:
    """sha256 of the bundle's manifest (which holds every file's sha256): the bundle's identity, as in
    the version tag `bundle_sha256`."""
    return _sha256(bundle_dir / MANIFEST)


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
            stored = record_plan(stored, network, {**entry, "sha256": _sha256(target)})
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
            if _sha256(target) != entry["sha256"]:
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
    with _mlflow_errors(f"reading alias '{alias}' of '{name}'"):
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
                f"Triton could not load {model} version {version}: {_one_line(reason)} "
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
