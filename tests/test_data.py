"""Tests of `ldm_cli.faces` and `ldm_cli.data`: sources, preprocessing, cache, split."""

from __future__ import annotations

import io
import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_cli.config import DataConfig
from ldm_cli.data import decoding
from ldm_cli.data.cache import ImageSet, cache_dir_for, split_indices
from ldm_cli.data.prepare import load_images
from ldm_cli.data.decoding import load_image_file, preprocess
from ldm_cli.data.faces import draw_face, draw_faces, face_rng, render_face, sample_face
from ldm_cli.data.pixels import random_flip, to_float, to_uint8
from ldm_cli.errors import DataError

# A few distinct, flat colours: easy to recognise after resizing and JPEG.
COLORS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 210, 40), (200, 40, 200), (40, 200, 200)]
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}


def solid(color: tuple[int, int, int], size: tuple[int, int] = (40, 40)) -> Image.Image:
    return Image.new("RGB", size, color)


def mean_color(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """Mean colour of a (3, H, W) tensor or (H, W, 3) array."""
    array = np.asarray(image, dtype=np.float64)
    return array.reshape(3, -1).mean(1) if array.shape[0] == 3 else array.reshape(-1, 3).mean(0)


def config(source: str | Path, tmp_path: Path, **overrides) -> DataConfig:
    """A DataConfig whose cache lives under tmp_path, never in the real home."""
    values = {"source": str(source), "resolution": 16, "cache_dir": str(tmp_path / "cache"), **overrides}
    return DataConfig(**values)


def all_images(images: ImageSet) -> torch.Tensor:
    return torch.cat([images.train, images.holdout])


@pytest.fixture(autouse=True)
def no_real_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever a test forgets, the cache never lands in the real home folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LDM_CACHE_DIR", raising=False)


# --------------------------------------------------------------------------- builtin faces


@pytest.mark.parametrize("resolution", [32, 64])
def test_faces_have_the_right_shape_and_type(resolution: int) -> None:
    faces = draw_faces(6, resolution, seed=1)
    assert faces.shape == (6, resolution, resolution, 3) and faces.dtype == np.uint8
    image = draw_face(0, resolution, seed=1)
    assert image.mode == "RGB" and image.size == (resolution, resolution)


def test_faces_can_be_drawn_at_any_resolution() -> None:
    assert draw_face(3, 20).size == (20, 20)
    assert draw_face(3, 300).size == (300, 300)


def test_faces_are_deterministic_by_seed_and_index() -> None:
    first = draw_faces(8, 32, seed=3)
    np.testing.assert_array_equal(first, draw_faces(8, 32, seed=3))
    # face i depends only on (seed, i): drawn alone it is the same as in a batch
    np.testing.assert_array_equal(np.asarray(draw_face(5, 32, seed=3)), first[5])
    other = draw_faces(8, 32, seed=4)
    assert all(not np.array_equal(a, b) for a, b in zip(first, other))


def test_faces_differ_pairwise_and_cover_every_hair_style_and_mouth() -> None:
    faces = draw_faces(64, 32).astype(np.float64)
    assert faces.std(axis=0).mean() > 40  # pixel spread across images
    flat = faces.reshape(64, -1)
    distances = np.abs(flat[:, None] - flat[None]).mean(-1)
    assert distances[~np.eye(64, dtype=bool)].min() > 5  # no two faces alike
    params = [sample_face(face_rng(i, 0)) for i in range(300)]
    assert {p.hair_style for p in params} == {"bald", "short", "long", "bun", "curly", "bob"}
    assert {p.mouth for p in params} == {"smile", "neutral", "open", "grin"}
    assert len({p.skin for p in params}) > 100
    assert {p.gradient_angle is None for p in params} == {True, False}


def test_a_face_is_drawn_where_its_parameters_say() -> None:
    """The cheek (left of the mouth, below the eyes) is the face's skin colour, the corner is background."""
    for i in range(10):
        p = sample_face(face_rng(i, 0))
        image = np.asarray(render_face(p, 128)).astype(int)
        (cx, cy), (rx, ry) = p.center, p.radii
        cheek = image[round((cy + 0.42 * ry) * 128), round((cx + 0.62 * rx) * 128)]
        assert np.abs(cheek - p.skin).max() <= 12, (i, cheek, p.skin)
        assert np.abs(image[1, 1] - p.background[0]).max() <= 40 or p.gradient_angle is not None


def test_face_index_must_not_be_negative() -> None:
    with pytest.raises(ValueError):
        draw_face(-1, 32)


# --------------------------------------------------------------------------- preprocessing


def test_rgba_is_composited_on_white() -> None:
    transparent = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    opaque = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    half = Image.new("RGBA", (8, 8), (255, 0, 0, 128))
    assert (preprocess(transparent, 8) == 255).all()
    assert (preprocess(opaque, 8) == [255, 0, 0]).all()
    np.testing.assert_allclose(mean_color(preprocess(half, 8)), [255, 127, 127], atol=2)


def test_la_is_composited_on_white() -> None:
    assert (preprocess(Image.new("LA", (8, 8), (0, 0)), 8) == 255).all()
    assert (preprocess(Image.new("LA", (8, 8), (40, 255)), 8) == 40).all()


def test_grayscale_and_bilevel_become_gray_rgb() -> None:
    assert (preprocess(Image.new("L", (8, 8), 100), 8) == 100).all()
    assert (preprocess(Image.new("1", (8, 8), 1), 8) == 255).all()


def test_palette_colors_are_kept() -> None:
    image = Image.new("P", (16, 16), 0)
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 - 3) * 3)
    image.paste(1, (0, 8, 16, 16))  # bottom half green
    out = preprocess(image, 16)
    assert (out[:6] == [255, 0, 0]).all() and (out[-6:] == [0, 255, 0]).all()


def test_palette_transparency_becomes_white() -> None:
    image = Image.new("P", (8, 8), 1)
    image.putpalette([255, 255, 255, 200, 0, 0] + [0] * 254 * 3)
    image.info["transparency"] = 1
    assert (preprocess(image, 8) == 255).all()
    image.info["transparency"] = 0
    assert (preprocess(image, 8) == [200, 0, 0]).all()


def test_cmyk_is_converted_to_the_matching_rgb() -> None:
    assert (preprocess(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), 8) == 255).all()
    assert (preprocess(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), 8) == [255, 0, 0]).all()


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16_bit_is_scaled_not_clipped(mode: str) -> None:
    values = np.array([[0, 32768, 65535, 257 * 10]], dtype=np.int64).repeat(4, axis=0).repeat(4, axis=1)
    dtype = {"I;16": "<u2", "I;16B": ">u2", "I": "<i4"}[mode]
    image = Image.frombytes(mode, (16, 4), values.astype(dtype).tobytes())
    assert image.mode == mode
    out = np.asarray(decoding.to_rgb(image))  # no resizing, so the values stay exact
    assert out.shape == (4, 16, 3)
    assert list(out[0, ::4, 0]) == [0, 128, 255, 10]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_16_bit_png_file_is_scaled_to_8_bit(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(path)
    assert (load_image_file(path, 8) == 255).all()
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(path)
    assert (load_image_file(path, 8) == 128).all()


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (32, 32), (255, 0, 0))
    image.paste((0, 0, 255), (0, 16, 32, 32))  # stored: red top, blue bottom
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": the top goes to the right
    path = tmp_path / "rotated.jpg"
    image.save(path, quality=95, exif=exif)
    out = load_image_file(path, 32)
    np.testing.assert_allclose(mean_color(out[:, :, 20:]), [255, 0, 0], atol=20)
    np.testing.assert_allclose(mean_color(out[:, :, :12]), [0, 0, 255], atol=20)


@pytest.mark.parametrize("size", [(128, 64), (64, 128)])
def test_non_square_images_are_center_cropped(size: tuple[int, int]) -> None:
    image = Image.new("RGB", size, (0, 0, 255))
    w, h = size
    if w > h:
        image.paste((255, 0, 0), (20, 0, w - 20, h))  # blue only in the outer 20 columns
    else:
        image.paste((255, 0, 0), (0, 20, w, h - 20))
    out = preprocess(image, 32)
    assert out.shape == (32, 32, 3)
    assert (out == [255, 0, 0]).all()


def test_small_image_is_upscaled_keeping_its_colour() -> None:
    out = preprocess(solid((10, 20, 30), (5, 7)), 16)
    assert out.shape == (16, 16, 3) and (np.abs(out.astype(int) - [10, 20, 30]) <= 1).all()


def test_load_image_file_gives_uint8_chw_and_names_missing_or_junk_files(tmp_path: Path) -> None:
    path = tmp_path / "one.png"
    solid(COLORS[0], (30, 50)).save(path)
    out = load_image_file(path, 16)
    assert out.shape == (3, 16, 16) and out.dtype == torch.uint8
    assert (out[:, 8, 8] == torch.tensor(COLORS[0], dtype=torch.uint8)).all()
    with pytest.raises(DataError, match="missing.png"):
        load_image_file(tmp_path / "missing.png", 16)
    (tmp_path / "junk.png").write_text("not an image")
    with pytest.raises(DataError, match=r"junk\.png.*not an image"):
        load_image_file(tmp_path / "junk.png", 16)


# --------------------------------------------------------------------------- sources


def make_nested_folder(root: Path) -> dict[str, tuple[int, int, int]]:
    """Images in nested folders with mixed extensions and case, plus files to ignore."""
    files = {
        "a.png": COLORS[0],
        "sub/b.PNG": COLORS[1],
        "sub/deeper/c.JpG": COLORS[2],
        "d.jpeg": COLORS[3],
        "sub/e.webp": COLORS[4],
        "f.BMP": COLORS[5],
    }
    for name, color in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt = FORMATS[path.suffix.lower()]
        solid(color, (40, 30)).save(path, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    (root / "README.txt").write_text("not an image, and not an image name: ignored")
    (root / "sub" / ".hidden.png").write_text("hidden files are ignored")
    return files


def assert_colors(images: ImageSet, expected: list[tuple[int, int, int]]) -> None:
    """The set holds one image of each expected flat colour (JPEG may shift it a little)."""
    found = [mean_color(img) for img in all_images(images)]
    assert len(found) == len(expected)
    for want in expected:
        distances = [np.abs(got - want).max() for got in found]
        assert min(distances) <= 8, (want, found)
        found.pop(int(np.argmin(distances)))


def test_folder_source_is_recursive_with_mixed_extensions(tmp_path: Path) -> None:
    files = make_nested_folder(tmp_path / "imgs")
    images = load_images(config(tmp_path / "imgs", tmp_path, holdout_fraction=0.2))
    assert images.skipped == 0
    assert len(images) + len(images.holdout) == len(files)
    assert images.train.shape[1:] == (3, 16, 16) and images.train.dtype == torch.uint8
    assert images.holdout.shape == (1, 3, 16, 16)
    assert images.source == str(tmp_path / "imgs")
    assert_colors(images, list(files.values()))


def test_zip_source_reads_nested_images_and_ignores_folders_text_and_macos_forks(tmp_path: Path) -> None:
    archive = tmp_path / "imgs.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i, (name, fmt) in enumerate([("x/one.png", "PNG"), ("x/y/two.JPG", "JPEG"), ("three.bmp", "BMP")]):
            buffer = io.BytesIO()
            solid(COLORS[i]).save(buffer, format=fmt)
            zf.writestr(name, buffer.getvalue())
        zf.writestr("x/", "")
        zf.writestr("notes.txt", "ignored")
        zf.writestr("__MACOSX/x/._one.png", "macOS resource fork: ignored")
    images = load_images(config(archive, tmp_path, holdout_fraction=0.0))
    assert images.skipped == 0 and len(images) == 3 and len(images.holdout) == 0
    assert_colors(images, COLORS[:3])


def test_builtin_faces_source_gives_the_seeded_faces_split_by_split_indices(tmp_path: Path) -> None:
    cfg = config("builtin:faces", tmp_path, resolution=32, builtin_size=40, seed=7, holdout_fraction=0.1)
    images = load_images(cfg)
    assert len(images) == 36 and len(images.holdout) == 4 and images.skipped == 0
    faces = torch.from_numpy(draw_faces(40, 32, seed=7)).permute(0, 3, 1, 2)
    train, holdout = split_indices(40, 0.1, 7)
    assert torch.equal(images.train, faces[train]) and torch.equal(images.holdout, faces[holdout])


def test_gif_and_tiff_files_are_read_from_folders_and_zips(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    frames = [solid(COLORS[0]), solid(COLORS[1])]  # an animation: its first frame is the image
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    solid(COLORS[2]).save(folder / "b.tif")
    solid(COLORS[3]).save(folder / "c.TIFF")
    assert_colors(load_images(config(folder, tmp_path, holdout_fraction=0.0)), [COLORS[0], COLORS[2], COLORS[3]])
    archive = tmp_path / "imgs.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in folder.iterdir():
            zf.write(path, path.name)
    assert_colors(load_images(config(archive, tmp_path, holdout_fraction=0.0)), [COLORS[0], COLORS[2], COLORS[3]])


def test_files_ignored_for_their_extension_are_counted_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    solid(COLORS[0]).save(folder / "good.png")
    for name in ["notes.txt", "meta.json", "sub/more.json", "LICENSE"]:
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text("not an image")
    (folder / ".DS_Store").write_text("hidden: not counted")
    caplog.set_level(logging.WARNING, logger="ldm")
    load_images(config(folder, tmp_path))
    (message,) = [r.getMessage() for r in caplog.records]
    assert message == (
        f"data source '{folder}': ignored 4 files that are not images by their extension (.json, .txt, no extension)"
    )
    for name in ["meta.json", "sub/more.json", "LICENSE"]:
        (folder / name).unlink()
    caplog.clear()
    load_images(config(folder, tmp_path))
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.endswith(": ignored 1 file that is not an image by its extension (.txt)")


def test_a_folder_of_unknown_formats_names_them_in_its_error(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.heic").write_bytes(b"x")
    (folder / "b.HEIC").write_bytes(b"x")
    with pytest.raises(DataError, match=r"no usable image \(found no \.png.*; ignored 2 files that are not images by their extension \(\.heic\)\)$"):
        load_images(config(folder, tmp_path))


def bad_files(folder: Path) -> None:
    (folder / "notes.png").write_text("this is text, not a PNG")
    buffer = io.BytesIO()
    solid(COLORS[0], (64, 64)).save(buffer, format="PNG")
    (folder / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def test_undecodable_files_are_skipped_counted_and_warned_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        solid(COLORS[i]).save(folder / f"good{i}.png")
    bad_files(folder)
    caplog.set_level(logging.WARNING, logger="ldm")
    images = load_images(config(folder, tmp_path, holdout_fraction=0.0))
    assert images.skipped == 2 and len(images) == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "skipped 2 of 5" in message and "notes.png" in message and "truncated.png" in message
    assert "\n" not in message
    # a cache hit still knows, and says so once
    caplog.clear()
    again = load_images(config(folder, tmp_path, holdout_fraction=0.0))
    assert again.skipped == 2
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_the_warning_names_at_most_three_examples(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    solid(COLORS[0]).save(folder / "good.png")
    for i in range(5):
        (folder / f"bad{i}.jpg").write_bytes(b"\xff\xd8 nope")
    caplog.set_level(logging.WARNING, logger="ldm")
    assert load_images(config(folder, tmp_path)).skipped == 5
    (message,) = [r.getMessage() for r in caplog.records]
    assert "skipped 5 of 6" in message
    assert sum(f"bad{i}.jpg" in message for i in range(5)) == 3


def test_decompression_bombs_are_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    solid(COLORS[0], (40, 40)).save(folder / "small.png")
    solid(COLORS[1], (50, 50)).save(folder / "warns.png")  # 2500 px: over the limit (a warning in PIL)
    solid(COLORS[2], (80, 80)).save(folder / "errors.png")  # 6400 px: over twice the limit (an error in PIL)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    images = load_images(config(folder, tmp_path, holdout_fraction=0.0))
    assert images.skipped == 2 and len(images) == 1
    assert_colors(images, [COLORS[0]])


def test_decompression_bomb_warning_alone_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Even without the explicit pixel check, PIL's warning must not let a bomb through."""
    buffer = io.BytesIO()
    solid(COLORS[0], (50, 50)).save(buffer, format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    with decoding.bombs_are_errors(), pytest.raises(Image.DecompressionBombWarning):
        Image.open(io.BytesIO(buffer.getvalue()))


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda root: root.mkdir(), r"no usable image \(found no \.png"),
        (lambda root: (root.mkdir(), bad_files(root)), r"no usable image \(found 2 files, 2 could not be"),
        (lambda root: None, r"no such file or folder \(expected an image folder, a \.zip of images, or builtin:"),
        (lambda root: root.write_text("plain file"), r"not a folder or a \.zip archive"),
    ],
    ids=["empty folder", "only junk", "missing path", "plain file"],
)
def test_bad_sources_raise_one_line_data_errors(tmp_path: Path, make, expected: str) -> None:
    root = tmp_path / "source"
    make(root)
    with pytest.raises(DataError, match=expected) as info:
        load_images(config(root, tmp_path))
    message = str(info.value)
    assert str(root) in message and "\n" not in message
    assert info.value.exit_code == 2


def test_unknown_builtin_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"'builtin:cats'.*known: builtin:faces"):
        load_images(config("builtin:cats", tmp_path))


def test_broken_zip_is_a_data_error(tmp_path: Path) -> None:
    archive = tmp_path / "broken.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.png", b"x" * 100)
    archive.write_bytes(archive.read_bytes()[:-10])  # damage the central directory
    with pytest.raises(DataError, match="broken.zip"):
        load_images(config(archive, tmp_path))


# --------------------------------------------------------------------------- cache


def test_cache_is_reused_without_decoding(tmp_path: Path, decode_counter: list[int]) -> None:
    folder = tmp_path / "imgs"
    files = make_nested_folder(folder)
    cfg = config(folder, tmp_path)
    first = load_images(cfg)
    assert decode_counter[0] == len(files)
    second = load_images(cfg)
    assert decode_counter[0] == len(files)  # nothing decoded again
    assert torch.equal(first.train, second.train) and torch.equal(first.holdout, second.holdout)
    assert list((tmp_path / "cache").glob("*.npy")), "the cache lives in cfg.cache_dir"
    assert not (tmp_path / "home").exists(), "nothing written to the home folder"


def test_cache_is_invalidated_when_a_file_is_added_or_changed(
    tmp_path: Path, decode_counter: list[int]
) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        solid(COLORS[i]).save(folder / f"{i}.png")
    cfg = config(folder, tmp_path, holdout_fraction=0.0)
    load_images(cfg)
    assert decode_counter[0] == 3

    solid(COLORS[3]).save(folder / "3.png")
    added = load_images(cfg)
    assert decode_counter[0] == 3 + 4 and len(added) == 4

    solid(COLORS[4]).save(folder / "0.png")
    os.utime(folder / "0.png", ns=(1, 1))  # a different mtime even on coarse clocks
    changed = load_images(cfg)
    assert decode_counter[0] == 7 + 4
    assert_colors(changed, COLORS[1:5])


def test_resolution_is_part_of_the_cache_key(tmp_path: Path, decode_counter: list[int]) -> None:
    folder = tmp_path / "imgs"
    make_nested_folder(folder)
    assert load_images(config(folder, tmp_path, resolution=16)).train.shape[-1] == 16
    assert load_images(config(folder, tmp_path, resolution=24)).train.shape[-1] == 24
    assert decode_counter[0] == 12


def test_changing_the_split_reuses_the_cache(tmp_path: Path, decode_counter: list[int]) -> None:
    folder = tmp_path / "imgs"
    files = make_nested_folder(folder)
    before = load_images(config(folder, tmp_path, holdout_fraction=0.2))
    after = load_images(config(folder, tmp_path, holdout_fraction=0.5, seed=3))
    assert decode_counter[0] == len(files)
    assert len(after.holdout) == 3 and len(after) == 3

    def rows(images: ImageSet) -> list[bytes]:
        return sorted(img.numpy().tobytes() for img in all_images(images))

    assert rows(before) == rows(after)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1, "the old layout is removed"


def test_a_damaged_cache_is_rebuilt(tmp_path: Path, decode_counter: list[int]) -> None:
    folder = tmp_path / "imgs"
    files = make_nested_folder(folder)
    cfg = config(folder, tmp_path)
    first = load_images(cfg).train.clone()
    (npy,) = (tmp_path / "cache").glob("*.npy")
    npy.unlink()  # a new file, not a truncated one: the first set still maps the old one
    npy.write_bytes(b"garbage")
    second = load_images(cfg)
    assert decode_counter[0] == 2 * len(files)
    assert torch.equal(first, second.train)


def test_cache_dir_is_config_then_ldm_cache_dir_then_home_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cache_dir_for(DataConfig(cache_dir=str(tmp_path / "c"))) == tmp_path / "c"
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "env"))
    assert cache_dir_for(DataConfig()) == tmp_path / "env"
    monkeypatch.delenv("LDM_CACHE_DIR")
    assert cache_dir_for(DataConfig()) == tmp_path / "home" / ".cache" / "ldm"


def test_environment_cache_dir_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "env"))
    load_images(DataConfig(resolution=8, builtin_size=4))
    assert list((tmp_path / "env").glob("faces-8px-*.npy"))


def test_images_are_read_only_views_of_the_memory_map(tmp_path: Path) -> None:
    images = load_images(config("builtin:faces", tmp_path, builtin_size=10, holdout_fraction=0.2))
    base = images.train.untyped_storage().data_ptr()
    assert images.holdout.untyped_storage().data_ptr() == base  # one buffer: both are slices of it
    assert images.train.is_contiguous() and images.train.shape == (8, 3, 16, 16)


# --------------------------------------------------------------------------- split


def test_split_is_deterministic_disjoint_and_complete() -> None:
    train, holdout = split_indices(100, 0.05, seed=1)
    again_train, again_holdout = split_indices(100, 0.05, seed=1)
    assert np.array_equal(train, again_train) and np.array_equal(holdout, again_holdout)
    assert len(holdout) == 5 and len(train) == 95
    assert not set(train) & set(holdout)
    assert sorted([*train, *holdout]) == list(range(100))
    assert list(train) == sorted(train) and list(holdout) == sorted(holdout)
    assert not np.array_equal(holdout, split_indices(100, 0.05, seed=2)[1])


@pytest.mark.parametrize(
    ("n", "fraction", "k"),
    [(100, 0.05, 5), (10, 0.01, 1), (2, 0.01, 1), (1, 0.5, 0), (50, 0.0, 0), (3, 0.9, 2)],
)
def test_holdout_takes_at_least_one_image_when_asked_but_never_all(n: int, fraction: float, k: int) -> None:
    assert len(split_indices(n, fraction, 0)[1]) == k


def test_train_and_holdout_never_overlap(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(20):
        solid((i * 12, 255 - i * 12, 77)).save(folder / f"{i:02d}.png")
    cfg = config(folder, tmp_path, holdout_fraction=0.25, seed=5)
    images = load_images(cfg)
    train = {img.numpy().tobytes() for img in images.train}
    holdout = {img.numpy().tobytes() for img in images.holdout}
    assert len(train) == 15 and len(holdout) == 5 and not train & holdout
    again = load_images(cfg)
    assert torch.equal(again.holdout, images.holdout)
    other = load_images(config(folder, tmp_path, holdout_fraction=0.25, seed=6))
    assert not torch.equal(other.holdout, images.holdout)


# --------------------------------------------------------------------------- tensors


def test_to_uint8_inverts_to_float_and_clamps_out_of_range_and_nan() -> None:
    every = torch.arange(256, dtype=torch.uint8)
    floats = to_float(every)
    assert floats.dtype == torch.float32 and floats.min() == -1.0 and floats.max() == 1.0
    assert torch.equal(to_uint8(floats), every)
    clamped = to_uint8(torch.tensor([-3.0, 2.0, 0.0, float("nan")]))
    assert clamped.tolist() == [0, 255, 128, 128]


def test_random_flip_flips_about_half_exactly_mirrored() -> None:
    images = torch.arange(1000 * 3 * 2 * 4, dtype=torch.int64).reshape(1000, 3, 2, 4).to(torch.uint8)
    out = random_flip(images, torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, images)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, images)])
    assert (flipped ^ kept).all()  # each image is either unchanged or its exact mirror
    assert 430 < int(flipped.sum()) < 570
    assert torch.equal(out, random_flip(images, torch.Generator().manual_seed(0)))
    assert random_flip(images).shape == images.shape
