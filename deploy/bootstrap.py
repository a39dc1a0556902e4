"""First run of the GPU host stack: give an empty registry a served version (random-init demo bundle).

When no version of the registered model holds the alias, this exports the demo bundle with seeded
random-init weights (export/tryon.py --random-init: the try-on images are noise), registers it
(mlflow/register.py's validation and upload) and promotes it, so the sync loop has something to serve.
Idempotent: a registry whose alias is set is left alone; an earlier demo bundle on disk, or a demo
version registered by an interrupted run, is reused. A registry that has other versions but no alias
holder is refused: promote one of them yourself (mlflow/promote.py).

Arguments after `--` go to export/tryon.py (e.g. narrower networks for a quick check).

Examples:
  python deploy/bootstrap.py --bundles /bundles
  python deploy/bootstrap.py --bundles work/bundles --resolution 256x192 -- --image-ngf 8
"""

import argparse
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODEL = "tryon"  # the demo is the try-on pipeline (export/tryon.py)
sys.path.insert(0, str(PROJECT_ROOT))  # run as a script from a checkout

from mlflow.tracking import MlflowClient  # noqa: E402

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
    args, export_args = parser.parse_known_args()
    if export_args[:1] == ["--"]:
        export_args = export_args[1:]
    elif export_args:
        parser.error(f"unrecognized arguments: {' '.join(export_args)} (export options go after --)")
    args.export_args = export_args
    return args


def registry_state(client: MlflowClient, name: str, alias: str) -> tuple[str | None, list[str], list[str]]:
    """(version holding `alias` or None, all version numbers, random-init demo version numbers)."""
    found = client.search_registered_models(filter_string=f"name='{name}'")
    holder = found[0].aliases.get(alias) if found else None
    versions = client.search_model_versions(f"name='{name}'") if found else []
    demos = [v.version for v in versions if RANDOM_INIT in v.tags]
    return holder, [v.version for v in versions], demos


def export_demo(bundle: Path, resolution: str, export_args: list[str]) -> None:
    print(f"exporting the demo bundle to {bundle} ({resolution}, {RANDOM_INIT} weights: outputs are noise)")
    command = [sys.executable, str(PROJECT_ROOT / "export" / "tryon.py"), "--random-init", "--seed", "0"]
    result = subprocess.run(
        [*command, "--resolution", resolution, *export_args, "--out", str(bundle)], check=False
    )
    if result.returncode != 0:
        raise UserError(f"the demo export failed (exit {result.returncode}, see its output above)")


def main() -> None:
    args = parse_args()
    client = connect(args.tracking_uri)
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
