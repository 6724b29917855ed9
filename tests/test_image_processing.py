"""LeoMiniImageProcessor: every input kind to canonical pixel_values, and clear refusals."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from transformers.image_utils import OPENAI_CLIP_MEAN as CLIP_MEAN, OPENAI_CLIP_STD as CLIP_STD
from leo_mini_hf.processor.image_processing_leo_mini import LeoMiniImageProcessor, to_rgb_image

SIZE = 32


@pytest.fixture(scope="module")
def processor():
    return LeoMiniImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=CLIP_MEAN, image_std=CLIP_STD)


def colour_image(mode="RGB", size=(20, 12)):
    rgb = Image.fromarray(np.random.RandomState(0).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    return rgb if mode == "RGB" else rgb.convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "CMYK", "1", "I", "F", "YCbCr"])
def test_any_pil_mode_gives_canonical_pixels(processor, mode):
    out = processor(colour_image(mode), return_tensors="pt")["pixel_values"]
    assert out.shape == (1, 3, SIZE, SIZE) and out.dtype == torch.float32
    again = processor(colour_image(mode), return_tensors="pt")["pixel_values"]
    assert torch.equal(out, again)


def test_sixteen_bit_images_are_scaled_to_eight_bits():
    grey = np.full((4, 4), 65535, dtype=np.uint16)
    image = Image.fromarray(grey)
    assert image.mode.startswith("I;16")
    assert np.asarray(to_rgb_image(image)).min() == 255
    assert np.asarray(to_rgb_image(grey // 2)).max() == 127


def test_transparency_is_composited_on_white():
    clear = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert np.asarray(to_rgb_image(clear)).min() == 255


def test_arrays_tensors_and_paths_agree(processor, tmp_path):
    rgb = colour_image()
    hwc = np.asarray(rgb)
    path = tmp_path / "image.png"
    rgb.save(path)
    expected = processor(rgb, return_tensors="pt")["pixel_values"]
    for variant in (hwc, np.moveaxis(hwc, -1, 0), hwc.astype(np.float32) / 255, torch.from_numpy(hwc.copy()).permute(2, 0, 1),
                    str(path), path):
        torch.testing.assert_close(processor(variant, return_tensors="pt")["pixel_values"], expected, atol=1e-6, rtol=0)


def test_padding_uses_the_mean_colour(processor):
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    pixels = processor(wide, return_tensors="pt")["pixel_values"][0]
    # the top rows are padding: the mean colour, which normalises to ~0
    assert pixels[:, 0, :].abs().max() < 0.02
    assert pixels[0, SIZE // 2, SIZE // 2] > 1.5  # red centre


def test_batch_of_mixed_inputs(processor):
    images = [colour_image(), np.zeros((10, 30, 3), np.uint8), torch.rand(3, 8, 8), Image.new("L", (5, 9))]
    assert processor(images, return_tensors="pt")["pixel_values"].shape == (4, 3, SIZE, SIZE)


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (np.zeros((0, 5, 3), np.uint8), ValueError, "zero size"),
        (Image.new("RGB", (0, 0)), ValueError, "zero size"),
        ({"not": "an image"}, TypeError, "Unsupported image type dict"),
        (np.zeros((5, 4, 6), np.uint8), ValueError, "1, 3 or 4 channels"),
        (np.full((5, 5, 3), 2.0, np.float32), ValueError, r"\[0, 1\]"),
        (np.zeros((5, 5, 3), np.int64), ValueError, "uint8, uint16, bool or float"),
        ("/no/such/image.png", ValueError, "not found"),
    ],
)
def test_bad_images_raise(processor, bad, error, match):
    with pytest.raises(error, match=match):
        processor(bad)


def test_corrupt_and_truncated_files_raise(processor, tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"definitely not a png" * 10)
    with pytest.raises(ValueError, match="corrupt, truncated or not an image"):
        processor(str(garbage))
    buffer = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ValueError, match="corrupt, truncated or not an image"):
        processor(str(truncated))


def test_pixel_limit_refuses_bombs(tmp_path):
    small_limit = LeoMiniImageProcessor(size={"height": SIZE, "width": SIZE}, max_image_pixels=100)
    with pytest.raises(ValueError, match="over the limit of 100"):
        small_limit(Image.new("RGB", (20, 20)))
    path = tmp_path / "big.png"
    Image.new("RGB", (20, 20)).save(path)
    with pytest.raises(ValueError, match="over the limit of 100"):
        small_limit(str(path))
    assert small_limit(Image.new("RGB", (10, 10)))["pixel_values"].shape == (1, 3, SIZE, SIZE)


# ---- images that used to be misread or crash ------------------------------------------------------------------------

def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored sideways with an EXIF orientation tag is seen upright, from a path or a PIL image."""
    stored = np.zeros((10, 20, 3), np.uint8)
    stored[:, :10] = (255, 0, 0)  # left half red as stored; orientation 6 shows it rotated 90° clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.png"
    Image.fromarray(stored).save(path, exif=exif)
    upright = np.asarray(Image.fromarray(stored).transpose(Image.Transpose.ROTATE_270))
    assert upright.shape == (20, 10, 3) and (upright[:10] == (255, 0, 0)).all()  # the top half is red
    for image in (str(path), Image.open(path)):
        np.testing.assert_array_equal(np.asarray(to_rgb_image(image)), upright)


def test_integer_and_float_modes_keep_their_brightness():
    sixteen_bit = Image.fromarray(np.full((4, 5), 30000, np.int32), mode="I")
    assert np.asarray(to_rgb_image(sixteen_bit)).max() == 30000 // 257  # not clipped to white
    eight_bit = Image.fromarray(np.full((4, 5), 100, np.int32), mode="I")
    assert np.asarray(to_rgb_image(eight_bit)).max() == 100
    unit_float = Image.fromarray(np.full((4, 5), 0.5, np.float32), mode="F")
    assert np.asarray(to_rgb_image(unit_float)).max() == 128  # not black
    byte_float = Image.fromarray(np.full((4, 5), 200.0, np.float32), mode="F")  # what PIL's convert("F") gives
    assert np.asarray(to_rgb_image(byte_float)).max() == 200
    with pytest.raises(ValueError, match="Mode 'F' images must hold finite values"):
        to_rgb_image(Image.fromarray(np.full((4, 5), -1.0, np.float32), mode="F"))
    with pytest.raises(ValueError, match=r"Mode 'I' image values must lie in \[0, 65535\]"):
        to_rgb_image(Image.fromarray(np.full((4, 5), 70000, np.int32), mode="I"))


def test_transparent_palette_alpha_pixel_goes_onto_white():
    palette = Image.new("P", (3, 3), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 1 is red
    with_alpha = palette.convert("PA")
    with_alpha.putalpha(0)  # fully transparent
    assert with_alpha.mode == "PA"
    assert np.asarray(to_rgb_image(with_alpha)).min() == 255  # the background, not the red it hides
    premultiplied = Image.new("La", (3, 3))
    assert to_rgb_image(premultiplied).mode == "RGB"


def test_ambiguous_channel_axis_is_refused():
    with pytest.raises(ValueError, match="ambiguous"):
        to_rgb_image(np.zeros((3, 5, 4), np.uint8))  # CHW of width 4, or HWC of height 3 with alpha?
    assert to_rgb_image(np.zeros((3, 5, 6), np.uint8)).size == (6, 5)  # CHW: the last axis cannot be channels
    assert to_rgb_image(np.zeros((5, 6, 3), np.uint8)).size == (6, 5)  # HWC


def test_meta_tensor_is_refused():
    with pytest.raises(ValueError, match="meta tensor"):
        to_rgb_image(torch.empty(3, 8, 8, device="meta"))


@pytest.mark.parametrize("options, match", [
    ({"image_std": [0.5, 0.0, 0.5]}, "image_std must be positive"),
    ({"image_mean": [0.5, 0.5]}, "image_mean must hold 3 finite numbers"),
    ({"max_image_pixels": 0}, "max_image_pixels must be a positive int"),
    ({"image_std": [0, 0, 0]}, "image_std must be positive"),
    ({"image_std": 1}, r"image_std must hold 3 finite numbers \(R, G, B\), got 1.0"),
    ({"size": {"height": 0, "width": 0}}, r"size must be .* n > 0 .* got height=0, width=0"),
    ({"size": {"height": 8, "width": 16}}, r"size must be .*one side.* got height=8, width=16"),
])
def test_bad_processing_options_are_refused(processor, options, match):
    with pytest.raises(ValueError, match=match):
        processor(colour_image(), **options)


def test_thin_image_is_refused_before_padding_to_a_square(processor):
    thin = Image.new("RGB", (30_000, 1))
    with pytest.raises(ValueError, match=r"padded to 30000x30000 .* over the limit"):
        processor(thin)


def test_numpy_statistics_are_accepted():
    processor = LeoMiniImageProcessor(size={"height": SIZE, "width": SIZE},
                                      image_mean=np.array(CLIP_MEAN, np.float32), image_std=np.array(CLIP_STD, np.float32))
    assert processor(colour_image(), return_tensors="pt")["pixel_values"].shape == (1, 3, SIZE, SIZE)


def test_integer_statistics_equal_float_ones():
    as_ints = LeoMiniImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=[0, 0, 0], image_std=[1, 1, 1])
    as_floats = LeoMiniImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=[0.0] * 3, image_std=[1.0] * 3)
    np.testing.assert_array_equal(as_ints(colour_image())["pixel_values"], as_floats(colour_image())["pixel_values"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_image_tensors_are_read_like_float32_ones(processor, dtype):
    """A bfloat16 tensor image (numpy has no bfloat16) gives the pixels of its float32 values."""
    image = torch.linspace(0, 1, 3 * 8 * 8).reshape(3, 8, 8).to(dtype)
    np.testing.assert_array_equal(processor(image)["pixel_values"], processor(image.float())["pixel_values"])


def test_chat_images_by_url_or_base64_are_read_like_the_file(tmp_path, tiny_processor):
    """As transformers' VLMs accept them in chat messages: an http(s) URL (fetched with `load_image`), a
    `data:image/...;base64,` URL or bare base64 — each gives the pixels of the same image read from its file."""
    import base64
    import functools
    import http.server
    import threading

    Image.fromarray(np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)).save(tmp_path / "pic.png")
    encoded = base64.b64encode((tmp_path / "pic.png").read_bytes()).decode()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        sources = [{"path": str(tmp_path / "pic.png")}, {"url": f"http://127.0.0.1:{server.server_port}/pic.png"},
                   {"url": f"data:image/png;base64,{encoded}"}, {"base64": encoded}, {"image": encoded}]
        pixels = []
        for source in sources:
            chat = [{"role": "user", "content": [{"type": "image", **source}, {"type": "text", "text": "What?"}]}]
            pixels.append(tiny_processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                             return_dict=True, return_tensors="pt")["pixel_values"])
    finally:
        server.shutdown()
    for got in pixels[1:]:
        torch.testing.assert_close(got, pixels[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"Image file not found: 'missing.png' \(nor an http\(s\) URL or base64"):
        to_rgb_image("missing.png")
    with pytest.raises(ValueError, match="Image file not found: 'abcd'"):  # valid base64 that is no image
        to_rgb_image("abcd")
