"""Reliability: hostile and broken images at every door (image processor, pipeline, Endpoint handler, Space app,
dataset loader, stage 0 and stage 1). Each gets a clear error that names it, or a correct result; the memory cases
measure the peak memory of a child process (marked slow).

A fake `gs` first on PATH proves Ghostscript never runs: plain PIL runs it on the same bytes (the control test).
"""

import base64
import http.server
import io
import json
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch
from helpers_repo_template import HANDLER, SPACE_APP, load_module
from hostile_inputs import (
    BOMBS,
    DOCUMENT_NAMES,
    DOCUMENTS,
    EPS,
    TRUNCATED_FORMATS,
    FakeGhostscript,
    image_bytes,
    noise_image,
    png_bomb,
    truncated,
)
from PIL import Image

from emovlm_kd.data import load_imagefolder, open_image_rgb
from emovlm_kd.testing import make_imagefolder
from image_processing_emovlm_kd import (
    DEFAULT_MAX_IMAGE_PIXELS,
    EmoVLMKDImageProcessor,
    limit_longest_side,
    prepare_image,
)

# PIL warns about sizes above its own limit while opening; those images are refused here anyway.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
ACCEPTED = r"accepted formats: BMP, GIF, JPEG, PNG, PPM, TIFF, WEBP"
PIXEL_LIMIT = r"(more than the limit of 40,000,000|too large).*max_image_pixels"
BOMB_SUFFIX = {"png": ".png", "jpeg": ".jpg", "gif": ".gif", "bmp": ".bmp", "ppm": ".ppm"}
SMALL_PNG = image_bytes(Image.new("RGB", (24, 20), (200, 40, 40)), "PNG")


@pytest.fixture
def fake_gs(tmp_path, monkeypatch):
    return FakeGhostscript(tmp_path / "fake-gs", monkeypatch)


@pytest.fixture(scope="module")
def bomb_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bombs")
    paths = {}
    for name, (make, width, height) in BOMBS.items():
        paths[name] = folder / f"{name}{BOMB_SUFFIX[name.split('_')[0]]}"
        paths[name].write_bytes(make(width, height))
    return paths


@pytest.fixture(scope="module")
def handler(tiny_folder):
    return load_module(HANDLER, "reliability_handler").EndpointHandler(str(tiny_folder))


@pytest.fixture(scope="module")
def classifier(tiny_folder):
    from transformers import pipeline

    return pipeline("image-classification", model=str(tiny_folder), trust_remote_code=True)


def _write(folder, name, data: bytes):
    path = folder / name
    path.write_bytes(data)
    return path


# Documents disguised as images: never decoded, never handed to Ghostscript.
def test_control_plain_pil_runs_ghostscript_on_these_bytes(fake_gs, tmp_path):
    with pytest.raises(Exception):  # the fake renders nothing
        Image.open(_write(tmp_path, "photo.jpg", EPS)).load()
    assert fake_gs.ran


@pytest.mark.parametrize("kind", sorted(DOCUMENTS))
def test_processor_refuses_documents(tiny, fake_gs, tmp_path, kind):
    path = _write(tmp_path, DOCUMENT_NAMES[kind], DOCUMENTS[kind])
    with pytest.raises(ValueError, match=rf"{path.name}.*not a raster image \({ACCEPTED}\)"):
        tiny[1]([str(path)])
    with pytest.raises(ValueError, match=rf"bytes>.*not a raster image \({ACCEPTED}\)"):
        tiny[1]([DOCUMENTS[kind]])
    assert not fake_gs.ran


@pytest.mark.parametrize("kind", ["eps", "postscript", "dos_eps"])
def test_lazily_opened_eps_is_refused_before_decoding(tiny, handler, fake_gs, tmp_path, kind):
    # What PIL's own open returns (and what the inference toolkit hands the handler for an image/* body).
    image = Image.open(_write(tmp_path, DOCUMENT_NAMES[kind], DOCUMENTS[kind]))
    assert image.format == "EPS"
    with pytest.raises(ValueError, match=rf"EPS format, which is not accepted \({ACCEPTED}\)"):
        tiny[1]([image])
    with pytest.raises(ValueError, match="EPS format"):
        handler({"inputs": image})
    assert not fake_gs.ran


@pytest.mark.parametrize("encoding", ["base64", "raw_bytes", "data_url"])
@pytest.mark.parametrize("kind", sorted(DOCUMENTS))
def test_handler_refuses_documents(handler, fake_gs, kind, encoding):
    raw = DOCUMENTS[kind]
    item = {
        "base64": base64.b64encode(raw).decode(),
        "raw_bytes": raw,
        "data_url": f"data:image/jpeg;base64,{base64.b64encode(raw).decode()}",
    }[encoding]
    with pytest.raises(ValueError, match=rf"inputs\[1\].*not a raster image \({ACCEPTED}\)"):
        handler({"inputs": [SMALL_PNG, item]})
    assert not fake_gs.ran


def test_pipeline_refuses_documents(classifier, fake_gs, tmp_path):
    path = _write(tmp_path, "photo.jpg", EPS)
    with pytest.raises(ValueError, match=rf"photo.jpg.*not a raster image \({ACCEPTED}\)"):
        classifier(str(path))
    with pytest.raises(ValueError, match=r"data URL.*not a raster image"):
        classifier(f"data:image/jpeg;base64,{base64.b64encode(EPS).decode()}")
    with pytest.raises(ValueError, match=r"base64 string.*not a raster image"):
        classifier(base64.b64encode(DOCUMENTS["postscript"]).decode())
    assert not fake_gs.ran


def test_loader_refuses_documents_and_lists_no_postscript(fake_gs, tmp_path):
    root = make_imagefolder(tmp_path / "data", per_class=3, size=(16, 16))
    class_dir = root / "train" / "neutral"
    disguised = [_write(class_dir, DOCUMENT_NAMES[kind], DOCUMENTS[kind]) for kind in ("eps", "postscript", "pdf")]
    undisguised = [_write(class_dir, name, EPS) for name in ("figure.eps", "figure.ps", "figure.pdf", "x.epsf")]
    data = load_imagefolder(root)
    reasons = dict(data.bad_images)
    assert set(reasons) == {str(path) for path in disguised}
    assert all("not a raster image" in reason for reason in reasons.values())
    assert {str(path) for path in undisguised} <= set(data.ignored_files)
    assert not fake_gs.ran


def test_stage0_and_stage1_refuse_documents(tiny, fake_gs, tmp_path):
    from emovlm_kd.chat import image_data_url
    from emovlm_kd.instruction_tasks import InstructionEncoder

    path = _write(tmp_path, "photo.jpg", EPS)
    with pytest.raises(ValueError, match=r"photo.jpg.*not a raster image"):
        image_data_url(path.read_bytes(), str(path))
    encoder = InstructionEncoder(tiny[2], tiny[0].config.labels)
    with pytest.raises(ValueError, match=rf"{path}.*not a raster image"):
        encoder.encode(str(path), "classification", 0)
    assert not fake_gs.ran


# Decompression bombs: refused from the header, before any pixel is decoded.
def test_bombs_are_genuine(bomb_files):
    with Image.open(bomb_files["png_10k"]) as image:
        image.verify()  # every chunk and CRC of a real PNG (verify decodes no pixels)
        assert image.size == (10000, 10000)
    assert max(path.stat().st_size for path in bomb_files.values()) < 120_000


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_processor_refuses_bombs(tiny, bomb_files, name):
    path = bomb_files[name]
    with pytest.raises(ValueError, match=PIXEL_LIMIT) as error:
        tiny[1]([str(path)])
    assert str(path) in str(error.value)
    with pytest.raises(ValueError, match=PIXEL_LIMIT):
        open_image_rgb(path)


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_handler_refuses_bombs(handler, bomb_files, name):
    encoded = base64.b64encode(bomb_files[name].read_bytes()).decode()
    with pytest.raises(ValueError, match=rf"inputs\[2\].*{PIXEL_LIMIT}"):
        handler({"inputs": [SMALL_PNG, SMALL_PNG, encoded]})


@pytest.mark.parametrize("name", ["png_13k", "jpeg_13k", "ppm_10k"])
def test_pipeline_refuses_bombs(classifier, bomb_files, name):
    with pytest.raises(ValueError, match=PIXEL_LIMIT):
        classifier(str(bomb_files[name]))
    with pytest.raises(ValueError, match=PIXEL_LIMIT):
        classifier(base64.b64encode(bomb_files[name].read_bytes()).decode())


def test_lazily_opened_bomb_is_refused_undecoded(tiny, bomb_files):
    image = Image.open(bomb_files["png_13k"])
    with pytest.raises(ValueError, match=PIXEL_LIMIT):
        tiny[1]([image])
    assert image.tile  # still undecoded


def test_loader_reports_bombs_without_decoding(bomb_files, tmp_path):
    root = make_imagefolder(tmp_path / "data", per_class=3, size=(16, 16))
    for name, path in bomb_files.items():
        (root / "train" / "positive" / path.name).write_bytes(path.read_bytes())
    start = time.perf_counter()
    data = load_imagefolder(root)
    assert time.perf_counter() - start < 10  # decoding the bombs would take minutes
    reasons = {path.rsplit("/", 1)[1]: reason for path, reason in data.bad_images}
    assert set(reasons) == {path.name for path in bomb_files.values()}
    assert all("max_image_pixels" in reason for reason in reasons.values())


# The limits: configurable, saved with the processor, read by the handler and the app.
def test_limits_are_saved_with_the_processor(tiny, tmp_path):
    image_processor = EmoVLMKDImageProcessor(**{**tiny[1].to_dict(), "max_image_pixels": 5000, "max_image_side": 64})
    image_processor.save_pretrained(tmp_path / "custom")
    saved = json.loads((tmp_path / "custom" / "preprocessor_config.json").read_text())
    assert saved["max_image_pixels"] == 5000 and saved["max_image_side"] == 64
    reloaded = EmoVLMKDImageProcessor.from_pretrained(tmp_path / "custom")
    assert (reloaded.max_image_pixels, reloaded.max_image_side) == (5000, 64)
    with pytest.raises(ValueError, match=r"100 x 100 = 10,000 pixels, more than the limit of 5,000"):
        reloaded([Image.new("RGB", (100, 100))])
    # A processor saved before these settings existed gets the defaults.
    del saved["max_image_pixels"], saved["max_image_side"]
    (tmp_path / "custom" / "preprocessor_config.json").write_text(json.dumps(saved))
    old = EmoVLMKDImageProcessor.from_pretrained(tmp_path / "custom")
    assert (old.max_image_pixels, old.max_image_side) == (DEFAULT_MAX_IMAGE_PIXELS, 1024)


def test_handler_limits_from_arguments_and_environment(tiny_folder, monkeypatch):
    module = load_module(HANDLER, "reliability_handler_limits")
    monkeypatch.setenv("EMOVLM_KD_MAX_IMAGES_PER_REQUEST", "2")
    monkeypatch.setenv("EMOVLM_KD_MAX_IMAGE_PIXELS", "400")
    limited = module.EndpointHandler(str(tiny_folder), max_request_bytes=2 * len(SMALL_PNG))
    assert (limited.max_images_per_request, limited.image_processor.max_image_pixels) == (2, 400)
    with pytest.raises(ValueError, match=r"holds 3 images, more than the limit of 2.*_MAX_IMAGES_PER_REQUEST"):
        limited({"inputs": [SMALL_PNG] * 3})
    with pytest.raises(ValueError, match=r"24 x 20 = 480 pixels, more than the limit of 400"):
        limited({"inputs": SMALL_PNG})
    oversized = image_bytes(noise_image((16, 16)), "BMP")
    assert len(oversized) > len(SMALL_PNG)
    with pytest.raises(ValueError, match=r"bytes of image data, more than the limit of .*max_request_bytes"):
        limited({"inputs": [oversized, oversized]})
    monkeypatch.setenv("EMOVLM_KD_MAX_REQUEST_BYTES", "lots")
    with pytest.raises(ValueError, match=r"\$EMOVLM_KD_MAX_REQUEST_BYTES must be an integer"):
        module.EndpointHandler(str(tiny_folder))


def test_handler_default_caps(handler):
    assert (handler.max_images_per_request, handler.max_request_bytes) == (64, 32 * 2**20)
    with pytest.raises(ValueError, match=r"holds 65 images, more than the limit of 64"):
        handler({"inputs": [SMALL_PNG] * 65})
    too_much = "A" * (44 * 2**20)  # base64 text counts for the 33 MiB it encodes
    with pytest.raises(ValueError, match=r"bytes of image data, more than the limit of 33,554,432"):
        handler({"inputs": too_much})


def test_space_app_refuses_bombs_and_documents(tiny_folder, bomb_files, fake_gs, tmp_path, monkeypatch):
    app = load_module(SPACE_APP, "reliability_space_app")
    predictor = app.EmotionPredictor(str(tiny_folder))
    with pytest.raises(ValueError, match=PIXEL_LIMIT):
        predictor(str(bomb_files["png_13k"]))
    with pytest.raises(ValueError, match=rf"upload.jpg.*not a raster image \({ACCEPTED}\)"):
        predictor(str(_write(tmp_path, "upload.jpg", EPS)))
    assert not fake_gs.ran
    monkeypatch.setenv(app.MAX_IMAGE_PIXELS_ENV, "100")
    with pytest.raises(ValueError, match="more than the limit of 100"):
        app.EmotionPredictor(str(tiny_folder))(Image.new("RGB", (20, 20)))


# Lazy, chunked decoding in the handler: every header first, then one chunk of images at a time.
def _spy(handler, monkeypatch):
    prepared, forwards = [], []
    prepare, forward = handler.image_processor.prepare_image, handler.model.forward

    def spy_prepare(image, name=None):
        if name is not None:  # the handler's own call (the processor calls it again, unnamed, on the result)
            prepared.append(name)
        return prepare(image, name)

    def spy_forward(**inputs):
        forwards.append(len(prepared))
        return forward(**inputs)

    monkeypatch.setattr(handler.image_processor, "prepare_image", spy_prepare)
    monkeypatch.setattr(handler.model, "forward", spy_forward)
    monkeypatch.setattr(handler, "max_batch_size", 4)
    return prepared, forwards


def test_handler_decodes_chunk_by_chunk(handler, monkeypatch):
    prepared, forwards = _spy(handler, monkeypatch)
    images = [image_bytes(noise_image(seed=seed), "PNG") for seed in range(10)]
    results = handler({"inputs": images})
    assert forwards == [4, 8, 10] and len(results) == 10
    monkeypatch.setattr(handler, "max_batch_size", 16)
    assert results == handler({"inputs": images})


def test_handler_checks_every_header_before_the_first_forward(handler, bomb_files, monkeypatch):
    prepared, forwards = _spy(handler, monkeypatch)
    with pytest.raises(ValueError, match=rf"inputs\[9\].*{PIXEL_LIMIT}"):
        handler({"inputs": [SMALL_PNG] * 9 + [bomb_files["png_10k"].read_bytes()]})
    assert prepared == [] and forwards == []


def test_handler_names_a_broken_image_in_a_later_chunk(handler, monkeypatch):
    _, forwards = _spy(handler, monkeypatch)
    with pytest.raises(ValueError, match=r"Could not read image inputs\[5\]: .*truncated"):
        handler({"inputs": [SMALL_PNG] * 5 + [truncated("PNG")]})
    assert forwards == [4]


# Truncated and empty files.
@pytest.mark.parametrize("image_format", sorted(TRUNCATED_FORMATS))
def test_truncated_files(tiny, handler, tmp_path, image_format):
    raw = truncated(TRUNCATED_FORMATS[image_format])
    path = _write(tmp_path, f"cut.{image_format}", raw)
    with pytest.raises(ValueError, match=r"Could not read image .*cut\.") as error:
        tiny[1]([str(path)])
    assert str(path) in str(error.value)
    with pytest.raises(ValueError, match=r"Could not read image inputs\[0\]"):
        handler({"inputs": [base64.b64encode(raw).decode()]})


def test_truncated_and_empty_files_in_the_loader(tmp_path):
    root = make_imagefolder(tmp_path / "data", per_class=3, size=(16, 16))
    class_dir = root / "train" / "negative"
    broken = [_write(class_dir, f"cut.{fmt}", truncated(TRUNCATED_FORMATS[fmt])) for fmt in TRUNCATED_FORMATS]
    broken += [_write(class_dir, "empty.png", b""), _write(class_dir, "empty.jpg", b"")]
    reasons = dict(load_imagefolder(root).bad_images)
    assert set(reasons) == {str(path) for path in broken}
    assert reasons[str(class_dir / "empty.png")] == "the file is empty (0 bytes)"


@pytest.mark.parametrize(
    "source, message",
    [
        (b"", r"Could not read image <0 bytes>: the data is empty"),
        (b"\x89PNG\r\n\x1a\n", r"Could not read image <8 bytes>"),
        (io.BytesIO(b"GIF89a"), r"Could not read image <BytesIO>"),
    ],
    ids=["zero-bytes", "png-signature-only", "gif-signature-only"],
)
def test_empty_and_headless_data(tiny, source, message):
    with pytest.raises(ValueError, match=message):
        tiny[1]([source])


def test_folder_and_missing_paths(tiny, tmp_path):
    with pytest.raises(ValueError, match=rf"Could not read image '{tmp_path}'"):
        tiny[1]([str(tmp_path)])
    with pytest.raises(ValueError, match=r"Image file not found: .*missing\.png"):
        tiny[1]([str(tmp_path / "missing.png")])


# Arrays and tensors: validated, then prepared exactly like the same PIL image.
BAD_ARRAYS = {
    "nan": (np.full((8, 8, 3), np.nan, dtype=np.float32), r"NaN or infinite"),
    "inf": (np.full((8, 8), np.inf), r"NaN or infinite"),
    "empty_0x0": (np.zeros((0, 0), dtype=np.uint8), r"is empty \(shape \(0, 0\)\)"),
    "empty_rows": (np.zeros((0, 5, 3), dtype=np.uint8), r"is empty"),
    "one_dim": (np.zeros(16, dtype=np.uint8), r"shape \(16,\): expected \(H, W\)"),
    "four_dim": (np.zeros((1, 8, 8, 3), dtype=np.uint8), r"shape \(1, 8, 8, 3\): expected"),
    "two_channels": (np.zeros((8, 8, 2), dtype=np.uint8), r"expected 1, 3 or 4 channels"),
    "five_channels": (np.zeros((8, 8, 5), dtype=np.uint8), r"expected 1, 3 or 4 channels"),
    "negative": (np.full((8, 8, 3), -0.5), r"values in \[-0.5, -0.5\]"),
    "sixteen_bit": (np.full((8, 8), 1000, dtype=np.uint16), r"values in \[1000, 1000\]: expected \[0, 255\]"),
    "strings": (np.full((8, 8), "a"), r"dtype <U1"),
    "nan_tensor": (torch.full((3, 8, 8), float("nan")), r"Tensor of shape \(3, 8, 8\)> contains NaN"),
}


@pytest.mark.parametrize("name", sorted(BAD_ARRAYS))
def test_bad_arrays(tiny, name):
    array, message = BAD_ARRAYS[name]
    with pytest.raises(ValueError, match=rf"Image array .*{message}"):
        tiny[1]([array])


def test_bad_arrays_in_the_pipeline(classifier):
    with pytest.raises(ValueError, match="NaN or infinite"):
        classifier(np.full((8, 8, 3), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="is empty"):
        classifier(np.zeros((0, 0), dtype=np.uint8))


def _pixels(image_processor, image):
    return image_processor([image])["pixel_values"]


def test_arrays_match_the_same_pil_image(tiny, classifier):
    image_processor = tiny[1]
    strip = np.random.default_rng(0).integers(0, 256, (1, 5000, 3), dtype=np.uint8)  # 5000:1
    assert torch.equal(_pixels(image_processor, strip), _pixels(image_processor, Image.fromarray(strip)))
    assert classifier(strip) == classifier(Image.fromarray(strip))
    column = strip.transpose(1, 0, 2).copy()
    assert torch.equal(_pixels(image_processor, column), _pixels(image_processor, Image.fromarray(column)))
    hwc = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    expected = _pixels(image_processor, Image.fromarray(hwc))
    for same in (torch.from_numpy(hwc).permute(2, 0, 1), hwc.transpose(2, 0, 1), hwc / 255.0, hwc.astype(np.int64)):
        assert torch.equal(_pixels(image_processor, same), expected)
    gray = hwc[..., 0]
    assert torch.equal(_pixels(image_processor, gray[..., None]), _pixels(image_processor, Image.fromarray(gray)))
    mask = gray > 128
    assert torch.equal(_pixels(image_processor, mask), _pixels(image_processor, Image.fromarray(mask)))


# Sizes, aspect ratios, modes: prepared as the reference does, the same in training and inference.
@pytest.mark.parametrize(
    "size, expected", [((3000, 1500), (1024, 512)), ((1500, 3001), (511, 1024)), ((900, 20), (900, 20))]
)
def test_longest_side_is_capped_like_the_reference(size, expected):
    assert prepare_image(Image.new("RGB", size)).size == expected
    assert prepare_image(Image.new("RGB", size), max_image_side=None).size[0] == max(size[0], size[1] // 100)


def test_cap_comes_before_the_vlm_resizing(tiny):
    big = noise_image((3000, 1500))
    assert torch.equal(_pixels(tiny[1], big), _pixels(tiny[1], big.resize((1024, 512), Image.Resampling.LANCZOS)))
    assert limit_longest_side(big, 0) is big


@pytest.mark.parametrize("size", [(1, 300), (20000, 1), (7, 3000)], ids=["1x300", "20000x1", "7x3000"])
def test_extreme_aspect_ratios_from_files(tiny, tmp_path, size):
    path = _write(tmp_path, "strip.png", image_bytes(Image.new("L", size, 90), "PNG"))
    with torch.no_grad():
        assert torch.isfinite(tiny[0](**tiny[1]([str(path)])).logits).all()


@pytest.mark.parametrize(
    "image, image_format",
    [
        (Image.new("CMYK", (40, 30), (0, 200, 100, 0)), "JPEG"),
        (Image.fromarray(np.arange(1200, dtype=np.uint16).reshape(30, 40) * 50), "PNG"),
        (Image.new("LA", (40, 30), (90, 128)), "PNG"),
        (Image.new("RGB", (40, 30), (0, 9, 9)).quantize(4), "GIF"),
        (Image.new("1", (40, 30), 1), "TIFF"),
        (Image.new("RGBA", (40, 30), (0, 0, 255, 60)), "WEBP"),
        (Image.new("L", (40, 30), 7), "PPM"),
    ],
    ids=["cmyk-jpeg", "16bit-png", "la-png", "palette-gif", "1bit-tiff", "rgba-webp", "pgm"],
)
def test_odd_modes_from_files(tiny, tmp_path, image, image_format):
    path = _write(tmp_path, f"odd.{image_format.lower()}", image_bytes(image, image_format))
    prepared = prepare_image(str(path))
    assert prepared.mode == "RGB" and prepared.size == image.size
    with torch.no_grad():
        assert torch.isfinite(tiny[0](**tiny[1]([str(path)])).logits).all()


def test_exif_orientation_and_animated_gif(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rotated = _write(tmp_path, "rotated.jpg", image_bytes(Image.new("RGB", (60, 20)), "JPEG", exif=exif))
    assert prepare_image(str(rotated)).size == (20, 60)
    frames = [Image.new("P", (30, 20), index) for index in (1, 2, 3)]
    animated = tmp_path / "animated.gif"
    frames[0].save(animated, save_all=True, append_images=frames[1:])
    assert prepare_image(str(animated)).size == (30, 20)


def test_stage1_prepares_images_like_the_exported_processor(tiny, tmp_path):
    from emovlm_kd.instruction_tasks import InstructionEncoder

    model, image_processor, vlm_processor = tiny
    encoder = InstructionEncoder(vlm_processor, model.config.labels)
    big = _write(tmp_path, "big.png", image_bytes(noise_image((3000, 1500)), "PNG"))
    encoded = encoder.encode(str(big), "classification", 1)
    assert torch.equal(encoded["pixel_values"], _pixels(image_processor, str(big)))
    strip = _write(tmp_path, "strip.png", image_bytes(Image.new("RGB", (300, 1), (9, 9, 9)), "PNG"))  # 300:1
    assert encoder.encode(str(strip), "classification", 0)["image_grid_thw"].shape == (1, 3)
    with pytest.raises(ValueError, match=r"Could not read image .*cut\.jpg"):
        encoder.encode(str(_write(tmp_path, "cut.jpg", truncated("JPEG"))), "classification", 0)


# URLs in the pipeline: a default timeout, a size cap, the same decoder.
@pytest.fixture(scope="module")
def image_server():
    routes = {"/ok.png": SMALL_PNG, "/photo.jpg": EPS, "/big.png": SMALL_PNG * 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = routes.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_silent_server_times_out(classifier):
    with socket.socket() as silent:  # accepts connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/cat.jpg"
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=rf"{url}.*within 0.3 s.*timeout="):
            classifier(url, timeout=0.3)
        assert time.monotonic() - start < 3


def test_urls_use_a_default_timeout(classifier, image_server, monkeypatch):
    module = sys.modules[type(classifier).__module__]
    calls = []
    monkeypatch.setattr(module, "download", lambda url, timeout: calls.append(timeout) or SMALL_PNG)
    classifier(f"{image_server}/ok.png")
    assert calls == [module.DEFAULT_URL_TIMEOUT] and module.DEFAULT_URL_TIMEOUT == 10.0


def test_urls_are_decoded_like_files(classifier, image_server):
    assert classifier(f"{image_server}/ok.png") == classifier(Image.open(io.BytesIO(SMALL_PNG)))
    with pytest.raises(ValueError, match=r"downloaded from .*photo.jpg.*not a raster image"):
        classifier(f"{image_server}/photo.jpg")
    with pytest.raises(ValueError, match=r"Could not download image URL .*missing.png.*404"):
        classifier(f"{image_server}/missing.png")


def test_download_size_cap(image_server):
    from pipeline_emovlm_kd import download

    assert download(f"{image_server}/ok.png", timeout=5) == SMALL_PNG
    with pytest.raises(ValueError, match=r"big.png' serves more than 1,000 bytes"):
        download(f"{image_server}/big.png", timeout=5, max_bytes=1000)


# Symbolic links in the dataset.
def test_symlinked_folders_that_loop_into_the_dataset_are_not_classes(tmp_path):
    root = make_imagefolder(tmp_path / "data", per_class={"train": 4, "test": 2}, size=(16, 16))
    (root / "test" / "x").symlink_to("..")  # the case: would make "train" a class of test
    (root / "train" / "copy").symlink_to(root / "train" / "negative")
    (root / "train" / "up").symlink_to("../..")
    (root / "train" / "neutral" / "nested").symlink_to(root / "train" / "positive")
    data = load_imagefolder(root)
    assert data.class_names == ["negative", "neutral", "positive"]
    assert len(data.splits["test"]) == 6 and len(data.splits["train"]) + len(data.splits["val"]) == 12
    skipped = {"test/x", "train/copy", "train/up", "train/neutral/nested"}
    assert {str(root / path) for path in skipped} <= set(data.ignored_files)


def test_class_folders_linked_from_outside_are_followed(tmp_path):
    root = make_imagefolder(tmp_path / "data", per_class=3, size=(16, 16))
    elsewhere = make_imagefolder(tmp_path / "elsewhere", ["joy"], per_class=3, size=(16, 16))
    for split in ("train", "test"):
        (root / split / "joy").symlink_to(elsewhere / split / "joy")
    assert load_imagefolder(root).class_names == ["joy", "negative", "neutral", "positive"]


def test_broken_and_looping_file_links_are_reported(tmp_path):
    root = make_imagefolder(tmp_path / "data", per_class=3, size=(16, 16))
    class_dir = root / "train" / "neutral"
    (class_dir / "gone.jpg").symlink_to("nowhere.jpg")
    (class_dir / "a.png").symlink_to("b.png")
    (class_dir / "b.png").symlink_to("a.png")
    (root / "train" / "dangling").symlink_to("no-such-folder")
    data = load_imagefolder(root)
    reasons = dict(data.bad_images)
    assert "broken symbolic link" in reasons[str(class_dir / "gone.jpg")]
    assert "symbolic links" in reasons[str(class_dir / "a.png")] and str(class_dir / "b.png") in reasons
    assert str(root / "train" / "dangling") in data.ignored_files


# Peak memory, measured in child processes: bombs cost nothing, big requests one image at a time. The child reads
# its own high-water mark (VmHWM, reset to the current size first); its ru_maxrss would include the parent's memory,
# which Linux carries over fork and exec.
MEMORY_SCRIPT = textwrap.dedent(
    """
    import base64, json, re, sys
    sys.path.insert(0, sys.argv[1])

    def status_mb(key):
        return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) / 1024

    case, jobs, out = sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
    if case == "processor":
        from image_processing_emovlm_kd import prepare_image
        run = lambda paths: [prepare_image(path) for path in paths]  # noqa: E731
    elif case == "handler":
        from helpers_repo_template import HANDLER, load_module
        handler = load_module(HANDLER, "handler").EndpointHandler(sys.argv[5])
        encode = lambda path: base64.b64encode(open(path, "rb").read()).decode()  # noqa: E731
        run = lambda paths: handler({"inputs": [encode(path) for path in paths]})  # noqa: E731
        run([jobs[0][-1]])  # warm up
    else:
        from emovlm_kd.data import load_imagefolder
        run = lambda paths: load_imagefolder(paths[0])  # noqa: E731
    results = []
    for paths in jobs:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # the high-water mark restarts from the current size
        before = status_mb("VmRSS")
        try:
            run(paths)
            error = None
        except ValueError as raised:
            error = str(raised)
        results.append((status_mb("VmHWM") - before, error))
    json.dump(results, open(out, "w"))
    """
)


def _peak_memory(tmp_path, case, jobs, *extra) -> list[tuple[float, str | None]]:
    """For each job (a list of paths), the MB its run added to the child's peak memory, and its error if any."""
    script, out = tmp_path / "measure.py", tmp_path / f"{case}.json"
    script.write_text(MEMORY_SCRIPT)
    tests_dir = str(HANDLER.parent.parent.parent / "tests")
    jobs = json.dumps([[str(path) for path in paths] for paths in jobs])
    command = [sys.executable, str(script), tests_dir, case, jobs, str(out), *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [tuple(entry) for entry in json.loads(out.read_text())]


def _large_png(tmp_path, name, width, height, rgb=False):
    return _write(tmp_path, name, png_bomb(width, height, rgb))  # one colour, under the limit: a legitimate image


@pytest.mark.slow
def test_memory_bombs_in_the_processor(tmp_path, bomb_files):
    # The control last: an RGB image just under the limit (36M pixels, 144 MB decoded) costs a few hundred MB at most.
    large = _large_png(tmp_path, "large.png", 6000, 6000, rgb=True)
    *bombs, control = _peak_memory(tmp_path, "processor", [[path] for path in bomb_files.values()] + [[large]])
    for name, (extra_mb, error) in zip(bomb_files, bombs):
        assert "max_image_pixels" in error and extra_mb < 20, (name, extra_mb)
    assert control[1] is None and 100 < control[0] < 400, control


@pytest.mark.slow
def test_memory_handler_requests(tmp_path, bomb_files, tiny_folder):
    small = _write(tmp_path, "small.png", SMALL_PNG)
    large = [_large_png(tmp_path, f"large{index}.png", 6000, 6000) for index in range(4)]
    jobs = [[bomb_files["png_13k"]] * 4 + [small], [large[0], small], large + [small]]  # the first: the 6.6 GB
    (bombs_mb, error), (one_mb, one_error), (four_mb, four_error) = _peak_memory(
        tmp_path, "handler", jobs, str(tiny_folder)
    )
    assert "max_image_pixels" in error and bombs_mb < 20, bombs_mb
    assert one_error is None and four_error is None and one_mb > 100
    assert four_mb < min(one_mb + 60, 400), (one_mb, four_mb)  # decoded one at a time


@pytest.mark.slow
def test_memory_loader_check(tmp_path, bomb_files):
    root = make_imagefolder(tmp_path / "data", per_class=12, size=(32, 32))
    for path in bomb_files.values():
        (root / "train" / "neutral" / path.name).write_bytes(path.read_bytes())
    [(extra_mb, error)] = _peak_memory(tmp_path, "loader", [[root]])
    assert error is None and extra_mb < 100, extra_mb
