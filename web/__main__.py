"""Serve the web app: virtual try-on, hairstyle transfer and hair edit in the browser, on Triton.

Talks to Triton over gRPC (one shared connection). The try-on page picks persons and garments from a
VITON-HD-layout folder (--dataroot), or takes an uploaded garment photo; the hair pages take an
uploaded square, face-aligned portrait or one of the drawn samples. Uploads stay in memory.

Examples:
  python -m web --triton 127.0.0.1:8001 --dataroot work/samples --mlflow-uri http://127.0.0.1:5000
  python -m web --triton triton:8001 --host 0.0.0.0 --port 8080
"""

import argparse
import logging
import os
import tempfile
from pathlib import Path

import uvicorn

from fashionserve.cli import UserError, command_parser, run
from fashionserve.client import DEFAULT_URLS
from fashionserve.tryon.samples import write_sample_set
from web.app import Settings, create_app
from web.uploads import UploadLimits

DEFAULT_PORT = 8080
SAMPLE_HEIGHT, SAMPLE_WIDTH = 1024, 768  # scaled to the served resolution per request


def parse_args() -> argparse.Namespace:
    parser = command_parser(__doc__)
    parser.prog = "python -m web"
    parser.add_argument(
        "--triton", default=DEFAULT_URLS["grpc"], help="Triton gRPC address (default %(default)s)"
    )
    parser.add_argument(
        "--dataroot", type=Path, help="VITON-HD-layout folder of persons and garments to pick"
    )
    parser.add_argument("--split", default="test", help="sub-folder of --dataroot (default test)")
    parser.add_argument(
        "--mlflow-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI"),
        help="MLflow tracking server: the status line also shows the version holding 'production' (the "
        "live versions come from Triton; default: $MLFLOW_TRACKING_URI, if set)",
    )
    parser.add_argument("--directions", type=Path, help="folder of .npy latent directions for the edit page")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default %(default)s)")
    parser.add_argument("--max-upload-mb", type=float, default=12.0, help="largest request body (default 12)")
    parser.add_argument(
        "--max-megapixels", type=float, default=40.0, help="largest uploaded image (default 40)"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one inference may take")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    for option, folder in (("--dataroot", args.dataroot), ("--directions", args.directions)):
        if folder is not None and not folder.is_dir():
            raise UserError(f"{option} {folder} is not a folder")
    if args.dataroot is not None and not (args.dataroot / args.split / "image").is_dir():
        raise UserError(f"{args.dataroot} has no {args.split}/image folder: not a VITON-HD-layout folder")
    if args.max_upload_mb <= 0 or args.max_megapixels <= 0:
        raise UserError("--max-upload-mb and --max-megapixels must be positive")
    limits = UploadLimits(
        max_bytes=int(args.max_upload_mb * 2**20), max_pixels=int(args.max_megapixels * 1e6)
    )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="fashionserve-web-samples-") as samples:
        if args.dataroot is None:  # drawings, not anyone's photos: a temporary folder is fine
            write_sample_set(Path(samples), height=SAMPLE_HEIGHT, width=SAMPLE_WIDTH)
            print(f"try-on catalogue: the drawn sample set (no --dataroot), {SAMPLE_HEIGHT}x{SAMPLE_WIDTH}")
        settings = Settings(
            triton_url=args.triton,
            dataroot=args.dataroot or Path(samples),
            split=args.split,
            mlflow_uri=args.mlflow_uri,
            directions=args.directions,
            limits=limits,
            timeout_s=args.timeout,
        )
        app = create_app(settings)
        print(f"web app on http://{args.host}:{args.port}/ (Triton gRPC {args.triton})", flush=True)
        try:
            uvicorn.run(app, host=args.host, port=args.port, access_log=False, server_header=False)
        except SystemExit as exc:  # uvicorn exits 1 when the port is taken (after logging why)
            raise UserError(f"cannot serve on {args.host}:{args.port} (see the log line above)") from exc


if __name__ == "__main__":
    run(main)
