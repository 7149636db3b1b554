"""``sp-extract export-model``, ``sfm --export`` and the report page (issue 26): the shared
photos' model grown by ``sfm --export`` (8 photos, then all 10), each format read back
independently: the gaussian-splatting folder with pycolmap and OpenCV, ``transforms.json`` by
projecting the model's points with it (OpenGL axes, as ``../shared/data/fox/transforms.json``),
the PLY files with plyfile; README's commands run as written; the refusals. The report page is
opened in headless Chromium (Debian's ``chromium``, which ``.ci/run`` installs): no console
output, a 3D canvas with points drawn, the registered count, and (over the DevTools protocol) the
view following real mouse drags, shift-drags, wheel turns and a double-click; its screenshot is kept in
``tests/artifacts/`` (``SP_EXTRACT_TEST_ARTIFACTS``)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import plyfile
import pycolmap
import pytest
from conftest import ROOT, run_cli, shared_file
from test_sfm import copy_photos, sfm

FORMATS = ("gaussian-splatting", "nerfstudio", "ply")
EXPORTS = tuple(arg for fmt in FORMATS for arg in ("--export", fmt))


@pytest.fixture(scope="module")
def grown(tmp_path_factory: pytest.TempPathFactory, sacre_coeur: Path, real_weights: Path) -> dict:
    """8 photos mapped with every export, then the other 2 added, then a run with nothing new."""
    root = tmp_path_factory.mktemp("handoff")
    names = sorted(p.name for p in sacre_coeur.glob("*.jpg"))
    images, work = copy_photos(sacre_coeur, root / "images", names[:8]), root / "work"
    code, first, stderr = sfm(images, work, real_weights, *EXPORTS, "--no-report")
    assert code == 0, stderr
    reported_first = (work / "report.html").exists()
    frames_before = len(json.loads((work / "export/nerfstudio/transforms.json").read_text())["frames"])
    copy_photos(sacre_coeur, images, names[8:])
    code, second, stderr = sfm(images, work, real_weights, *EXPORTS)
    assert code == 0, stderr
    grown_page = (work / "report.html").read_text(encoding="utf-8")
    stamps = {fmt: (work / "export" / fmt / "export.json").stat().st_mtime_ns for fmt in FORMATS}
    code, third, stderr = sfm(images, work, real_weights, *EXPORTS)
    assert code == 0, stderr
    model = pycolmap.Reconstruction(work / "sparse" / "0")
    return {
        "images": images, "work": work, "model": model, "model_names": registered_names(model),
        "first": first, "second": second, "third": third, "frames_before": frames_before,
        "stamps": stamps, "reported_first": reported_first, "grown_page": grown_page,
    }  # fmt: skip


def registered_names(model: pycolmap.Reconstruction) -> set[str]:
    return {model.images[i].name for i in model.reg_image_ids()}


def test_sfm_exports_and_replaces_them_when_the_model_grows(grown: dict) -> None:
    work, model = grown["work"], grown["model"]
    assert grown["second"]["registered"] > grown["frames_before"] >= 3
    assert grown["second"]["exports"] == [str(work / "export" / fmt) for fmt in FORMATS]
    frames = json.loads((work / "export/nerfstudio/transforms.json").read_text())["frames"]
    assert len(frames) == grown["second"]["registered"] == model.num_reg_images()
    assert not list((work / "export").glob("*.new")) and not list((work / "export").glob("*.old"))
    # nothing new: the model and its exports are left as they were
    assert grown["third"]["mode"] == "up to date"
    assert {fmt: (work / "export" / fmt / "export.json").stat().st_mtime_ns for fmt in FORMATS} == grown[
        "stamps"
    ]


def test_gaussian_splatting_folder_is_undistorted_colmap(grown: dict) -> None:
    out, model = grown["work"] / "export" / "gaussian-splatting", grown["model"]
    for sparse in (out / "sparse" / "0", out / "sparse"):  # 3DGS reads sparse/0, OpenMVS sparse/
        undistorted = pycolmap.Reconstruction(sparse)
        assert registered_names(undistorted) == registered_names(model)
        assert {camera.model.name for camera in undistorted.cameras.values()} == {"PINHOLE"}
        for image_id in undistorted.reg_image_ids():
            image = undistorted.images[image_id]
            camera = undistorted.cameras[image.camera_id]
            height, width = cv2.imread(str(out / "images" / image.name)).shape[:2]
            assert (width, height) == (camera.width, camera.height)
            original = model.find_image_with_name(image.name)
            np.testing.assert_allclose(image.projection_center(), original.projection_center(), atol=1e-6)
        assert undistorted.num_points3D() == model.num_points3D()


def project_opengl(frame: dict, points: np.ndarray) -> np.ndarray:
    """Pixels of world points seen by a nerfstudio frame: camera-to-world in OpenGL axes (x right,
    y up, looking down -z), OpenCV's radial-tangential distortion (k1, k2, p1, p2)."""
    matrix = np.array(frame["transform_matrix"])
    camera = (points - matrix[:3, 3]) @ matrix[:3, :3]  # world -> camera (rows)
    x, y = camera[:, 0] / -camera[:, 2], -camera[:, 1] / -camera[:, 2]  # image y points down
    r2 = x * x + y * y
    radial = 1 + frame["k1"] * r2 + frame["k2"] * r2 * r2
    xd = x * radial + 2 * frame["p1"] * x * y + frame["p2"] * (r2 + 2 * x * x)
    yd = y * radial + frame["p1"] * (r2 + 2 * y * y) + 2 * frame["p2"] * x * y
    return np.stack([frame["fl_x"] * xd + frame["cx"], frame["fl_y"] * yd + frame["cy"]], axis=1)


def test_transforms_json_reprojects_the_model_in_opengl_axes(grown: dict) -> None:
    out, model = grown["work"] / "export" / "nerfstudio", grown["model"]
    transforms = json.loads((out / "transforms.json").read_text())
    assert transforms["ply_file_path"] == "sparse_pc.ply"
    transform, scale = np.array(transforms["applied_transform"]), transforms["applied_scale"]
    errors, in_front = [], []
    for frame in transforms["frames"]:
        frame = {**transforms, **frame}  # per-frame intrinsics where cameras differ
        name = frame["file_path"].removeprefix("images/")
        assert (out / frame["file_path"]).read_bytes() == (grown["images"] / name).read_bytes()
        image = model.find_image_with_name(name)
        camera = model.cameras[image.camera_id]
        assert (frame["w"], frame["h"], frame["camera_model"]) == (camera.width, camera.height, "OPENCV")
        observed = [p for p in image.points2D if p.has_point3D()]
        world = np.array([model.points3D[p.point3D_id].xyz for p in observed])
        exported = scale * (world @ transform[:, :3].T + transform[:, 3])
        errors += list(np.linalg.norm(project_opengl(frame, exported) - [p.xy for p in observed], axis=1))
        matrix = np.array(frame["transform_matrix"])
        in_front.append(np.median((exported - matrix[:3, 3]) @ matrix[:3, 2]) < 0)  # down -z
    assert len(errors) > 500 and np.median(errors) < 1.5, np.median(errors)
    assert all(in_front)
    # fox's transforms.json (instant-ngp's colmap2nerf) has the same axes: its cameras, around the
    # fox, look down -z towards the middle of the camera centres
    fox = np.array(
        [
            f["transform_matrix"]
            for f in json.loads(shared_file("data/fox/transforms.json").read_text())["frames"]
        ]
    )
    towards = fox[:, :3, 3].mean(axis=0) - fox[:, :3, 3]
    assert np.mean(np.einsum("ij,ij->i", -fox[:, :3, 2], towards) > 0) > 0.95
    # splat initialisation: the same points, in the exported world
    cloud = plyfile.PlyData.read(out / "sparse_pc.ply")["vertex"]
    points = np.array([p.xyz for p in model.points3D.values()])
    expected = scale * (points @ transform[:, :3].T + transform[:, 3])
    np.testing.assert_allclose(np.stack([cloud["x"], cloud["y"], cloud["z"]], axis=1), expected, atol=1e-4)


def test_ply_reads_back_as_the_models_points_and_cameras(grown: dict) -> None:
    out, model = grown["work"] / "export" / "ply", grown["model"]
    points = plyfile.PlyData.read(out / "points.ply")["vertex"]
    expected = list(model.points3D.values())
    assert points.count == model.num_points3D() > 100
    np.testing.assert_allclose(
        np.stack([points["x"], points["y"], points["z"]], axis=1),
        [p.xyz for p in expected],
        rtol=1e-6,
        atol=1e-5,
    )
    np.testing.assert_array_equal(np.stack([points["red"], points["green"], points["blue"]], axis=1),
                                  [p.color for p in expected])  # fmt: skip
    cameras = plyfile.PlyData.read(out / "cameras.ply")["vertex"]
    centres = [model.images[i].projection_center() for i in sorted(model.reg_image_ids())]
    np.testing.assert_allclose(
        np.stack([cameras["x"], cameras["y"], cameras["z"]], axis=1), centres, atol=1e-5
    )


def readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index("## Next: dense models")
    section = readme[start : readme.index("\n## ", start + 1)]
    return re.findall(r"^(sp-extract export-model .*?)(?:\s+#.*)?$", section, re.MULTILINE)


def test_readme_commands_as_written(grown: dict, tmp_path: Path) -> None:
    commands = readme_commands()
    assert {re.search(r"--format (\S+)", command).group(1) for command in commands} == set(FORMATS)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "sparse").symlink_to(grown["work"] / "sparse")
    (tmp_path / "photos").symlink_to(grown["images"])
    for command in commands:
        result = run_cli(*command.split()[1:], cwd=tmp_path)
        assert result.returncode == 0, (command, result.stderr)
        out = tmp_path / command.split()[3]
        assert json.loads((out / "export.json").read_text())["format"] in command
    assert (
        len(json.loads((tmp_path / "nerf" / "transforms.json").read_text())["frames"])
        == grown["model"].num_reg_images()
    )


def test_refusals_in_one_line(grown: dict, tmp_path: Path) -> None:
    model = str(grown["work"] / "sparse" / "0")
    (tmp_path / "photos").mkdir()
    some = shutil.copytree(grown["images"], tmp_path / "some")
    gone = sorted(grown["model_names"])[0]
    (some / gone).unlink()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    cases = [
        ((model, "o", "--format", "mesh"), "'mesh' is not one of 'gaussian-splatting', 'nerfstudio', 'ply'"),
        ((model, "o"), "--format is required"),
        ((str(grown["work"] / "sparse"), "o", "--format", "ply"), "not a COLMAP model (no cameras.bin"),
        ((model, "o", "--format", "nerfstudio"), "--format nerfstudio needs the photos: give --images DIR"),
        (
            (model, "o", "--format", "gaussian-splatting", "--images", str(tmp_path / "photos")),
            "holds none of",
        ),
        (
            (model, "o", "--format", "nerfstudio", "--images", str(some)),
            f"{some / gone}: no such image, though",
        ),
        ((model, str(tmp_path / "mine"), "--format", "ply"), "is not an export of sp-extract"),
        (("--format", "ply", str(tmp_path / "nothing"), "o"), "no such model folder"),
    ]
    for args, message in cases:
        result = run_cli("export-model", *args, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and message in result.stderr, (args, result.stderr)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "o").exists()


# -- the report page -----------------------------------------------------------------------------
BACKGROUND = (16, 20, 28)  # the 3D view's background (page.PAGE's canvas colour)
ARTIFACTS = Path(os.environ.get("SP_EXTRACT_TEST_ARTIFACTS", ROOT / "tests" / "artifacts"))


BROWSER_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu")


def browser() -> str:
    """Debian's Chromium; a missing browser fails the test (CI installs it)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("chromium is missing: apt-get install -y chromium (.ci/run installs it)")
    return found


def chromium(*args: str) -> subprocess.CompletedProcess:
    """Headless Chromium on a page, its console messages on stderr (``CONSOLE`` lines)."""
    command = [browser(), *BROWSER_FLAGS, "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_sfm_writes_the_report_unless_told_not_to(grown: dict) -> None:
    assert not grown["reported_first"]  # --no-report
    assert grown["second"]["report"] == str(grown["work"] / "report.html")
    page = grown["grown_page"]
    registered = grown["second"]["registered"]
    assert f"{registered} / 10 photos registered" in page
    # what the grow run added: its 2 photos marked, named in the summary
    added = grown["second"]["added_images"]
    assert (
        len(added) == 2
        and f"This run added 2 photos to the model ({len(set(added) & set(grown['model_names']))} registered)"
        in page
    )
    for name in added:
        assert re.search(re.escape(name) + r" <span class='tag'>new</span>", page)
    assert "http://" not in page and "https://" not in page and "<script src" not in page  # no network


def test_report_command_and_its_page_in_a_browser(grown: dict, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    result = run_cli("report", str(grown["work"]), "--out", str(page))
    assert result.returncode == 0, result.stderr
    dom = chromium("--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr
    assert "CONSOLE" not in dom.stderr, dom.stderr  # no console message, error or other
    registered = grown["model"].num_reg_images()
    headline = re.search(r'<p id="headline"><b>(.*?)</b>', dom.stdout).group(1)
    assert headline.startswith(
        f"{registered} / 10 photos registered, {grown['model'].num_points3D():,} 3D points"
    )
    assert (
        int(re.search(r'data-drawn-points="(\d+)"', dom.stdout).group(1))
        > 0.5 * grown["model"].num_points3D()
    )
    assert '<div id="errors" hidden="">' in dom.stdout  # the page's own error box stayed empty
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report.png"
    done = chromium(f"--screenshot={shot}", "--window-size=1280,1000", page.as_uri())
    assert done.returncode == 0 and "CONSOLE" not in done.stderr, done.stderr
    picture = cv2.imread(str(shot))[:, :, ::-1]  # RGB
    canvas = np.all(picture == BACKGROUND, axis=2)
    rows, columns = np.flatnonzero(canvas.sum(axis=1) > 200), np.flatnonzero(canvas.sum(axis=0) > 200)
    assert len(rows) > 300 and len(columns) > 600  # the 960 x 600 view is on screen
    inside = picture[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1].reshape(-1, 3).astype(np.int64)
    # the points are drawn as 2 x 2 pixels in their own colours (the frusta are blue and orange)
    colours = np.array([p.color for p in grown["model"].points3D.values()], np.int64)
    in_colour = np.isin(inside @ [65536, 256, 1], colours @ [65536, 256, 1]).sum()
    assert in_colour > grown["model"].num_points3D(), in_colour


def test_report_refusals(tmp_path: Path, grown: dict) -> None:
    (tmp_path / "empty").mkdir()
    for args, message in [
        ((str(tmp_path / "nothing"),), "no such work folder"),
        ((str(tmp_path / "empty"),), "no sfm-run.json (written by 'sp-extract sfm'); give --images DIR"),
        ((str(grown["work"]), "--images", str(tmp_path / "gone")), "no such image folder"),
    ]:
        result = run_cli("report", *args)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, (
            result.stderr
        )


def test_report_stays_fast_on_a_large_model(tmp_path: Path) -> None:
    """10^5 points and 10^3 cameras (a synthetic model): half the points drawn, and said so."""
    from sp_extract.sfm.page import MAX_POINTS

    model = pycolmap.Reconstruction()
    camera = pycolmap.Camera.create_from_model_id(1, pycolmap.CameraModelId.SIMPLE_PINHOLE, 500.0, 640, 480)
    model.add_camera_with_trivial_rig(camera)
    for i in range(1000):  # a ring of cameras looking at the origin
        angle = 2 * np.pi * i / 1000
        centre = 10 * np.array([np.cos(angle), 0.0, np.sin(angle)])
        z = -centre / 10
        rotation = np.stack([np.cross([0.0, 1.0, 0.0], z), [0.0, 1.0, 0.0], z])
        pose = pycolmap.Rigid3d(pycolmap.Rotation3d(rotation), -rotation @ centre)
        model.add_image_with_trivial_frame(
            pycolmap.Image(name=f"{i:04d}.jpg", camera_id=1, image_id=i + 1), pose
        )
    rng = np.random.default_rng(0)
    for xyz, colour in zip(rng.normal(size=(100_000, 3)), rng.integers(0, 256, (100_000, 3), dtype=np.uint8)):
        model.add_point3D(xyz, pycolmap.Track(), colour)
    (tmp_path / "work" / "sparse" / "0").mkdir(parents=True)
    model.write(tmp_path / "work" / "sparse" / "0")
    (tmp_path / "photos").mkdir()
    result = run_cli("report", str(tmp_path / "work"), "--images", str(tmp_path / "photos"))
    assert result.returncode == 0, result.stderr
    dom = chromium("--dump-dom", (tmp_path / "work" / "report.html").as_uri())
    assert "CONSOLE" not in dom.stderr, dom.stderr
    assert "1000 / 1000 photos registered, 100,000 3D points" in dom.stdout
    assert f"{MAX_POINTS:,} of the 100,000 points drawn (a random subset)" in dom.stdout
    drawn = int(re.search(r'data-drawn-points="(\d+)"', dom.stdout).group(1))
    assert 0.9 * MAX_POINTS < drawn <= MAX_POINTS
    milliseconds = float(re.search(r'data-draw-ms="([\d.]+)"', dom.stdout).group(1))
    assert milliseconds < 500, milliseconds  # one frame (about 25 ms on a loaded 2-core machine)


def test_nerfstudio_intrinsics_of_each_colmap_camera_model() -> None:
    from sp_extract.errors import ConfigError
    from sp_extract.sfm.handoff import nerfstudio_camera

    def camera(model: str, params: list[float]) -> pycolmap.Camera:
        return pycolmap.Camera(model=model, width=640, height=480, params=params, camera_id=7)

    opencv = nerfstudio_camera(camera("OPENCV", [500, 510, 320, 240, 0.1, -0.2, 0.003, -0.004]))
    assert opencv == {"fl_x": 500, "fl_y": 510, "cx": 320, "cy": 240, "w": 640, "h": 480,
                      "camera_model": "OPENCV", "k1": 0.1, "k2": -0.2, "p1": 0.003, "p2": -0.004}  # fmt: skip
    simple = nerfstudio_camera(camera("SIMPLE_RADIAL", [500, 320, 240, -0.05]))
    assert (simple["fl_x"], simple["fl_y"], simple["k1"], simple["k2"], simple["p1"]) == (
        500,
        500,
        -0.05,
        0,
        0,
    )
    fisheye = nerfstudio_camera(camera("OPENCV_FISHEYE", [300, 301, 320, 240, 0.1, 0.2, 0.3, 0.4]))
    assert fisheye["camera_model"] == "OPENCV_FISHEYE"
    assert [fisheye[k] for k in ("k1", "k2", "k3", "k4")] == [0.1, 0.2, 0.3, 0.4]
    with pytest.raises(ConfigError, match="camera 7: nerfstudio has no FOV camera model"):
        nerfstudio_camera(camera("FOV", [500, 500, 320, 240, 0.9]))


def test_an_export_is_replaced_whole_or_not_at_all(grown: dict, tmp_path: Path, monkeypatch) -> None:
    from sp_extract.errors import StoreError
    from sp_extract.sfm import handoff

    model, out = grown["work"] / "sparse" / "0", tmp_path / "cloud"
    handoff.export_model(model, out, "ply")
    before = (out / "points.ply").read_bytes()

    def disk_full(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(handoff, "_ply", disk_full)
    with pytest.raises(StoreError, match=r"cloud: cannot write the ply export \(No space left on device\)"):
        handoff.export_model(model, out, "ply")
    assert (out / "points.ply").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cloud"]
    monkeypatch.undo()
    # killed between the two renames: the previous export aside, a half-built one beside it
    out.rename(tmp_path / "cloud.old")
    (tmp_path / "cloud.new").mkdir()
    handoff.recover_folder(out)
    assert (out / "points.ply").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cloud"]


CANVAS_HASH = """(() => {
  const c = document.getElementById("view");
  const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  let h = 0;
  for (let i = 0; i < d.length; i += 4) h = (h * 31 + d[i] + 7 * d[i + 1] + 13 * d[i + 2]) >>> 0;
  return h;
})()"""
NEXT_FRAME = "new Promise(done => requestAnimationFrame(() => requestAnimationFrame(() => done(1))))"


async def mouse_on_the_view(page: Path, profile: Path) -> list[int]:
    """Drive the page's 3D view with real mouse events (Chrome DevTools protocol, over tornado's
    websocket client): the canvas's pixel hash at the start, after a drag, a shift-drag, a wheel
    turn and a double-click."""
    import tornado.websocket

    command = [browser(), *BROWSER_FLAGS, "--remote-debugging-port=0", "--remote-allow-origins=*",
               f"--user-data-dir={profile}", "--window-size=1280,1000", page.as_uri()]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        address = next(
            m.group(1) for line in process.stderr if (m := re.search(r"listening on ws://([^/]+)/", line))
        )
        with urllib.request.urlopen(f"http://{address}/json/list", timeout=30) as response:
            target = next(t for t in json.loads(response.read()) if t["type"] == "page")
        connection = await tornado.websocket.websocket_connect(target["webSocketDebuggerUrl"])
        ids = itertools.count(1)

        async def call(method: str, **params: object) -> dict:
            number = next(ids)
            await connection.write_message(json.dumps({"id": number, "method": method, "params": params}))
            while True:
                message = json.loads(await connection.read_message())
                if message.get("id") == number:
                    assert "error" not in message, message
                    return message["result"]

        async def run(expression: str) -> object:
            result = await call(
                "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
            )
            assert "exceptionDetails" not in result, result
            return result["result"].get("value")

        async def mouse(kind: str, x: float, y: float, **extra: object) -> None:
            await call("Input.dispatchMouseEvent", type=kind, x=x, y=y, **extra)

        loaded = f"location.href === {json.dumps(page.as_uri())} && document.readyState === 'complete'"
        while not await run(loaded):  # the tab starts on about:blank
            await asyncio.sleep(0.1)
        x, y = await run(
            "(() => { const c = document.getElementById('view'); c.scrollIntoView();"
            " const r = c.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        hashes = [await run(CANVAS_HASH)]
        for modifiers in (0, 8):  # a drag rotates, a shift-drag (modifier 8) pans
            await mouse("mousePressed", x, y, button="left", clickCount=1, modifiers=modifiers)
            await mouse("mouseMoved", x + 120, y + 40, button="left", modifiers=modifiers)
            await mouse("mouseReleased", x + 120, y + 40, button="left", clickCount=1, modifiers=modifiers)
            await run(NEXT_FRAME)
            hashes.append(await run(CANVAS_HASH))
        await mouse("mouseWheel", x, y, deltaX=0, deltaY=-300)
        await run(NEXT_FRAME)
        hashes.append(await run(CANVAS_HASH))
        await mouse("mousePressed", x, y, button="left", clickCount=2)
        await mouse("mouseReleased", x, y, button="left", clickCount=2)
        await run(NEXT_FRAME)
        hashes.append(await run(CANVAS_HASH))
        connection.close()
        return hashes
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_report_3d_view_follows_the_mouse(grown: dict, tmp_path: Path) -> None:
    start, rotated, panned, zoomed, reset = asyncio.run(
        mouse_on_the_view(grown["work"] / "report.html", tmp_path)
    )
    assert len({start, rotated, panned, zoomed}) == 4  # each gesture changed the picture
    assert reset == start  # a double-click goes back to the first view
