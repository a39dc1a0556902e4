"""The MLflow registry of bundles (the live Triton side is `fashionserve.sync`).

- register: a bundle is validated (manifest, every listed file present, sha256 as recorded, ONNX
  checker, renders against the Triton configs), then logged as one run (all files, the source Triton
  configs, metrics, tags) and registered as the next version of the registered model named after its
  pipeline. Nothing is logged or registered before validation passed.
- promote / rollback: the alias `production` names the promoted version; every move is appended to a
  registered-model tag, so a rollback returns exactly to the previous holder.
- download: a registered version comes back as a bundle folder, validated again.
"""

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
from mlflow.entities import Metric, Param
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from tritonclient.utils import InferenceServerException

from fashionserve.cli import RANDOM_INIT
from fashionserve.repository import (
    TRACKED_REPOSITORY,
    RenderError,
    pipeline_ensembles,
    read_config,
    render_repository,
)

ALIAS = "production"
MANIFEST = "manifest.json"  # as fashionserve.tryon.bundle, which is not imported here: it pulls in torch
BUNDLE_ARTIFACTS = "bundle"  # run artifact folders of a registered version
CONFIG_ARTIFACTS = "model_repository"
GATE_TAG = "quality_gate"
GATE_FORCED_TAG = "quality_gate_forced"
_HISTORY_LIMIT = 100


class RegistryError(Exception):
    """An expected failure (bad bundle, unknown version, refused promotion, failed swap): one line."""


def one_line(text: str, default: str = "unknown error") -> str:
    line = next((line.strip() for line in text.splitlines() if line.strip()), default)
    return line if len(line) <= 400 else line[:397] + "..."


def first_line(exc: BaseException) -> str:
    if isinstance(exc, InferenceServerException):
        return one_line(str(exc.message()), type(exc).__name__)
    return one_line(str(exc.message if isinstance(exc, MlflowException) else exc), type(exc).__name__)


@contextlib.contextmanager
def mlflow_errors(what: str) -> Iterator[None]:
    try:
        yield
    except MlflowException as exc:
        raise RegistryError(f"{what}: {first_line(exc)}") from None


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


def file_sha256(path: Path) -> str:
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
        if sha256 is not None and file_sha256(file) != sha256:
            raise RegistryError(f"{label}: {relative} differs from its sha256 in the manifest (corrupted?)")
        if file.suffix == ".onnx":
            try:
                onnx.checker.check_model(str(file))
            except Exception as exc:  # the checker raises protobuf, ValidationError and OS errors alike
                raise RegistryError(
                    f"{label}: {relative} is not a valid ONNX model: {first_line(exc)}"
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
        with mlflow_errors(f"registering {bundle_dir}"):
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
    with mlflow_errors(f"reading registered model '{name}'"):
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
    with mlflow_errors(f"'{name}' version {version}"):
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
    with mlflow_errors(f"moving alias '{alias}' of '{name}'"):
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
    with mlflow_errors(f"moving alias '{alias}' of '{name}' back to version {target}"):
        client.get_model_version(name, target)  # deleted since? then refuse rather than point at nothing
        _move_alias(client, name, alias, target, history[:-1])
    return f"'{name}' alias '{alias}' rolled back to version {target} (was version {current})"


def download_bundle(client: MlflowClient, model_version: ModelVersion, dest: Path) -> tuple[Path, Path, dict]:
    """Download a registered version into `dest` and validate it again (a corrupted artifact stops
    here); returns (bundle dir, Triton configs dir, manifest)."""
    if not model_version.run_id:
        raise RegistryError(
            f"version {model_version.version} has no run: it was not registered by register.py"
        )
    with mlflow_errors(f"downloading version {model_version.version}"):
        bundle = client.download_artifacts(model_version.run_id, BUNDLE_ARTIFACTS, str(dest))
        configs = client.download_artifacts(model_version.run_id, CONFIG_ARTIFACTS, str(dest))
    label = f"'{model_version.name}' version {model_version.version} in MLflow"
    return Path(bundle), Path(configs), validate_bundle(Path(bundle), label)


def bundle_digest(bundle_dir: Path) -> str:
    """sha256 of the bundle's manifest (which holds every file's sha256): the bundle's identity, as in
    the version tag `bundle_sha256`."""
    return file_sha256(bundle_dir / MANIFEST)
