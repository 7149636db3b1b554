"""``sp-extract report WORK``: one self-contained HTML page of an ``sfm`` work folder.

No network: the pictures are inline (base64 JPEG), the charts inline SVG, the 3D view a canvas
drawn by an inline script (rotate: drag; pan: right- or shift-drag; zoom: wheel). It holds the
last run's summary and stage times (``WORK/sfm-run.json``, written by every ``sfm`` run), every
photo with a thumbnail, registered or not, its keypoints, verified matches, 3D points and mean
reprojection error (``database.db``, ``sparse/0``), histograms of track lengths and point errors,
keypoint and match pictures of a sample of images and pairs (``pictures``, as ``show``), and the
points (coloured) and cameras (frusta) in 3D. At most ``MAX_POINTS`` points and ``MAX_CAMERAS``
cameras are drawn (a random subset, said on the page), so the page stays fast on large models.
The photos the last run added (a grown model) are marked, their frusta drawn in orange.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import sqlite3
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..errors import ConfigError
from ..pictures import FeatureSource, draw_keypoints, draw_matches
from ..report import counted
from ..store.atomic import atomic_write
from ..store.catalog import read_store_info
from ..store.reader import open_store
from .environment import MAX_IMAGE_ID, import_pycolmap

RUN_RECORD = "sfm-run.json"  # in WORK: the last sfm run's summary
REPORT = "report.html"
MAX_POINTS = 50_000  # drawn in the 3D view; more are subsampled
MAX_CAMERAS = 1_000
THUMBNAIL_PX = 120
PICTURE_PX = 720
SAMPLE_IMAGES = 3  # keypoint pictures
SAMPLE_PAIRS = 3  # match pictures (the pairs with the most verified matches)
SEED = 0


def _jpeg(picture: np.ndarray, quality: int = 80) -> str:
    ok, data = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return "data:image/jpeg;base64," + base64.b64encode(data.tobytes()).decode("ascii") if ok else ""


def thumbnail(path: Path) -> str:
    """A small JPEG of a photo as a data URL ("" if it cannot be read); decoded at a reduced
    scale (JPEG's DCT scaling), so a thousand large photos take seconds."""
    if not path.is_file():  # deleted since the run
        return ""
    picture = cv2.imread(str(path), cv2.IMREAD_REDUCED_COLOR_4 | cv2.IMREAD_IGNORE_ORIENTATION)
    if picture is None:
        picture = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if picture is None:
        return ""
    scale = THUMBNAIL_PX / max(picture.shape[:2])
    size = (max(1, round(picture.shape[1] * scale)), max(1, round(picture.shape[0] * scale)))
    return _jpeg(cv2.resize(picture, size, interpolation=cv2.INTER_AREA), 70)


def _database_counts(database: Path) -> tuple[dict[str, int], dict[str, int], list[tuple[str, str, int]]]:
    """Keypoints and verified matches per image name, and the verified pairs (name, name, inliers)."""
    if not database.is_file():
        return {}, {}, []
    with contextlib.closing(sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)) as db:
        names = dict(db.execute("SELECT image_id, name FROM images"))
        keypoints = {names[i]: rows for i, rows in db.execute("SELECT image_id, rows FROM keypoints")}
        rows = db.execute("SELECT pair_id, rows FROM two_view_geometries WHERE rows > 0").fetchall()
    matches: dict[str, int] = {}
    pairs = []
    for pair_id, count in rows:
        a, b = names[pair_id // MAX_IMAGE_ID], names[pair_id % MAX_IMAGE_ID]
        matches[a], matches[b] = matches.get(a, 0) + count, matches.get(b, 0) + count
        pairs.append((a, b, count))
    return keypoints, matches, pairs


def _image_errors(model: Any) -> dict[str, tuple[int, float]]:
    """Per registered image: its 3D points and their mean reprojection error (px)."""
    found = {}
    for image_id in model.reg_image_ids():
        image = model.images[image_id]
        observed = [p for p in image.points2D if p.has_point3D()]
        if not observed:
            found[image.name] = (0, 0.0)
            continue
        world = np.array([model.points3D[p.point3D_id].xyz for p in observed])
        pose = image.cam_from_world().matrix()
        pixels = model.cameras[image.camera_id].img_from_cam(world @ pose[:, :3].T + pose[:, 3])
        found[image.name] = (
            len(observed),
            float(np.linalg.norm(pixels - [p.xy for p in observed], axis=1).mean()),
        )
    return found


def histogram_svg(values: np.ndarray, bins: np.ndarray, label: str, integer: bool = False) -> str:
    """A bar chart of ``values`` in ``bins`` (edges), inline SVG with labelled axes."""
    counts, edges = np.histogram(values, bins)
    width, height, left, bottom = 360, 160, 56, 30
    top = max(int(counts.max()), 1) if len(counts) else 1
    bar = (width - left - 10) / max(len(counts), 1)
    bars = "".join(
        f'<rect x="{left + i * bar:.1f}" y="{height - bottom - (height - bottom - 10) * c / top:.1f}" '
        f'width="{max(bar - 1, 1):.1f}" height="{(height - bottom - 10) * c / top:.1f}" fill="#4a7fd0">'
        f"<title>{edges[i]:g}-{edges[i + 1]:g}: {c}</title></rect>"
        for i, c in enumerate(counts)
    )
    low, high = (
        (f"{edges[0]:.0f}", f"{edges[-1]:.0f}") if integer else (f"{edges[0]:.2g}", f"{edges[-1]:.2g}")
    )
    return (
        f'<svg width="{width}" height="{height}" role="img" aria-label="{html.escape(label)}">{bars}'
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - 10}" y2="{height - bottom}" stroke="#333"/>'
        f'<text x="{left}" y="{height - 12}" font-size="11">{low}</text>'
        f'<text x="{width - 10}" y="{height - 12}" font-size="11" text-anchor="end">{high}</text>'
        f'<text x="{(width + left) / 2}" y="{height - 2}" font-size="11" text-anchor="middle">'
        f"{html.escape(label)}</text>"
        f'<text x="{left - 4}" y="14" font-size="11" text-anchor="end">{top}</text></svg>'
    )


def _scene(model: Any, added: set[str]) -> tuple[dict[str, Any], str]:
    """The 3D view's data (points as base64 float32 / uint8, cameras) and what was subsampled."""
    rng = np.random.default_rng(SEED)
    points = list(model.points3D.values())
    xyz = np.array([p.xyz for p in points], np.float32).reshape(-1, 3)
    rgb = np.array([p.color for p in points], np.uint8).reshape(-1, 3)
    notes = []
    if len(xyz) > MAX_POINTS:
        keep = np.sort(rng.choice(len(xyz), MAX_POINTS, replace=False))
        xyz, rgb = xyz[keep], rgb[keep]
        notes.append(f"{MAX_POINTS:,} of the {len(points):,} points drawn (a random subset)")
    reg = sorted(model.reg_image_ids(), key=lambda i: model.images[i].name)
    if len(reg) > MAX_CAMERAS:
        notes.append(f"{MAX_CAMERAS:,} of the {len(reg):,} cameras drawn (a random subset)")
        reg = sorted(rng.choice(reg, MAX_CAMERAS, replace=False).tolist())
    cameras = []
    for image_id in reg:
        image = model.images[image_id]
        camera = model.cameras[image.camera_id]
        pose = image.cam_from_world().matrix()
        cameras.append({
            "name": image.name,
            "R": np.round(pose[:, :3], 6).tolist(),  # camera from world rotation
            "c": np.round(image.projection_center(), 6).tolist(),
            "w": camera.width / camera.mean_focal_length(),  # frustum half-extents at depth 1, doubled
            "h": camera.height / camera.mean_focal_length(),
            "added": image.name in added,
        })  # fmt: skip
    data = {
        "xyz": base64.b64encode(xyz.astype("<f4").tobytes()).decode("ascii"),
        "rgb": base64.b64encode(rgb.tobytes()).decode("ascii"),
        "cameras": cameras,
    }
    return data, "; ".join(notes)


def _pictures(
    work: Path, images: Path, names: list[str], pairs: list[tuple[str, str, int]]
) -> list[tuple[str, str]]:
    """Keypoint pictures of a sample of images and match pictures of the best pairs (``show``)."""
    features, matches = work / "feats.h5", work / "matches.h5"
    if not features.is_file():
        return []
    found = []
    source = FeatureSource(features)
    try:
        step = max(len(names) // SAMPLE_IMAGES, 1)
        for name in names[::step][:SAMPLE_IMAGES]:
            with contextlib.suppress(ConfigError, OSError):  # a photo gone since: no picture
                picture, caption = draw_keypoints(source, images, name, PICTURE_PX)
                found.append((_jpeg(picture), caption))
        if matches.is_file():
            best = sorted(pairs, key=lambda pair: -pair[2])[:SAMPLE_PAIRS]
            verify = read_store_info(matches, "matches")[0].get("verify")
            with open_store(matches, locking=False) as h5:
                for a, b, _ in best:
                    with contextlib.suppress(ConfigError, OSError):
                        picture, caption = draw_matches(
                            source, h5, matches, verify, images, (a, b), PICTURE_PX
                        )
                        found.append((_jpeg(picture), caption))
    finally:
        source.close()
    return found


def write_report(work: Path | str, images: Path | str | None = None, out: Path | str | None = None) -> Path:
    """Write the page of the work folder ``work`` (module doc) to ``out`` (``WORK/report.html``);
    ``images``: the photos' folder, by default the one the last ``sfm`` run recorded."""
    work = Path(work)
    if not work.is_dir():
        raise ConfigError(f"{work}: no such work folder")
    run = _read_run(work)
    if images is None:
        if run is None:
            raise ConfigError(f"{work}: no {RUN_RECORD} (written by 'sp-extract sfm'); give --images DIR")
        images = Path(run["images_dir"])
    images, out = Path(images), Path(out) if out else work / REPORT
    if not images.is_dir():
        raise ConfigError(f"{images}: no such image folder")
    model_dir = work / "sparse" / "0"
    model = None
    if (model_dir / "images.bin").is_file():
        model = import_pycolmap().Reconstruction(model_dir)
    keypoints, matches, pairs = _database_counts(work / "database.db")
    added = set((run or {}).get("added_images", []))
    page = _page(work, images, run, model, keypoints, matches, pairs, added)
    try:
        with atomic_write(out, durable=False) as temporary:
            temporary.write_text(page, encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{out}: cannot write the report ({error.strerror or error})") from error
    return out


def _script_safe(text: str) -> str:
    """JSON inside a ``<script>`` element: a photo named ``</script>...`` must not end it."""
    return text.replace("</", "<\\/")


def _read_run(work: Path) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((work / RUN_RECORD).read_text(encoding="utf-8"))
    return None


def _page(
    work: Path,
    images: Path,
    run: dict[str, Any] | None,
    model: Any,
    keypoints: dict[str, int],
    matches: dict[str, int],
    pairs: list[tuple[str, str, int]],
    added: set[str],
) -> str:
    esc = html.escape
    errors = _image_errors(model) if model is not None else {}
    photos = sorted({*keypoints, *errors, *((run or {}).get("unregistered_images", []))})
    registered = len(errors)
    parts = [f"<h1>sp-extract sfm: {esc(str(work))}</h1>"]
    if model is not None:
        headline = (
            f"{registered} / {len(photos)} photos registered, {model.num_points3D():,} 3D points, "
            f"mean reprojection error {model.compute_mean_reprojection_error():.3f} px, "
            f"mean track length {model.compute_mean_track_length():.2f}"
        )
    else:
        headline = f"no model: 0 / {len(photos)} photos registered"
    parts.append(f'<p id="headline"><b>{esc(headline)}</b></p>')
    if run is not None:
        times = ", ".join(
            f"{stage} {seconds:.1f} s" for stage, seconds in run.get("stage_times_s", {}).items()
        )
        parts.append(
            f"<p>Last run ({esc(run.get('mode', ''))}): {counted(run.get('images', 0), 'photo')}, "
            f"{run.get('new_images', 0)} new, {run.get('pairs', 0)} pairs "
            f"({esc(run.get('pairs_mode', ''))}), {run.get('verified_pairs', 0)} verified in this run; "
            f"wall time {run.get('wall_time_s', 0):.1f} s ({esc(times)}). "
            f"Photos: {esc(run.get('images_dir', ''))}.</p>"
        )
        if added and run.get("mode") == "grow":
            new_registered = len(added & set(errors))
            parts.append(
                f'<p class="added">This run added {counted(len(added), "photo")} to the model '
                f"({new_registered} registered), marked <span class='tag'>new</span> below and drawn in "
                "orange in the 3D view.</p>"
            )
        parts += [f'<p class="warning">warning: {esc(w)}</p>' for w in run.get("warnings", [])]
    if model is not None:
        scene, note = _scene(model, added)
        parts.append(
            "<h2>3D view</h2><p>Points in their colours, cameras as frusta (orange: added by the last run). "
            "Drag: rotate; right- or shift-drag: pan; wheel: zoom; double-click: reset."
            + (f" <b>{esc(note)}</b>." if note else "")
            + '</p><canvas id="view" width="960" height="600"></canvas>'
            + f'<script id="scene" type="application/json">{_script_safe(json.dumps(scene))}</script>'
        )
        points = list(model.points3D.values())
        lengths = np.array([p.track.length() for p in points])
        point_errors = np.array([p.error for p in points])
        if len(points):
            top = max(int(lengths.max()), 2)
            high = max(float(np.percentile(point_errors, 99)), 1e-3)  # the long tail in the last bar
            parts.append(
                "<h2>Tracks and errors</h2><div class='charts'>"
                + histogram_svg(lengths, np.arange(2, top + 2) - 0.5, "track length (images per point)", True)
                + histogram_svg(
                    np.clip(point_errors, 0, high), np.linspace(0, high, 21), "point reprojection error (px)"
                )
                + "</div>"
            )
    pictures = _pictures(work, images, sorted(errors) or photos, pairs)
    if pictures:
        parts.append("<h2>Keypoints and matches (a sample)</h2><div class='pictures'>")
        parts += [
            f"<figure><img src='{src}'><figcaption>{esc(caption)}</figcaption></figure>"
            for src, caption in pictures
        ]
        parts.append("</div>")
    rows = []
    for name in photos:
        points3d, error = errors.get(name, (None, None))
        state = "registered" if name in errors else "not registered"
        tag = " <span class='tag'>new</span>" if name in added else ""
        rows.append(
            f"<tr class='{'reg' if name in errors else 'unreg'}'><td><img src='{thumbnail(images / name)}' "
            f"alt=''></td><td>{esc(name)}{tag}</td><td>{state}</td><td>{keypoints.get(name, '')}</td>"
            f"<td>{matches.get(name, 0)}</td><td>{'' if points3d is None else points3d}</td>"
            f"<td>{'' if error is None else f'{error:.2f}'}</td></tr>"
        )
    parts.append(
        f"<h2>Photos ({registered} registered, {len(photos) - registered} not)</h2>"
        "<table><thead><tr><th></th><th>name</th><th>state</th><th>keypoints</th><th>verified matches</th>"
        "<th>3D points</th><th>mean error (px)</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )
    return PAGE.replace("{{body}}", "\n".join(parts)).replace(
        "{{script}}", VIEWER if model is not None else ""
    )


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sp-extract sfm report</title>
<style>
body{font-family:system-ui,sans-serif;margin:16px;color:#222}
canvas{background:#10141c;display:block;cursor:grab;max-width:100%}
table{border-collapse:collapse;font-size:13px}td,th{padding:2px 8px;text-align:left}
tr.unreg{background:#fde8e8}td img{max-height:64px}
.tag{background:#f28c28;color:#fff;border-radius:3px;padding:0 4px;font-size:11px}
.warning{color:#a40}.charts,.pictures{display:flex;flex-wrap:wrap;gap:16px}
figure{margin:0;max-width:720px}figure img{max-width:100%}figcaption{font-size:12px}
</style></head><body>
<div id="errors" hidden></div>
{{body}}
<script>{{script}}</script>
</body></html>
"""

# The 3D view: the points projected by a pinhole camera orbiting the points' median, drawn into
# an ImageData with a depth buffer, the frusta as lines on top. The first view is the first
# camera's.
VIEWER = r"""
"use strict";
window.addEventListener("error", e => {
  const box = document.getElementById("errors"); box.hidden = false; box.textContent += e.message + "\n";
});
(() => {
  const scene = JSON.parse(document.getElementById("scene").textContent);
  const bytes = s => Uint8Array.from(atob(s), c => c.charCodeAt(0));
  const xyz = new Float32Array(bytes(scene.xyz).buffer), rgb = bytes(scene.rgb), n = xyz.length / 3;
  const canvas = document.getElementById("view"), ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, f = 0.9 * W;
  const median = k => { const v = []; for (let i = k; i < xyz.length; i += 3) v.push(xyz[i]);
    v.sort((a, b) => a - b); return v.length ? v[v.length >> 1] : 0; };
  const cams = scene.cameras;
  const first = cams.length ? cams[0].R : [[1, 0, 0], [0, 1, 0], [0, 0, 1]];
  let target, yaw, pitch, dist;
  const mul = (A, B) => A.map(r => [0, 1, 2].map(j => r[0] * B[0][j] + r[1] * B[1][j] + r[2] * B[2][j]));
  function reset() {  // from behind the first camera, back far enough that every camera and 95 % of the
    target = [median(0), median(1), median(2)]; yaw = 0; pitch = 0;  // points are in the picture
    const R = first, needed = p => {
      const d = [0, 1, 2].map(k => p[k] - target[k]);
      const [x, y, z] = R.map(r => r[0] * d[0] + r[1] * d[1] + r[2] * d[2]);
      return Math.max(f * Math.abs(x) / (0.45 * W), f * Math.abs(y) / (0.45 * H)) - z;
    };
    const step = Math.max(1, Math.floor(n / 2000)), wants = [];
    for (let i = 0; i < n; i += step) wants.push(needed([xyz[3 * i], xyz[3 * i + 1], xyz[3 * i + 2]]));
    wants.sort((a, b) => a - b);
    const points95 = wants.length ? wants[Math.floor(0.95 * (wants.length - 1))] : 0;
    dist = Math.max(points95, ...cams.map(c => needed(c.c)));
    if (!(dist > 0)) dist = 10;
  }
  function rotation() {
    const cy = Math.cos(yaw), sy = Math.sin(yaw), cp = Math.cos(pitch), sp = Math.sin(pitch);
    return mul(mul([[1, 0, 0], [0, cp, -sp], [0, sp, cp]], [[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]]), first);
  }
  // colours packed as the canvas's 32-bit pixels (little-endian RGBA), the background likewise
  const packed = new Uint32Array(n);
  for (let i = 0; i < n; i++) {
    packed[i] = 0xff000000 | rgb[3 * i + 2] << 16 | rgb[3 * i + 1] << 8 | rgb[3 * i];
  }
  const background = 0xff000000 | 28 << 16 | 20 << 8 | 16;
  const project = (R, p) => {  // a frustum's corner; none closer than 5 % of the distance
    const d0 = p[0] - target[0], d1 = p[1] - target[1], d2 = p[2] - target[2];
    const z = R[2][0] * d0 + R[2][1] * d1 + R[2][2] * d2 + dist;
    if (z <= 0.05 * dist) return null;
    return [f * (R[0][0] * d0 + R[0][1] * d1 + R[0][2] * d2) / z + W / 2,
            f * (R[1][0] * d0 + R[1][1] * d1 + R[1][2] * d2) / z + H / 2];
  };
  function draw() {
    const started = performance.now(), R = rotation(), image = ctx.createImageData(W, H);
    const px = new Uint32Array(image.data.buffer), depth = new Float32Array(W * H).fill(Infinity);
    px.fill(background);
    const [a0, a1, a2] = R[0], [b0, b1, b2] = R[1], [c0, c1, c2] = R[2];
    const t0 = target[0], t1 = target[1], t2 = target[2], near = 1e-3 * dist;
    let drawn = 0;
    for (let i = 0; i < n; i++) {
      const d0 = xyz[3 * i] - t0, d1 = xyz[3 * i + 1] - t1, d2 = xyz[3 * i + 2] - t2;
      const z = c0 * d0 + c1 * d1 + c2 * d2 + dist;
      if (z <= near) continue;
      const u = Math.round(f * (a0 * d0 + a1 * d1 + a2 * d2) / z + W / 2);
      const v = Math.round(f * (b0 * d0 + b1 * d1 + b2 * d2) / z + H / 2);
      if (u < 0 || v < 0 || u >= W - 1 || v >= H - 1) continue;
      drawn++;
      const at = v * W + u, colour = packed[i];  // a 2 x 2 dot, nearest first
      if (z < depth[at]) { depth[at] = z; px[at] = colour; }
      if (z < depth[at + 1]) { depth[at + 1] = z; px[at + 1] = colour; }
      if (z < depth[at + W]) { depth[at + W] = z; px[at + W] = colour; }
      if (z < depth[at + W + 1]) { depth[at + W + 1] = z; px[at + W + 1] = colour; }
    }
    ctx.putImageData(image, 0, 0);
    const size = 0.05 * dist;
    for (const c of [...cams.filter(c => !c.added), ...cams.filter(c => c.added)]) {  // added on top
      const corner = (sx, sy) => { // camera axes -> world: R^T
        const a = [sx * c.w / 2 * size, sy * c.h / 2 * size, size];
        return [0, 1, 2].map(k => c.c[k] + c.R[0][k] * a[0] + c.R[1][k] * a[1] + c.R[2][k] * a[2]);
      };
      const o = project(R, c.c);
      const q = [corner(-1, -1), corner(1, -1), corner(1, 1), corner(-1, 1)].map(p => project(R, p));
      if (!o || q.some(p => !p)) continue;
      ctx.strokeStyle = c.added ? "#f28c28" : "#7fb0ff"; ctx.beginPath();
      for (let k = 0; k < 4; k++) { ctx.moveTo(o[0], o[1]); ctx.lineTo(q[k][0], q[k][1]); }
      ctx.moveTo(q[3][0], q[3][1]); for (const p of q) ctx.lineTo(p[0], p[1]); ctx.stroke();
    }
    canvas.dataset.drawnPoints = drawn;
    canvas.dataset.drawMs = (performance.now() - started).toFixed(1);
  }
  let drag = null;
  canvas.addEventListener("contextmenu", e => e.preventDefault());
  canvas.addEventListener("mousedown", e => {
    drag = {x: e.clientX, y: e.clientY, pan: e.button === 2 || e.shiftKey};
  });
  window.addEventListener("mouseup", () => { drag = null; });
  window.addEventListener("mousemove", e => {
    if (!drag) return;
    const dx = e.clientX - drag.x, dy = e.clientY - drag.y; drag.x = e.clientX; drag.y = e.clientY;
    if (drag.pan) {
      const R = rotation(), s = dist / f;
      for (let k = 0; k < 3; k++) target[k] -= s * (R[0][k] * dx + R[1][k] * dy);
    } else { yaw += dx * 0.01; pitch = Math.max(-1.5, Math.min(1.5, pitch - dy * 0.01)); }
    requestAnimationFrame(draw);
  });
  canvas.addEventListener("wheel", e => {
    e.preventDefault(); dist *= Math.exp(e.deltaY * 0.001); requestAnimationFrame(draw);
  });
  canvas.addEventListener("dblclick", () => { reset(); draw(); });
  reset(); draw();
})();
"""
