"""Discovery: recursive walk, extensions, COLMAP names, symbolic links, image lists."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sp_extract.errors import ConfigError
from sp_extract.extraction.discover import discover_images, is_utf8, printable, read_image_list

EXTENSIONS = ["jpg", "jpeg", "png", "ppm", "pgm", "bmp", "tif", "tiff", "webp"]


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_every_extension_in_any_case_recursively_sorted(tmp_path: Path) -> None:
    expected = []
    for i, ext in enumerate(EXTENSIONS):
        for variant in (ext, ext.upper(), ext.capitalize()):
            name = f"d{i % 3}/deeper/x{i}_{variant}.{variant}" if i % 2 else f"top{i}_{variant}.{variant}"
            touch(tmp_path / name)
            expected.append(name)
    for ignored in ("notes.txt", "a.jpg.bak", "jpg", "sub/readme.md", "x.gif", "y.h5"):
        touch(tmp_path / ignored)
    names = discover_images(tmp_path)
    assert names == sorted(expected)
    assert len(names) == 3 * len(EXTENSIONS)


def test_names_are_relative_with_forward_slashes(tmp_path: Path) -> None:
    touch(tmp_path / "a" / "b" / "c" / "img.png")
    touch(tmp_path / "z.jpg")
    assert discover_images(tmp_path) == ["a/b/c/img.png", "z.jpg"]
    # a relative root spelled with a trailing slash gives the same names
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path.parent)
        assert discover_images(Path(tmp_path.name + "/")) == ["a/b/c/img.png", "z.jpg"]
    finally:
        os.chdir(cwd)


def test_symlinked_directory_is_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    touch(outside / "o1.jpg")
    touch(outside / "nested" / "o2.png")
    root = tmp_path / "root"
    touch(root / "r.jpg")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "file_link.jpg").symlink_to(outside / "o1.jpg")
    assert discover_images(root) == ["file_link.jpg", "linked/nested/o2.png", "linked/o1.jpg", "r.jpg"]


def test_symlink_loop_is_visited_once(tmp_path: Path) -> None:
    root = tmp_path / "root"
    touch(root / "a.jpg")
    touch(root / "sub" / "b.jpg")
    (root / "sub" / "back").symlink_to(root, target_is_directory=True)  # loop to the top
    (root / "self").symlink_to(".", target_is_directory=True)  # loop to itself
    names = discover_images(root)
    assert names == ["a.jpg", "sub/b.jpg"]
    assert len(names) == len(set(names))


def test_dangling_symlink_is_ignored(tmp_path: Path) -> None:
    touch(tmp_path / "a.jpg")
    (tmp_path / "gone").symlink_to(tmp_path / "does-not-exist", target_is_directory=True)
    assert discover_images(tmp_path) == ["a.jpg"]


def test_not_a_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a directory"):
        discover_images(tmp_path / "missing")
    with pytest.raises(ConfigError, match="not a directory"):
        discover_images(touch(tmp_path / "file.jpg"))


def test_image_list_relative_names_blank_and_comment_lines(tmp_path: Path) -> None:
    root = tmp_path / "images"
    for name in ("a.jpg", "sub/b.png", "c.jpg"):
        touch(root / name)
    listing = tmp_path / "list.txt"
    listing.write_text("# chosen images\n\nsub/b.png\n  a.jpg  \n\n# c.jpg left out\nsub/b.png\n")
    assert read_image_list(listing, root) == ["sub/b.png", "a.jpg"]


def test_image_list_names_are_normalised_as_discovery_names_them(tmp_path: Path) -> None:
    root = tmp_path / "images"
    for name in ("a.jpg", "sub/b.png"):
        touch(root / name)
    listing = tmp_path / "list.txt"
    listing.write_text("./a.jpg\nsub//b.png\nsub\\\\b.png\na.jpg\n")
    assert read_image_list(listing, root) == ["a.jpg", "sub/b.png"]
    assert set(read_image_list(listing, root)) == set(discover_images(root))


def test_image_list_entry_that_is_a_folder(tmp_path: Path) -> None:
    root = tmp_path / "images"
    touch(root / "sub" / "b.png")
    listing = tmp_path / "list.txt"
    listing.write_text("sub/b.png\nsub\n")
    with pytest.raises(ConfigError, match=f"{listing}:2: 'sub' is a folder"):
        read_image_list(listing, root)


def test_image_list_missing_entry_names_the_line(tmp_path: Path) -> None:
    root = tmp_path / "images"
    touch(root / "a.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text("a.jpg\n# comment\nmissing.jpg\n")
    with pytest.raises(ConfigError) as error:
        read_image_list(listing, root)
    message = str(error.value)
    assert f"{listing}:3" in message and "missing.jpg" in message and "not found" in message
    assert "\n" not in message


@pytest.mark.parametrize("entry", ["/etc/passwd", "../images/a.jpg", "sub/../../x.jpg"])
def test_image_list_refuses_paths_outside_the_folder(tmp_path: Path, entry: str) -> None:
    root = tmp_path / "images"
    touch(root / "a.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text(f"a.jpg\n{entry}\n")
    with pytest.raises(ConfigError, match=f"{listing}:2: .*not a path relative to"):
        read_image_list(listing, root)


def test_image_list_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read image list"):
        read_image_list(tmp_path / "nope.txt", tmp_path)


def test_names_that_are_not_utf8_are_kept_for_reporting(tmp_path: Path) -> None:
    touch(tmp_path / os.fsdecode(b"caf\xe9.jpg"))  # Latin-1 bytes on disk
    touch(tmp_path / "café.jpg")
    names = discover_images(tmp_path)
    assert len(names) == 2
    assert [is_utf8(name) for name in names] == [True, False]  # "caf\udce9" sorts after "café"
    assert printable(names[1]) == "caf\\xe9.jpg" and printable(names[0]) == "café.jpg"
