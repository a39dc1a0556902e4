"""First run of the GPU host stack: give an empty registry a served version (random-init demo bundle).

When no version of the registered model holds the alias, this exports the demo bundle with seeded
random-init weights (export/tryon.py --random-init: the try-on images are noise), registers it
(mlflow/register.py's validation and upload) and promotes it, so the sync loop has something to serve.
Idempotent: a registry whose alias is set is left alone; an earlier demo bundle on disk, or a demo
version registered by an interrupted run, is reused. A registry that has other versions but no alias
holder is refused: promote one of them yourself (mlflow/promote.py).

Arguments after `--` go to export/tryon.py (e.g. narrower networks for a quick check).

With --catalogue, the two catalogue models get the same treatment from the trained checkpoints shipped
in models/catalogue/ (sha256-checked against models/catalogue/SHA256SUMS): `garment_classifier` and
`fashion_generator` are exported, registered and promoted unless their alias is already set; a version
registered earlier from the same checkpoint (tag checkpoint_sha256) is reused.

Examples:
  python deploy/bootstrap.py --bundles /bundles
  python deploy/bootstrap.py --bundles work/bundles --resolution 256x192 -- --image-ngf 8
  python deploy/bootstrap.py --bundles /bundles --catalogue
"""

import argparse
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODEL = "tryon"  # the demo is the try-on pipeline (export/tryon.py)
SHIPPED = PROJECT_ROOT / "models" / "catalogue"  # trained checkpoints, one per catalogue model
CATALOGUE_MODELS = ("garment_classifier", "fashion_generator")  # export/<model>.py --checkpoint
sys.path.insert(0, str(PROJECT_ROOT))  # run as a script from a checkout

from mlflow.tracking import MlflowClient  # noqa: E402

from fashionserve.checkpoints import sha256_file  # noqa: E402
from fashionserve.cli import UserError, add_tracking_uri, command_parser, run  # noqa: E402
from fashionserve.registry import (  # noqa: E402
    ALIAS,
    RANDOM_INIT,
    RegistryError,
    connect,
    promote,
    register_bundle,
)


def parse_args() -> argparse.Namespace:
    parser = command_parser(__doc__)
    parser.add_argument("--alias", default=ALIAS, help="alias the demo gets (default: %(default)s)")
    parser.add_argument(
        "--bundles", type=Path, required=True, metavar="DIR", help="folder the demo bundle is exported into"
    )
    parser.add_argument(
        "--resolution", default="1024x768", help="HEIGHTxWIDTH of the demo bundle (default %(default)s)"
    )
    add_tracking_uri(parser)
    parser.add_argument(
        "--catalogue",
        action="store_true",
        help="also serve garment_classifier and fashion_generator from the checkpoints in models/catalogue/",
    )
    args, export_args = parser.parse_known_args()
    if export_args[:1] == ["--"]:
        export_args = export_args[1:]
    elif export_args:
        parser.error(f"unrecognized arguments: {' '.join(export_args)} (export options go after --)")
    args.export_args = export_args
    return args


def registry_state(
    client: MlflowClient, name: str, alias: str, checkpoint_sha256: str | None = None
) -> tuple[str | None, list[str], list[str]]:
    """(version holding `alias` or None, all version numbers, our version numbers: the random-init
    demos, or with `checkpoint_sha256` the versions exported from that checkpoint)."""
    found = client.search_registered_models(filter_string=f"name='{name}'")
    holder = found[0].aliases.get(alias) if found else None
    versions = client.search_model_versions(f"name='{name}'") if found else []
    if checkpoint_sha256 is None:
        ours = [v.version for v in versions if RANDOM_INIT in v.tags]
    else:
        ours = [v.version for v in versions if v.tags.get("checkpoint_sha256") == checkpoint_sha256]
    return holder, [v.version for v in versions], ours


def export_demo(bundle: Path, resolution: str, export_args: list[str]) -> None:
    print(f"exporting the demo bundle to {bundle} ({resolution}, {RANDOM_INIT} weights: outputs are noise)")
    command = [sys.executable, str(PROJECT_ROOT / "export" / "tryon.py"), "--random-init", "--seed", "0"]
    result = subprocess.run(
        [*command, "--resolution", resolution, *export_args, "--out", str(bundle)], check=False
    )
    if result.returncode != 0:
        raise UserError(f"the demo export failed (exit {result.returncode}, see its output above)")


def shipped_checkpoints() -> dict[str, tuple[Path, str]]:
    """{model: (checkpoint, sha256)} of the shipped catalogue checkpoints, each checked against
    SHA256SUMS."""
    sums = SHIPPED / "SHA256SUMS"
    try:
        listed = dict(reversed(line.split()) for line in sums.read_text().splitlines() if line.strip())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {sums}: {exc}") from None
    checkpoints = {}
    for model in CATALOGUE_MODELS:
        path = SHIPPED / f"{model}.pt"
        if not path.is_file() or path.name not in listed:
            raise UserError(f"{path} is missing or not listed in {sums}")
        digest = sha256_file(path)
        if digest != listed[path.name]:
            raise UserError(f"{path}: sha256 {digest} differs from {sums} ({listed[path.name]})")
        checkpoints[model] = (path, digest)
    return checkpoints


def bootstrap_shipped(client: MlflowClient, model: str, checkpoint: Path, digest: str, args) -> None:
    """Give `model` a promoted version exported from the shipped `checkpoint`, unless its alias is set."""
    holder, versions, ours = registry_state(client, model, args.alias, digest)
    if holder is not None:
        print(f"'{model}' alias '{args.alias}' -> version {holder}: nothing to do")
        return
    if versions and len(ours) != len(versions):
        raise RegistryError(
            f"'{model}' has versions ({', '.join(versions)}) but none holds alias '{args.alias}': "
            "promote one with mlflow/promote.py (the shipped model is only registered into an empty registry)"
        )
    if ours:
        version = max(ours, key=int)
        print(f"reusing the version {version} registered earlier from {checkpoint.name}")
    else:
        bundle = args.bundles / f"{model}-{digest[:12]}"
        if not bundle.is_dir():  # the export renames a finished bundle into place: one present is whole
            args.bundles.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, str(PROJECT_ROOT / "export" / f"{model}.py"), "--checkpoint"]
            result = subprocess.run([*command, str(checkpoint), "--out", str(bundle)], check=False)
            if result.returncode != 0:
                raise UserError(f"the {model} export failed (exit {result.returncode}, see its output above)")
        version = register_bundle(client, bundle, model).version
        print(f"registered '{model}' version {version} (trained: {checkpoint.name})")
    print(promote(client, model, version, args.alias))


def main() -> None:
    args = parse_args()
    client = connect(args.tracking_uri)
    if args.catalogue:
        for model, (checkpoint, digest) in shipped_checkpoints().items():
            bootstrap_shipped(client, model, checkpoint, digest, args)
    holder, versions, demos = registry_state(client, MODEL, args.alias)
    if holder is not None:
        print(f"'{MODEL}' alias '{args.alias}' -> version {holder}: nothing to do")
        return
    if versions and len(demos) != len(versions):
        raise RegistryError(
            f"'{MODEL}' has versions ({', '.join(versions)}) but none holds alias '{args.alias}': "
            "promote one with mlflow/promote.py (the demo is only registered into an empty registry)"
        )
    if demos:  # registered by a run that stopped before promoting it
        version = max(demos, key=int)
        print(f"reusing the demo version {version} registered earlier")
    else:
        bundle = args.bundles / f"{MODEL}-{RANDOM_INIT}-{args.resolution}"
        if bundle.is_dir():  # the export renames a finished bundle into place: this one is whole
            print(f"reusing the demo bundle {bundle}")
        else:
            args.bundles.mkdir(parents=True, exist_ok=True)
            export_demo(bundle, args.resolution, args.export_args)
        version = register_bundle(client, bundle, MODEL).version
        print(f"registered '{MODEL}' version {version} ({RANDOM_INIT}: outputs are noise)")
    print(promote(client, MODEL, version, args.alias))


if __name__ == "__main__":
    run(main, expected=(RegistryError,))
