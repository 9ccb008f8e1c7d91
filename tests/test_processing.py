"""The image processor: any image mode and size in, every model input out; bad files get errors naming them."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from image_processing_emovlm_kd import to_rgb


def _gradient(mode, size=(40, 30)):
    if mode in ("I;16", "I"):
        array = np.linspace(0, 60000, size[0] * size[1]).reshape(size[1], size[0])
        return Image.fromarray(array.astype(np.uint16 if mode == "I;16" else np.int32))
    if mode == "F":
        return Image.fromarray(np.linspace(-1, 1, size[0] * size[1]).reshape(size[1], size[0]).astype(np.float32))
    return Image.linear_gradient("L").resize(size).convert(mode)


ODD_MODES = ["RGB", "L", "1", "P", "RGBA", "LA", "CMYK", "YCbCr", "I;16", "I", "F"]


@pytest.mark.parametrize("mode", ODD_MODES)
def test_every_mode_gives_valid_inputs(tiny, mode):
    model, image_processor, _ = tiny
    inputs = image_processor([_gradient(mode)])
    assert inputs["pixel_values"].ndim == 2 and inputs["image_grid_thw"].shape == (1, 3)
    num_tokens = int(inputs["image_grid_thw"].prod() // image_processor.merge_size**2)
    assert int((inputs["input_ids"] == image_processor.image_token_id).sum()) == num_tokens
    assert torch.equal(inputs["mm_token_type_ids"], (inputs["input_ids"] == image_processor.image_token_id).long())
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_high_bit_depth_is_rescaled_not_clipped():
    rgb = np.asarray(to_rgb(_gradient("I;16")))
    assert rgb.min() == 0 and rgb.max() == 255 and len(np.unique(rgb)) > 100


def test_transparency_is_composited_on_white():
    image = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    assert to_rgb(image).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("size", [(1, 1), (1, 500), (500, 2), (3000, 2000)])
def test_any_size(tiny, size):
    model, image_processor, _ = tiny
    inputs = image_processor(Image.new("RGB", size, (10, 200, 30)))
    with torch.no_grad():
        assert model(**inputs).logits.shape == (1, 3)


def test_batch_is_left_padded_and_matches_single_images(tiny):
    model, image_processor, _ = tiny
    images = [Image.new("RGB", (300, 60), (250, 0, 0)), Image.new("RGB", (50, 50), (0, 0, 250))]
    batch = image_processor(images)
    assert batch["attention_mask"][:, -1].all() and not batch["attention_mask"].all()
    with torch.no_grad():
        batched = model(**batch).logits
        single = torch.cat([model(**image_processor([image])).logits for image in images])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)


def test_paths_and_arrays_are_accepted(tiny, tmp_path):
    _, image_processor, _ = tiny
    path = tmp_path / "image.png"
    Image.new("P", (20, 20)).save(path)
    from_path = image_processor(str(path))
    from_array = image_processor(np.zeros((20, 20, 3), dtype=np.uint8))
    assert torch.equal(from_path["pixel_values"], from_array["pixel_values"])


def _truncated_jpeg(path):
    buffer = io.BytesIO()
    Image.linear_gradient("L").convert("RGB").save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


@pytest.mark.parametrize(
    "name, write, reason",
    [
        ("notes.jpg", lambda p: p.write_text("this is not an image"), "cannot identify"),
        ("empty.png", lambda p: p.write_bytes(b""), "empty"),
        ("cut.jpg", _truncated_jpeg, "truncated"),
        ("missing.png", lambda p: None, "not found"),
    ],
)
def test_bad_files_get_an_error_naming_them(tiny, tmp_path, name, write, reason):
    _, image_processor, _ = tiny
    path = tmp_path / name
    write(path)
    with pytest.raises(ValueError, match=reason) as error:
        image_processor([str(path)])
    assert str(path) in str(error.value)


def test_lazily_opened_truncated_image_is_named(tiny, tmp_path):
    _, image_processor, _ = tiny
    path = tmp_path / "cut.jpg"
    _truncated_jpeg(path)
    with pytest.raises(ValueError) as error:
        image_processor([Image.open(path)])
    assert str(path) in str(error.value)


def test_unsupported_input_type(tiny):
    with pytest.raises(TypeError, match="Unsupported image input"):
        tiny[1]([123])
