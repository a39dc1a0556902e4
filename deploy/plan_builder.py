"""Build TensorRT plans of a registered version for this host's GPU, into the plan store sync serves from.

Runs in the plan-builder image (nvcr.io/nvidia/tensorrt:<YY.MM>-py3 of the Triton image's YY.MM, see
deploy/Dockerfile) on the GPU host. It downloads the version the alias points at (or --version) from
MLflow, validates it, builds a strongly typed plan of each heavy network from the chosen ONNX variant
(the builder of export/build_plans.py) and publishes the plans into DIR/<model>/<bundle sha256>/, where
`mlflow/sync.py --target gpu --plans DIR` takes them. Plans already there for this variant, GPU
architecture and TensorRT version are not built again, so running it twice costs a download.

--model may be repeated (as for mlflow/sync.py): the plans of each model's aliased version are built in
turn (a model that fails is one `error:` line and exit 2 at the end; the others still get their plans).
A model with no heavy network (e.g. garment_classifier) gets an empty index, which is what sync looks
for.

Examples (on the GPU host, inside the plan-builder image):
  python deploy/plan_builder.py --plans /plans                               # tryon's 'production'
  python deploy/plan_builder.py --plans /plans --version 3 --variant int8    # before promoting version 3
  python deploy/plan_builder.py --plans /plans --model tryon --model fashion_generator
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from fashionserve.cli import add_tracking_uri, command_parser, run  # noqa: E402
from fashionserve.plans import (  # noqa: E402
    Gpu,
    PlanError,
    build_bundle_plans,
    local_gpu,
    plan_networks,
    require_tensorrt,
)
from fashionserve.registry import (  # noqa: E402
    ALIAS,
    GATE_FORCED_TAG,
    RegistryError,
    bundle_digest,
    connect,
    download_bundle,
    first_line,
)
from fashionserve.repository import PRECISIONS, RenderError  # noqa: E402
from fashionserve.sync import PLAN_STORE_INDEX, plan_store_dir, publish_plans  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = command_parser(__doc__)
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="MODEL",
        help="registered model (default: tryon); repeat it to build for several",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--alias", default=ALIAS, help="build for the version of this alias (default: %(default)s)"
    )
    which.add_argument(
        "--version", help="build for this version instead (e.g. before promoting it; one --model only)"
    )
    parser.add_argument("--plans", type=Path, required=True, metavar="DIR", help="the plan store sync reads")
    parser.add_argument(
        "--variant", choices=PRECISIONS, default="fp32", help="ONNX variant to build from (default fp32)"
    )
    parser.add_argument(
        "--opt-batch", type=int, help="batch size TensorRT tunes for (default: the bundle's max batch size)"
    )
    parser.add_argument(
        "--workspace-gib", type=float, default=8.0, help="TensorRT builder workspace in GiB (default 8)"
    )
    add_tracking_uri(parser)
    args = parser.parse_args()
    args.models = list(dict.fromkeys(args.models or ["tryon"]))
    if args.version is not None and len(args.models) > 1:
        parser.error("--version names a version of one registered model: give one --model with it")
    return args


def already_built(store: Path, networks: list[str], variant: str, capability: str, tensorrt: str) -> bool:
    """Whether the store holds a plan of every network for this variant, GPU architecture and TensorRT."""
    index = store / PLAN_STORE_INDEX
    if not index.is_file():
        return False
    stored = json.loads(index.read_text())
    return all(
        any(
            (p["variant"], p["compute_capability"], p["tensorrt_version"]) == (variant, capability, tensorrt)
            for p in stored.get(network, [])
        )
        for network in networks
    )


def build_plans(
    client: MlflowClient, args: argparse.Namespace, model: str, gpu: Gpu, tensorrt_version: str
) -> None:
    """Build and publish the plans of `model`'s version (--version, or the one --alias names)."""
    try:
        if args.version is not None:
            model_version = client.get_model_version(model, args.version)
        else:
            model_version = client.get_model_version_by_alias(model, args.alias)
    except MlflowException as exc:
        which = f"version {args.version}" if args.version else f"alias '{args.alias}'"
        raise RegistryError(f"'{model}' {which}: {exc.message.splitlines()[0]}") from None
    print(f"'{model}' version {model_version.version}: downloading", flush=True)
    with tempfile.TemporaryDirectory(prefix="fashionserve-plans-") as tmp:
        bundle, manifest = download_bundle(client, model_version, Path(tmp))
        store = plan_store_dir(args.plans, model, bundle_digest(bundle))
        networks = plan_networks(manifest)
        if already_built(store, networks, args.variant, gpu.compute_capability, tensorrt_version):
            print(
                f"up to date: {store} holds {args.variant} plans of {', '.join(networks) or 'no network'} "
                f"for {gpu.name} (compute capability {gpu.compute_capability}), TensorRT {tensorrt_version}"
            )
            return
        manifest = build_bundle_plans(
            bundle,
            args.variant,
            force=model_version.tags.get(GATE_FORCED_TAG) == "true",
            opt_batch=args.opt_batch,
            workspace_gib=args.workspace_gib,
            log=lambda line: print(line, flush=True),
        )
        files = publish_plans(bundle, manifest, store)
    print(f"published {len(files)} plans of '{model}' version {model_version.version} into {store}")


def main() -> int:
    args = parse_args()
    tensorrt_version = require_tensorrt()
    gpu = local_gpu()
    client = connect(args.tracking_uri)
    failed = 0
    for model in args.models:  # a model that fails does not keep the others from getting their plans
        try:
            build_plans(client, args, model, gpu, tensorrt_version)
        except (PlanError, RegistryError, RenderError) as exc:
            failed += 1
            print(f"error: {first_line(exc)}", file=sys.stderr, flush=True)
    return 2 if failed else 0


if __name__ == "__main__":
    run(main, expected=(PlanError, RegistryError, RenderError))
