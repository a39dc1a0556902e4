"""The web app (`python -m web`) against the embedded Triton serving the small try-on and hair bundles,
registered, promoted and synced from a real MLflow server: its API over HTTP, its privacy and
concurrency guarantees in process, and the three pages in a real headless Chromium.

Set WEB_SCREENSHOTS=docs to save a screenshot of each page as docs/web_<page>.png."""

import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from scipy import ndimage
from skimage.data import astronaut
from tritonclient.utils import InferenceServerException

from fashionserve import registry
from fashionserve.client import TritonModelClient
from fashionserve.hair.alignment import FaceAligner, paste_into_photo
from fashionserve.hair.samples import sample_direction, sample_portraits
from fashionserve.launcher import TritonServer
from fashionserve.mlflow_server import MlflowServer
from fashionserve.processes import free_ports, wait_until
from fashionserve.sync import ADMIN_HEADER, sync_once
from fashionserve.tryon.dataset import load_tryon_inputs, read_pairs
from tests.conftest import HAIR_CONFIG, PROJECT_ROOT, TEST_CONFIG
from web import app as web_app
from web.app import SAMPLE_NAMES, Settings, create_app, garment_from_photo

HAIR_SIZE = HAIR_CONFIG.image_size
SCREENSHOTS = os.environ.get("WEB_SCREENSHOTS")


# ---------------------------------------------------------------------------------------------------
# The stack: MLflow -> sync -> Triton (explicit model control) <- web app


ADMIN_KEY = "web-test-admin-key"
# Triton's repository API (index, load, unload) answers the admin key only, as compose and k8s run it:
# the web app must not need it.
RESTRICTED = [
    f"--{option}=model-repository,shared-memory,trace,logging:{ADMIN_HEADER}={ADMIN_KEY}"
    for option in ("http-restricted-api", "grpc-restricted-protocol")
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tryon_bundle, hair_bundle):
    """Triton serving `tryon` and `hair` (transfer, edit: the tests' tiny random-init HairFastGAN whose
    parser finds hair) as version 1 of each registered model, synced from MLflow, its model control
    restricted to the admin key as in compose and k8s. Yields (triton, mlflow url)."""
    root = tmp_path_factory.mktemp("web-stack")
    served = tmp_path_factory.mktemp("served")
    with (
        MlflowServer(root=root / "mlflow") as mlflow_server,
        TritonServer(repository=served, model_control="explicit", extra_args=RESTRICTED) as triton,
    ):
        client = registry.connect(mlflow_server.url)
        for name, bundle in (("tryon", tryon_bundle[0]), ("hair", hair_bundle[0])):
            version = registry.register_bundle(client, bundle, log=lambda _: None)
            registry.promote(client, name, version.version)
            sync_once(
                client, name, triton.repository, triton.http_url, log=lambda _: None, admin_key=ADMIN_KEY
            )
        yield triton, mlflow_server.url


@contextlib.contextmanager
def running_web(log: Path, *options: str) -> Iterator[str]:
    """`python -m web OPTIONS` as a user starts it, on a free port; yields its base URL. Its output goes
    to `log`, which must hold no traceback at the end (every failure was an expected one)."""
    (port,) = free_ports(1)
    with log.open("w") as output:
        command = [sys.executable, "-m", "web", *options, "--port", str(port)]
        process = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return process.poll() is not None

    try:
        assert wait_until(up, 180) and process.poll() is None, log.read_text()  # slow imports on a busy host
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture(scope="module")
def web(stack, samples_dir, tmp_path_factory):
    triton, mlflow_url = stack
    log = tmp_path_factory.mktemp("web") / "web.log"
    with running_web(
        log, "--triton", triton.grpc_url, "--dataroot", str(samples_dir), "--mlflow-uri", mlflow_url,
    ) as url:  # fmt: skip
        yield url


def png_bytes(image: np.ndarray | Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buffer, format=format)
    return buffer.getvalue()


def decode(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["cache-control"] == "no-store"
    return np.asarray(Image.open(io.BytesIO(response.content)))


def direct(triton: TritonServer, model: str, inputs: dict[str, np.ndarray], output: str) -> np.ndarray:
    """The same request sent straight to Triton."""
    client = TritonModelClient(triton.grpc_url, model)
    try:
        return client.infer({name: array[None] for name, array in inputs.items()})[output][0]
    finally:
        client.close()


def drawn_garment(height: int = 300, width: int = 240) -> np.ndarray:
    """A red T-shirt-like block on a white background, as a phone photo of a garment would be."""
    photo = np.full((height, width, 3), 250, np.uint8)
    photo[60:260, 50:190] = (200, 30, 40)
    photo[60:110, 20:220] = (200, 30, 40)  # sleeves
    return photo


def truncated(data: bytes) -> bytes:
    """The first two thirds of a file: the header reads, the pixels end early (an interrupted upload)."""
    return data[: len(data) * 2 // 3]


def bomb_png(side: int) -> bytes:
    """A real decompression bomb: a side x side grayscale PNG of zeros, a few hundred KB on the wire."""
    row = b"\x00" + bytes(side)  # filter byte + pixels
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------------
# API over HTTP


def test_config_lists_the_catalogue_and_status_names_the_synced_versions(web, samples_dir):
    config = httpx.get(f"{web}/api/config").json()
    assert config["persons"] == sorted(p.name for p in (samples_dir / "test" / "image").iterdir())
    assert config["garments"] == sorted(p.name for p in (samples_dir / "test" / "cloth").iterdir())
    assert config["directions"] == ["sample"] and len(config["hair_samples"]) == 3
    status = httpx.get(f"{web}/api/status").json()
    assert status["reachable"] and status["ready"]
    by_name = {e["name"]: e for e in status["ensembles"]}
    assert set(by_name) == {"tryon", "hair_transfer", "hair_edit"}
    for ensemble in by_name.values():
        assert ensemble["ready"] and ensemble["triton_version"] == 1
        assert ensemble["registered_version"] == ensemble["production_version"] == "1"
    # both bundles have random weights (the hair one with a parser that finds hair)
    assert all(ensemble["random_init"] is True for ensemble in by_name.values())
    assert by_name["hair_transfer"]["registered_model"] == by_name["hair_edit"]["registered_model"] == "hair"
    thumbnail = httpx.get(f"{web}/api/catalogue/person/{config['persons'][0]}")
    assert thumbnail.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumbnail.content)).size[1] <= web_app.THUMBNAIL_HEIGHT


def test_tryon_from_the_catalogue_equals_triton(web, stack, samples_dir):
    person, cloth = read_pairs(samples_dir / "test_pairs.txt")[0]
    result = decode(
        httpx.post(f"{web}/api/tryon", files={"person": (None, person), "garment": (None, cloth)})
    )
    expected = direct(stack[0], "tryon", load_tryon_inputs(samples_dir, person, cloth), "tryon_image")
    assert result.shape == (TEST_CONFIG.height, TEST_CONFIG.width, 3)
    np.testing.assert_array_equal(result, expected)


def test_tryon_with_an_uploaded_garment_photo(web, stack, samples_dir):
    person = read_pairs(samples_dir / "test_pairs.txt")[0][0]
    photo = drawn_garment()
    files = {"person": (None, person), "garment_photo": ("shirt.jpg", png_bytes(photo), "image/jpeg")}
    result = decode(httpx.post(f"{web}/api/tryon", files=files))
    cloth, mask = garment_from_photo(photo, TEST_CONFIG.height, TEST_CONFIG.width)
    inputs = load_tryon_inputs(samples_dir, person, read_pairs(samples_dir / "test_pairs.txt")[0][1])
    inputs |= {"cloth": cloth, "cloth_mask": mask}
    np.testing.assert_array_equal(result, direct(stack[0], "tryon", inputs, "tryon_image"))


def test_garment_photo_becomes_a_cloth_image_and_mask():
    """300x240 scales by 0.8 to 240x192 and is centred in 256x192 (8 rows of padding above)."""
    cloth, mask = garment_from_photo(drawn_garment(300, 240), 256, 192)
    assert cloth.shape == (256, 192, 3) and mask.shape == (256, 192) and set(np.unique(mask)) == {0, 255}
    expected = np.zeros((256, 192), bool)
    expected[8 + 48 : 8 + 208, 40:152] = expected[8 + 48 : 8 + 88, 16:176] = True
    found = mask == 255
    assert (found & expected).sum() / (found | expected).sum() > 0.95
    far = ~ndimage.binary_dilation(expected, iterations=3)
    assert (cloth[far] == 250).all()  # padding and background: the photo's border colour
    assert (
        np.abs(cloth[ndimage.binary_erosion(expected, iterations=3)].astype(int) - (200, 30, 40)) < 3
    ).all()


def test_hair_transfer_takes_face_hairstyle_and_colour_from_their_fields(web, stack):
    """Samples and uploads (three files) give what Triton gives for the same face, shape reference and
    colour reference; without a colour photo the hairstyle's colour is used,
    and the colour photo changes the result."""
    face, shape, color = SAMPLE_NAMES
    samples = sample_portraits(HAIR_SIZE)

    def transfer(files: dict) -> np.ndarray:
        return decode(httpx.post(f"{web}/api/hair/transfer", files=files, timeout=120))

    def served(face: np.ndarray, shape: np.ndarray, color: np.ndarray) -> np.ndarray:
        inputs = {"face": face, "shape_reference": shape, "color_reference": color}
        return direct(stack[0], "hair_transfer", inputs, "hair_image")

    picked = {"face_sample": (None, face), "shape_sample": (None, shape)}
    coloured = transfer(picked | {"color_sample": (None, color)})
    np.testing.assert_array_equal(coloured, served(samples[face], samples[shape], samples[color]))
    plain = transfer(picked)
    np.testing.assert_array_equal(plain, served(samples[face], samples[shape], samples[shape]))
    assert not np.array_equal(coloured, plain)  # the colour photo is used
    assert not np.array_equal(plain, samples[face])  # the small parser finds hair: something moved

    # Uploads: dlib sees a face in the long_blond drawing (its aligned crop is sent), none in the others
    # (square: scaled from 320 to the served size).
    photos = sample_portraits(320)
    uploaded = transfer(
        {
            "face": ("me.png", png_bytes(photos["bangs_red"]), "image/png"),
            "shape": ("style.png", png_bytes(photos["short_black"]), "image/png"),
            "color": ("colour.jpg", png_bytes(photos["long_blond"]), "image/png"),
        }
    )
    scaled = {
        name: np.asarray(Image.fromarray(photos[name]).resize((HAIR_SIZE, HAIR_SIZE), Image.LANCZOS))
        for name in ("bangs_red", "short_black")
    }
    aligned = FaceAligner().align(photos["long_blond"], HAIR_SIZE, "colour photo").crop
    np.testing.assert_array_equal(uploaded, served(scaled["bangs_red"], scaled["short_black"], aligned))


def test_hair_edit_equals_triton(web, stack):
    big = sample_portraits(320)[SAMPLE_NAMES[2]]  # any square size is scaled
    form = {
        "portrait": ("me.png", png_bytes(big), "image/png"),
        "direction": (None, "sample"),
        "strength": (None, "2.5"),
    }
    edited = decode(httpx.post(f"{web}/api/hair/edit", files=form, timeout=120))
    n_latent, style_dim = HAIR_CONFIG.n_latent, HAIR_CONFIG.style_dim
    inputs = {
        "portrait": np.asarray(Image.fromarray(big).resize((HAIR_SIZE, HAIR_SIZE), Image.LANCZOS)),
        "direction": np.repeat(sample_direction(style_dim)[None], n_latent, axis=0),
        "strength": np.array([2.5], np.float32),
    }
    np.testing.assert_array_equal(edited, direct(stack[0], "hair_edit", inputs, "hair_image"))


def test_a_photo_is_aligned_and_the_result_pasted_back(web, stack):
    """Any photo (here a non-square one with a real face): the face's FFHQ crop goes to the server and
    the result comes back as the whole photo, changed only where the server changed the crop."""
    photo = astronaut()[:, 40:460]
    form = {"portrait": ("me.jpg", png_bytes(photo), "image/png"), "strength": (None, "3")}
    result = decode(httpx.post(f"{web}/api/hair/edit", files=form, timeout=120))
    assert result.shape == photo.shape
    aligned = FaceAligner().align(photo, HAIR_SIZE, "astronaut")
    n_latent, style_dim = HAIR_CONFIG.n_latent, HAIR_CONFIG.style_dim
    inputs = {
        "portrait": aligned.crop,
        "direction": np.repeat(sample_direction(style_dim)[None], n_latent, axis=0),
        "strength": np.array([3.0], np.float32),
    }
    served = direct(stack[0], "hair_edit", inputs, "hair_image")
    np.testing.assert_array_equal(result, paste_into_photo(photo, aligned.alignment, aligned.crop, served))
    assert not np.array_equal(result, photo) and (result == photo).all(axis=-1).mean() > 0.5


BAD_REQUESTS = {
    "not an image": (
        "/api/hair/transfer",
        {
            "face": ("me.png", b"this is a text file, not a photo", "image/png"),
            "shape_sample": (None, "long_blond"),
        },
        415,
        "is not a JPEG, PNG or WebP image",
    ),
    "no hairstyle": (
        "/api/hair/transfer",
        {"face_sample": (None, "long_blond"), "color_sample": (None, "bangs_red")},
        400,
        "Upload a hairstyle photo or pick a sample",
    ),
    "unknown colour sample": (
        "/api/hair/transfer",
        {
            "face_sample": (None, "long_blond"),
            "shape_sample": (None, "bangs_red"),
            "color_sample": (None, "../blue"),
        },
        400,
        "No sample portrait named '../blue'",
    ),
    "decompression bomb": (
        "/api/tryon",
        {"person": (None, "PERSON"), "garment_photo": ("g.png", "BOMB", "image/png")},
        413,
        "is 7000x7000 pixels; the limit is 40 megapixels",
    ),
    "truncated image": (
        "/api/hair/edit",
        {"portrait": ("me.jpg", "TRUNCATED", "image/jpeg")},
        400,
        "could not be decoded",
    ),
    "no face and not square": (
        "/api/hair/edit",
        {"portrait": ("me.png", png_bytes(np.zeros((80, 64, 3), np.uint8)), "image/png")},
        400,
        "No face found in the photo: upload a photo where the face is clearly visible",
    ),
    "too large": (
        "/api/hair/edit",
        {"portrait": ("me.png", bytes(13 * 2**20), "image/png")},
        413,
        "The upload is larger than 12 MB",
    ),
    "unknown person": (
        "/api/tryon",
        {"person": (None, "../../etc/passwd"), "garment": (None, "x.jpg")},
        404,
        "No person named '../../etc/passwd'",
    ),
    "strength out of range": (
        "/api/hair/edit",
        {"portrait_sample": (None, "long_blond"), "strength": (None, "9")},
        400,
        "The strength must be between -5 and 5",
    ),
    "no garment": (
        "/api/tryon",
        {"person": (None, "PERSON")},
        400,
        "Pick a garment or upload a garment photo",
    ),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_requests_get_a_readable_message(web, samples_dir, case):
    path, files, status, message = BAD_REQUESTS[case]
    person = read_pairs(samples_dir / "test_pairs.txt")[0][0]
    made = {
        "PERSON": lambda: person,
        "BOMB": lambda: bomb_png(7000),
        "TRUNCATED": lambda: truncated(png_bytes(sample_portraits(256)["short_black"], "JPEG")),
    }
    files = {k: (n, made[v]() if v in made else v, *t) for k, (n, v, *t) in files.items()}
    response = httpx.post(f"{web}{path}", files=files, timeout=60)
    assert (response.status_code, response.headers["content-type"]) == (status, "application/json")
    assert message in response.json()["error"], response.json()
    assert httpx.get(f"{web}/api/status").json()["ready"]  # and the app keeps serving


# ---------------------------------------------------------------------------------------------------
# In process: server down, privacy, concurrency


def asgi_client(settings: Settings) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(settings)), base_url="http://web")


def test_the_status_comes_from_triton_alone(stack, samples_dir):
    """As compose and k8s run the app: no MLflow, no access to the served folder, Triton's repository
    API refused; the registered versions still show, read from the loaded ensembles' configs."""

    async def scenario():
        async with asgi_client(Settings(triton_url=stack[0].grpc_url, dataroot=samples_dir)) as client:
            return (await client.get("/api/status")).json()

    status = asyncio.run(scenario())
    assert status["reachable"] and status["ready"]
    by_name = {e["name"]: e for e in status["ensembles"]}
    for ensemble in by_name.values():
        assert (ensemble["ready"], ensemble["triton_version"], ensemble["registered_version"]) == (
            True,
            1,
            "1",
        )
        assert ensemble["production_version"] is None
    assert [by_name[name]["random_init"] for name in ("tryon", "hair_transfer", "hair_edit")] == [True] * 3
    assert [by_name[name]["registered_model"] for name in ("tryon", "hair_transfer", "hair_edit")] == [
        "tryon", "hair", "hair",
    ]  # fmt: skip


def test_server_down_is_a_readable_message(samples_dir):
    (port,) = free_ports(1)  # nothing listens there

    async def scenario():
        async with asgi_client(Settings(triton_url=f"127.0.0.1:{port}", dataroot=samples_dir)) as client:
            status = (await client.get("/api/status")).json()
            form = {"face_sample": (None, "long_blond"), "shape_sample": (None, "bangs_red")}
            return status, await client.post("/api/hair/transfer", files=form)

    status, response = asyncio.run(scenario())
    assert status == {"triton_url": f"127.0.0.1:{port}", "reachable": False, "ready": False, "ensembles": []}
    assert response.status_code == 503
    assert response.json()["error"].startswith(
        f"The model server is not reachable (Triton at 127.0.0.1:{port})"
    )


def test_uploads_never_touch_the_disk_or_the_log(stack, samples_dir, caplog):
    """An audit hook sees every file opened while uploads of 5 MB (above Starlette's 1 MB spool
    threshold) are handled: none is opened for writing. The log names no file and holds no pixel."""
    opened: list[str] = []
    recording = [False]

    def audit(event: str, args: tuple) -> None:
        if recording[0] and event == "open" and isinstance(args[1], str) and set(args[1]) & set("wax+"):
            opened.append(f"{args[0]} ({args[1]})")
        if recording[0] and event in ("os.open", "tempfile.mkstemp", "tempfile.mkdtemp"):
            opened.append(f"{event} {args[:1]}")

    sys.addaudithook(audit)
    portrait = np.random.default_rng(0).integers(0, 256, (1300, 1300, 3), dtype=np.uint8)  # ~5 MB as PNG
    upload = png_bytes(portrait)
    assert len(upload) > 4 * 2**20
    form = {
        "face": ("private-name-4711.png", upload, "image/png"),
        "shape_sample": (None, "short_black"),
    }

    async def scenario():
        async with asgi_client(Settings(triton_url=stack[0].grpc_url, dataroot=samples_dir)) as client:
            recording[0] = True
            try:
                return await client.post("/api/hair/transfer", files=form)
            finally:
                recording[0] = False

    with caplog.at_level(logging.DEBUG):
        response = asyncio.run(scenario())
    assert response.status_code == 200, response.text
    assert opened == []
    assert "private-name-4711" not in caplog.text and "hair_transfer:" in caplog.text


def test_one_slow_request_does_not_hold_up_the_others(stack, samples_dir, monkeypatch):
    """Three try-ons whose inference is held for 1.5 s each are held at the same time (a worker thread
    each), and the status answers while they are."""
    infer = web_app.Models.infer
    held: list[tuple[float, float]] = []

    def slow(client, inputs, output):
        started = time.monotonic()
        time.sleep(1.5)
        held.append((started, time.monotonic()))
        return infer(client, inputs, output)

    monkeypatch.setattr(web_app.Models, "infer", staticmethod(slow))
    person, cloth = read_pairs(samples_dir / "test_pairs.txt")[0]
    form = {"person": (None, person), "garment": (None, cloth)}

    async def scenario():
        async with asgi_client(Settings(triton_url=stack[0].grpc_url, dataroot=samples_dir)) as client:
            tryons = [asyncio.create_task(client.post("/api/tryon", files=form)) for _ in range(3)]
            await asyncio.sleep(0.5)
            status = await client.get("/api/status")
            answered = time.monotonic()
            return status, answered, await asyncio.gather(*tryons)

    status, answered, responses = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200] * 3 and status.json()["ready"]
    assert len(held) == 3
    first_end = min(end for _, end in held)
    assert max(start for start, _ in held) < first_end, held  # all three held at once
    assert answered < first_end, (answered, held)


# ---------------------------------------------------------------------------------------------------
# The pages in a real browser


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for binary in ("/usr/bin/chromium", "/usr/bin/chromedriver"):
        if not Path(binary).exists():
            pytest.fail(f"{binary} is missing: apt-get install chromium chromium-driver (.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition, timeout: float = 60.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def result_shown(section: str):
    def shown(driver) -> bool:
        return driver.execute_script(
            f"const img = document.querySelector('#{section} img.result');"
            "return img.complete && img.naturalWidth > 0 && img.src.startsWith('blob:');"
        )

    return shown


def error_text(driver, section: str) -> str:
    return driver.execute_script(
        f"const box = document.querySelector('#{section} .error'); return box.hidden ? '' : box.textContent;"
    )


def screenshot(driver, page: str) -> None:
    if SCREENSHOTS:
        driver.save_screenshot(str(PROJECT_ROOT / SCREENSHOTS / f"web_{page}.png"))


def test_tryon_page(browser, web, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(f"{web}/tryon")
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#garments .choice img")) == 2)
    wait_for(
        browser,
        lambda d: "tryon v1 (production), random-init weights" in d.find_element(By.ID, "status").text,
    )
    browser.find_elements(By.CSS_SELECTOR, "#garments .choice")[1].click()
    browser.find_element(By.ID, "tryon-submit").click()
    wait_for(browser, result_shown("tryon"))
    assert error_text(browser, "tryon") == ""
    screenshot(browser, "tryon")

    photo = tmp_path / "garment.jpg"
    Image.fromarray(drawn_garment()).save(photo)
    browser.find_element(By.ID, "garment-photo").send_keys(str(photo))
    browser.find_element(By.ID, "tryon-submit").click()
    wait_for(browser, result_shown("tryon"))

    bad = tmp_path / "holiday.jpg"
    bad.write_text("not a photo at all")
    browser.find_element(By.ID, "garment-photo").send_keys(str(bad))
    browser.find_element(By.ID, "tryon-submit").click()
    wait_for(browser, lambda d: error_text(d, "tryon") != "")
    assert "not a JPEG, PNG or WebP image" in error_text(browser, "tryon")
    assert not result_shown("tryon")(browser)


def shown_result(driver, section: str) -> np.ndarray:
    """The pixels of the result image the page shows (drawn onto a canvas: a blob: image is same-origin)."""
    url = driver.execute_script(
        f"const img = document.querySelector('#{section} img.result');"
        "const canvas = document.createElement('canvas');"
        "canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;"
        "canvas.getContext('2d').drawImage(img, 0, 0);"
        "return canvas.toDataURL('image/png');"
    )
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


def test_hair_page(browser, web, stack, tmp_path):
    """Face, hairstyle and colour picked or uploaded on the page: the result shown is what Triton gives
    for those three images (so a field the page drops or mixes up fails it)."""
    from selenium.webdriver.common.by import By

    def choices(field: str) -> list:
        return browser.find_elements(By.CSS_SELECTOR, f'#hair .samples[data-field="{field}"] .choice')

    def preview_shown(field: str) -> bool:
        return browser.find_element(By.CSS_SELECTOR, f'#hair img[data-preview="{field}"]').is_displayed()

    def transfer_shown() -> np.ndarray:
        browser.find_element(By.CSS_SELECTOR, "#hair button[type=submit]").click()
        wait_for(browser, result_shown("hair"), timeout=120)
        assert error_text(browser, "hair") == ""
        return shown_result(browser, "hair")

    def served(face: np.ndarray, shape: np.ndarray, color: np.ndarray) -> np.ndarray:
        inputs = {"face": face, "shape_reference": shape, "color_reference": color}
        return direct(stack[0], "hair_transfer", inputs, "hair_image")

    def upload(field: str, image: np.ndarray) -> np.ndarray:
        """Upload a 200x200 drawing (no face dlib sees: taken as a crop and scaled); the crop served."""
        path = tmp_path / f"{field}.png"
        Image.fromarray(image).save(path)
        browser.find_element(By.CSS_SELECTOR, f'#hair input[name="{field}"]').send_keys(str(path))
        return np.asarray(Image.fromarray(image).resize((HAIR_SIZE, HAIR_SIZE), Image.LANCZOS))

    samples, small = sample_portraits(HAIR_SIZE), sample_portraits(200)
    browser.get(f"{web}/hair")
    wait_for(browser, lambda d: [len(choices(f)) for f in ("face", "shape", "color")] == [3, 3, 4])
    # the colour starts on "Same as the hairstyle's" (no photo shown); then a sample of its own
    assert choices("color")[0].text == "Same as the hairstyle's" and not preview_shown("color")
    face, shape, color = SAMPLE_NAMES[0], SAMPLE_NAMES[2], SAMPLE_NAMES[1]
    choices("shape")[2].click()
    choices("color")[2].click()
    assert preview_shown("color")
    result = transfer_shown()
    np.testing.assert_array_equal(result, served(samples[face], samples[shape], samples[color]))
    assert not np.array_equal(result, served(samples[face], samples[shape], samples[shape]))
    wait_for(browser, lambda d: "hairstyle: hair v1" in d.find_element(By.ID, "status").text)
    screenshot(browser, "hair")

    my_face = upload("face", small["bangs_red"])
    choices("color")[0].click()  # back to the hairstyle's colour
    assert not preview_shown("color")
    np.testing.assert_array_equal(transfer_shown(), served(my_face, samples[shape], samples[shape]))

    colour = upload("color", small["short_black"])
    assert [c.get_attribute("aria-pressed") for c in choices("color")] == ["false"] * 4
    np.testing.assert_array_equal(transfer_shown(), served(my_face, samples[shape], colour))


def test_edit_page(browser, web):
    from selenium.webdriver.common.by import By

    browser.get(f"{web}/edit")
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#direction option")) == 1)
    slider = browser.find_element(By.ID, "strength")
    browser.execute_script(
        "arguments[0].value = '-2.4'; arguments[0].dispatchEvent(new Event('input'));", slider
    )
    assert browser.find_element(By.ID, "strength-value").text == "-2.4"
    browser.find_element(By.CSS_SELECTOR, "#edit button[type=submit]").click()
    wait_for(browser, result_shown("edit"))
    wait_for(browser, lambda d: "Model server ready" in d.find_element(By.ID, "status").text)
    screenshot(browser, "edit")


def test_a_model_that_is_not_loaded_is_named(browser, web, stack):
    """Last: unloads hair_edit for a moment (and loads it back)."""
    from selenium.webdriver.common.by import By

    triton = grpcclient.InferenceServerClient(stack[0].grpc_url)
    with pytest.raises(InferenceServerException, match="restricted"):  # as the web app would be
        triton.get_model_repository_index()
    control = httpclient.InferenceServerClient(stack[0].http_url)  # as sync: HTTP, with the admin key
    admin = {ADMIN_HEADER: ADMIN_KEY}
    control.unload_model("hair_edit", headers=admin)
    try:
        assert wait_until(lambda: not triton.is_model_ready("hair_edit"), 30)
        browser.get(f"{web}/edit")
        wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#edit .samples .choice")) == 3)
        browser.find_element(By.CSS_SELECTOR, "#edit button[type=submit]").click()
        wait_for(browser, lambda d: error_text(d, "edit") != "")
        assert (
            error_text(browser, "edit")
            == "The hair edit model (hair_edit) is not loaded on the server right now."
        )
        wait_for(browser, lambda d: "edit: not loaded" in d.find_element(By.ID, "status").text, timeout=20)
    finally:
        control.load_model("hair_edit", headers=admin)
        control.close()
        triton.close()
    status = json.loads(httpx.get(f"{web}/api/status").text)
    assert {e["name"]: e["ready"] for e in status["ensembles"]}["hair_edit"]
