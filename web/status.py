"""What the status line says: whether Triton is ready, and for every ensemble the pages use, which
registered model version serves it now.

The registered version comes from what `mlflow/sync.py` records: the state file it writes into the
served repository (`--repository`, when this process can read that folder: the quick start, compose),
else the registered model's `triton.live_version` tag in MLflow (`--mlflow-uri`: k8s, where the
folder is inside the Triton pod). The version the alias `production` points at is read from MLflow
too, so a promotion that is not live yet shows as such."""

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from fashionserve.cli import RANDOM_INIT
from fashionserve.registry import ALIAS, connect
from fashionserve.sync import LIVE_VERSION_TAG, STATE_FILE

# registered model -> the ensembles it serves, as the pages use them
PIPELINES = {"tryon": ("tryon",), "hair": ("hair_transfer", "hair_edit")}
MLFLOW_CACHE_S = 10.0  # every open page polls; the registry need not be asked more often than this

logger = logging.getLogger("web")


@dataclass(frozen=True)
class EnsembleStatus:
    name: str
    registered_model: str
    ready: bool
    triton_version: int | None  # the newest READY version Triton has (what a request gets)
    registered_version: str | None  # the MLflow version serving, as sync recorded it
    production_version: str | None  # what the alias points at now (None: MLflow not configured)
    random_init: bool | None  # the serving version has untrained weights (None: unknown without MLflow)


@dataclass(frozen=True)
class ServerStatus:
    triton_url: str
    reachable: bool
    ready: bool
    ensembles: list[EnsembleStatus]

    def as_json(self) -> dict:
        return asdict(self)


class StatusReader:
    def __init__(
        self,
        connection: grpcclient.InferenceServerClient,
        triton_url: str,
        repository: Path | None,
        mlflow_uri: str | None,
    ):
        self.connection = connection
        self.triton_url = triton_url
        self.repository = repository
        self.mlflow_uri = mlflow_uri
        self._mlflow_cache: tuple[float, dict[str, tuple[str | None, str | None]]] = (-MLFLOW_CACHE_S, {})
        self._random_init: dict[tuple[str, str], bool] = {}  # a version's weights never change

    def read(self) -> ServerStatus:
        """Blocking (gRPC, file, MLflow): run it in a worker thread."""
        try:
            ready = bool(self.connection.is_server_ready())
            index = self.connection.get_model_repository_index(as_json=True).get("models", [])
        except InferenceServerException:
            return ServerStatus(self.triton_url, False, False, [])
        synced = self._synced_versions()
        registry = self._registry_versions()
        ensembles = []
        for model, names in PIPELINES.items():
            live_tag, production = registry.get(model, (None, None))
            registered = synced.get(model) or live_tag
            random_init = None if registered is None else self._random_init.get((model, registered))
            for name in names:
                versions = [
                    int(entry["version"])
                    for entry in index
                    if entry.get("name") == name and entry.get("state") == "READY"
                ]
                ensembles.append(
                    EnsembleStatus(
                        name=name,
                        registered_model=model,
                        ready=bool(versions),
                        triton_version=max(versions) if versions else None,
                        registered_version=registered,
                        production_version=production,
                        random_init=random_init,
                    )
                )
        return ServerStatus(self.triton_url, True, ready, ensembles)

    def _synced_versions(self) -> dict[str, str]:
        """Registered model -> the MLflow version the last sync into `repository` made live."""
        if self.repository is None:
            return {}
        path = self.repository / STATE_FILE
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            logger.warning("cannot read %s: %s", path, exc)
            return {}
        return {
            name: str(entry["mlflow_version"]) for name, entry in state.items() if "mlflow_version" in entry
        }

    def _registry_versions(self) -> dict[str, tuple[str | None, str | None]]:
        """Registered model -> (live version tag, version holding the alias), cached for a few seconds."""
        if self.mlflow_uri is None:
            return {}
        checked, cached = self._mlflow_cache
        if time.monotonic() - checked < MLFLOW_CACHE_S:
            return cached
        found: dict[str, tuple[str | None, str | None]] = {}
        try:
            client = connect(self.mlflow_uri)
            for model in PIPELINES:
                registered = client.search_registered_models(f"name='{model}'")
                if not registered:
                    continue
                live = registered[0].tags.get(LIVE_VERSION_TAG)
                production = registered[0].aliases.get(ALIAS)
                found[model] = (live, None if production is None else str(production))
                for version in {live, self._synced_versions().get(model)} - {None}:
                    if (model, version) not in self._random_init:
                        tags = client.get_model_version(model, version).tags
                        self._random_init[(model, version)] = RANDOM_INIT in tags
        except Exception as exc:  # RegistryError, MlflowException, network errors: the status must not fail
            logger.warning("cannot read the registry at %s: %s", self.mlflow_uri, str(exc).splitlines()[0])
        self._mlflow_cache = (time.monotonic(), found)
        return found
