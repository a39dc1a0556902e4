"""What the status line says: whether Triton is ready, and for every ensemble the pages use, which
registered model version serves it now.

Everything comes from Triton's readiness and model-config APIs, which any client may call (in compose
and k8s the repository index and model control need the admin key, which only sync has): the loaded
ensemble's config holds the registered model version `mlflow/sync.py` wrote it for (its
SERVED_PARAMETERS) and pins each step to the Triton version. With --mlflow-uri (the quick start), the
version the alias `production` points at is read from MLflow too, so a promotion that is not live yet
shows as such; the stacks leave it out (MLflow answers the tools only)."""

import logging
import time
from dataclasses import asdict, dataclass

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from fashionserve.registry import ALIAS, connect
from fashionserve.sync import SERVED_PARAMETERS

# registered model -> the ensembles it serves, as the pages use them
PIPELINES = {"tryon": ("tryon",), "hair": ("hair_transfer", "hair_edit")}
MODEL_LABEL, VERSION_LABEL, RANDOM_INIT_LABEL = SERVED_PARAMETERS
MLFLOW_CACHE_S = 10.0  # every open page polls; the registry need not be asked more often than this

logger = logging.getLogger("web")


@dataclass(frozen=True)
class EnsembleStatus:
    name: str
    registered_model: str
    ready: bool
    triton_version: int | None  # the Triton version the loaded ensemble runs (what a request gets)
    registered_version: str | None  # the MLflow version it serves, as sync labelled it
    production_version: str | None  # what the alias points at now (None: MLflow not configured)
    random_init: bool | None  # the serving version has untrained weights (None: not labelled by sync)


@dataclass(frozen=True)
class ServerStatus:
    triton_url: str
    reachable: bool
    ready: bool
    ensembles: list[EnsembleStatus]

    def as_json(self) -> dict:
        return asdict(self)


class StatusReader:
    def __init__(self, connection: grpcclient.InferenceServerClient, triton_url: str, mlflow_uri: str | None):
        self.connection = connection
        self.triton_url = triton_url
        self.mlflow_uri = mlflow_uri
        self._mlflow_cache: tuple[float, dict[str, str]] = (-MLFLOW_CACHE_S, {})

    def read(self) -> ServerStatus:
        """Blocking (gRPC, MLflow): run it in a worker thread."""
        try:
            ready = bool(self.connection.is_server_ready())
        except InferenceServerException:
            return ServerStatus(self.triton_url, False, False, [])
        production = self._production_versions()
        ensembles = [
            self._ensemble(name, model, production.get(model))
            for model, names in PIPELINES.items()
            for name in names
        ]
        return ServerStatus(self.triton_url, True, ready, ensembles)

    def _ensemble(self, name: str, model: str, production: str | None) -> EnsembleStatus:
        try:
            config = self.connection.get_model_config(name, as_json=True)["config"]
            ready = bool(self.connection.is_model_ready(name))
        except InferenceServerException:  # not loaded (or unloaded in between)
            return EnsembleStatus(name, model, False, None, None, production, None)
        labels = {key: value.get("string_value") for key, value in config.get("parameters", {}).items()}
        pins = {
            int(step.get("model_version", -1))
            for step in config.get("ensemble_scheduling", {}).get("step", [])
        }
        pinned = next(iter(pins)) if len(pins) == 1 else -1  # -1: not written by sync (latest version)
        random_init = labels.get(RANDOM_INIT_LABEL)
        return EnsembleStatus(
            name=name,
            registered_model=labels.get(MODEL_LABEL) or model,
            ready=ready,
            triton_version=pinned if pinned > 0 else None,
            registered_version=labels.get(VERSION_LABEL),
            production_version=production,
            random_init=None if random_init is None else random_init == "true",
        )

    def _production_versions(self) -> dict[str, str]:
        """Registered model -> version holding the alias, cached for a few seconds."""
        if self.mlflow_uri is None:
            return {}
        checked, cached = self._mlflow_cache
        if time.monotonic() - checked < MLFLOW_CACHE_S:
            return cached
        found: dict[str, str] = {}
        try:
            client = connect(self.mlflow_uri)
            for model in PIPELINES:
                registered = client.search_registered_models(f"name='{model}'")
                if registered and ALIAS in registered[0].aliases:
                    found[model] = str(registered[0].aliases[ALIAS])
        except Exception as exc:  # RegistryError, MlflowException, network errors: the status must not fail
            logger.warning("cannot read the registry at %s: %s", self.mlflow_uri, str(exc).splitlines()[0])
        self._mlflow_cache = (time.monotonic(), found)
        return found
