"""data_setup.py: the download with `requests` replaced by fakes (no network), the NeRF-synthetic (Blender)
conversions (into a .npz, and into a scene folder re-split as the figures' data/lego400) on tiny scene folders
written here, and the procedural-scene writer.

Every failure must: exit 2 with one `error:` line naming the problem, retry exactly when retrying can help (with
exponential backoff), leave no temporary file, and leave a pre-existing good file byte-for-byte untouched.
"""

import io
import json
import math
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import requests

import data_setup
from tests.conftest import ROOT

GOOD_KEYS = ("images", "poses", "focal")


def npz_bytes(keys=GOOD_KEYS, pose_scale: float = 1.0) -> bytes:
    """A tiny-NeRF-shaped .npz of exactly the real file's size (stored zip entries without zip64 extras, as the
    original file was written). Renaming a key to another of the same length keeps the size."""
    arrays = [np.zeros((106, 100, 100, 3), np.float32), np.tile(np.eye(4, dtype=np.float32) * pose_scale,
                                                                  (106, 1, 1)), np.float64(138.889)]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for key, array in zip(keys, arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asanyarray(array))
            zf.writestr(key + ".npy", member.getvalue())
    return buf.getvalue()


GOOD = npz_bytes()
assert len(GOOD) == data_setup.EXPECTED_BYTES  # the fixture itself must be right for the tests to mean anything


class FakeResponse:
    def __init__(self, body: bytes = b"", status: int = 200, reason: str = "OK", length: int | None = -1,
                 fail_after: int | None = None, error: Exception | None = None):
        self.body, self.status_code, self.reason = body, status, reason
        self.headers = {} if length is None else {"Content-Length": str(len(body) if length == -1 else length)}
        self.fail_after, self.error = fail_after, error

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def iter_content(self, chunk_size):
        for start in range(0, len(self.body), chunk_size):
            if self.fail_after is not None and start >= self.fail_after:
                raise self.error
            yield self.body[start:start + chunk_size]


class FakeGet:
    """Stands in for requests.get: plays `outcomes` in order (the last one repeats), recording each call."""

    def __init__(self, *outcomes):
        self.outcomes, self.calls = list(outcomes), []

    def __call__(self, url, **kwargs):
        self.calls.append((url, kwargs))
        outcome = self.outcomes[min(len(self.calls), len(self.outcomes)) - 1]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


@pytest.fixture
def sleeps(monkeypatch):
    waits = []
    monkeypatch.setattr(data_setup.time, "sleep", waits.append)
    return waits


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "tiny_nerf_data.npz"
    path.write_bytes(GOOD)
    os.utime(path, (1_000_000, 1_000_000))  # a recognisable mtime: any rewrite would change it
    return path


def run_cli(argv, monkeypatch, get, capsys):
    monkeypatch.setattr(data_setup.requests, "get", get)
    code = data_setup.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_failed(code, err, *fragments):
    lines = err.strip().splitlines()
    assert code == 2
    assert lines[-1].startswith("error: cannot download "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


def assert_untouched(path):
    assert path.read_bytes() == GOOD
    assert os.stat(path).st_mtime == 1_000_000
    assert sorted(os.listdir(path.parent)) == [path.name]  # no temporary left behind


# --- success ------------------------------------------------------------------------------------------------------
def test_download_success_streams_with_timeout(tmp_path, monkeypatch, capsys, sleeps):
    out = tmp_path / "sub" / "tiny.npz"
    get = FakeGet(FakeResponse(GOOD))
    code, stdout, _ = run_cli(["--out", str(out), "--timeout", "7"], monkeypatch, get, capsys)
    assert code == 0 and "downloaded" in stdout
    assert out.read_bytes() == GOOD and sorted(os.listdir(out.parent)) == ["tiny.npz"]
    assert len(get.calls) == 1 and sleeps == []
    url, kwargs = get.calls[0]
    assert url == data_setup.URL and kwargs["stream"] is True and kwargs["timeout"] == 7.0


def test_retries_then_succeeds_with_exponential_backoff(tmp_path, monkeypatch, capsys, sleeps):
    out = tmp_path / "tiny.npz"
    cut = FakeResponse(GOOD, fail_after=1 << 20, error=requests.exceptions.ConnectionError("reset"))
    get = FakeGet(requests.exceptions.ConnectTimeout("slow"), cut, FakeResponse(GOOD))
    code, stdout, err = run_cli(["--out", str(out)], monkeypatch, get, capsys)
    assert code == 0 and "3 attempts" in stdout
    assert len(get.calls) == 3 and sleeps == [1.0, 2.0]
    assert "attempt 1 failed: timed out" in err and "attempt 2 failed: network error" in err
    assert out.read_bytes() == GOOD and sorted(os.listdir(tmp_path)) == ["tiny.npz"]


def test_valid_file_present_skips_download(good_file, monkeypatch, capsys, sleeps):
    get = FakeGet(AssertionError("must not download"))
    code, stdout, _ = run_cli(["--out", str(good_file)], monkeypatch, get, capsys)
    assert code == 0 and "already present and valid" in stdout and get.calls == []
    assert_untouched(good_file)


def test_invalid_file_present_is_replaced_by_a_good_download(tmp_path, monkeypatch, capsys, sleeps):
    out = tmp_path / "tiny.npz"
    out.write_bytes(GOOD[: len(GOOD) // 2])  # e.g. a copy cut short by a full disk
    code, _, err = run_cli(["--out", str(out)], monkeypatch, FakeGet(FakeResponse(GOOD)), capsys)
    assert code == 0 and "not the tiny NeRF file" in err
    assert out.read_bytes() == GOOD


# --- failures: each over a good file with --force (it must survive), with retries exactly where they help ----------
def test_offline(good_file, monkeypatch, capsys, sleeps):
    get = FakeGet(requests.exceptions.ConnectionError("Failed to resolve 'cseweb.ucsd.edu'"))
    code, _, err = run_cli(["--out", str(good_file), "--force"], monkeypatch, get, capsys)
    assert_failed(code, err, "network error (ConnectionError)", "(5 attempts)", "was left as it was",
                  "--data=synthetic")
    assert len(get.calls) == 5 and sleeps == [1.0, 2.0, 4.0, 8.0]
    assert_untouched(good_file)


def test_timeout(good_file, monkeypatch, capsys, sleeps):
    get = FakeGet(requests.exceptions.ReadTimeout("read timed out"))
    code, _, err = run_cli(["--out", str(good_file), "--force", "--retries", "2", "--timeout", "3"], monkeypatch,
                           get, capsys)
    assert_failed(code, err, "timed out (no data for 3 s)", "(3 attempts)")
    assert len(get.calls) == 3 and sleeps == [1.0, 2.0]
    assert_untouched(good_file)


def test_http_404_is_not_retried(good_file, monkeypatch, capsys, sleeps):
    get = FakeGet(FakeResponse(b"<html>gone</html>", status=404, reason="Not Found"))
    code, _, err = run_cli(["--out", str(good_file), "--force"], monkeypatch, get, capsys)
    assert_failed(code, err, "HTTP 404 Not Found", "(1 attempt)")
    assert len(get.calls) == 1 and sleeps == []  # a missing file will not appear on a retry
    assert_untouched(good_file)


def test_http_503_is_retried(good_file, monkeypatch, capsys, sleeps):
    get = FakeGet(FakeResponse(b"busy", status=503, reason="Service Unavailable"))
    code, _, err = run_cli(["--out", str(good_file), "--force", "--retries", "1"], monkeypatch, get, capsys)
    assert_failed(code, err, "HTTP 503 Service Unavailable", "(2 attempts)")
    assert len(get.calls) == 2 and sleeps == [1.0]
    assert_untouched(good_file)


def test_wrong_size(good_file, monkeypatch, capsys, sleeps):
    get = FakeGet(FakeResponse(GOOD[:5000]))  # a complete response, just not the file
    code, _, err = run_cli(["--out", str(good_file), "--force"], monkeypatch, get, capsys)
    assert_failed(code, err, "wrong size: got 5,000 bytes, expected 12,727,482", "(5 attempts)")
    assert len(get.calls) == 5 and sleeps == [1.0, 2.0, 4.0, 8.0]
    assert_untouched(good_file)


def test_transfer_cut_short(good_file, monkeypatch, capsys, sleeps):
    get = FakeGet(FakeResponse(GOOD[:4096], length=len(GOOD)))
    code, _, err = run_cli(["--out", str(good_file), "--force", "--retries", "1"], monkeypatch, get, capsys)
    assert_failed(code, err, "transfer cut short (4,096 of 12,727,482 bytes)", "(2 attempts)")
    assert len(get.calls) == 2
    assert_untouched(good_file)


@pytest.mark.parametrize("make_body, problem", [
    (lambda: npz_bytes(keys=("pixels", "poses", "focal")), "lacks key(s) images"),
    (lambda: npz_bytes(pose_scale=2.0), "is not a rigid camera-to-world matrix"),
    (lambda: b"\0" * len(GOOD), "is not a readable .npz file"),
], ids=["wrong-keys", "non-rigid-poses", "not-a-zip"])
def test_wrong_content_is_not_retried(good_file, monkeypatch, capsys, sleeps, make_body, problem):
    body = make_body()
    assert len(body) == len(GOOD)  # right size: only the content check can catch it
    get = FakeGet(FakeResponse(body, length=None))
    code, _, err = run_cli(["--out", str(good_file), "--force"], monkeypatch, get, capsys)
    assert_failed(code, err, "wrong content: the download", problem, "(1 attempt)")
    assert len(get.calls) == 1 and sleeps == []
    assert_untouched(good_file)


def test_failure_without_a_previous_file_leaves_nothing(tmp_path, monkeypatch, capsys, sleeps):
    out = tmp_path / "tiny.npz"
    get = FakeGet(FakeResponse(GOOD, fail_after=1 << 20, error=requests.exceptions.ChunkedEncodingError("x")))
    code, _, err = run_cli(["--out", str(out), "--retries", "0"], monkeypatch, get, capsys)
    assert_failed(code, err, "network error (ChunkedEncodingError)")
    assert "was left as it was" not in err and os.listdir(tmp_path) == []


def test_interrupt_mid_download_removes_the_partial_file(tmp_path, monkeypatch, capsys, sleeps):
    out = tmp_path / "tiny.npz"
    get = FakeGet(FakeResponse(GOOD, fail_after=1 << 20, error=KeyboardInterrupt()))
    code, _, err = run_cli(["--out", str(out)], monkeypatch, get, capsys)
    assert code == 130 and err.strip() == "interrupted" and os.listdir(tmp_path) == []


@pytest.mark.slow
def test_cli_without_network_is_one_line(tmp_path):
    """The real script, real requests, an address where nothing listens: one line, exit 2, no traceback."""
    out = tmp_path / "tiny.npz"
    proc = subprocess.run([sys.executable, "data_setup.py", "--out", str(out), "--url", "http://127.0.0.1:9/x.npz",
                           "--retries", "0", "--timeout", "2"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: cannot download http://127.0.0.1:9/x.npz: network error (ConnectionError) (1 attempt); use "
        "--data=synthetic or `python data_setup.py --synthetic OUT.npz` to work offline"]
    assert not out.exists()


def test_bad_arguments_exit_2(capsys):
    assert data_setup.main(["--retries", "-1"]) == 2
    assert data_setup.main(["--bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--retries must be >= 0" in err[0] and "unrecognized arguments: --bogus" in err[1]


def test_unwritable_target_is_one_line(tmp_path, monkeypatch, capsys, sleeps):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the target's folder should be
    code, _, err = run_cli(["--out", str(blocker / "tiny.npz")], monkeypatch, FakeGet(FakeResponse(GOOD)), capsys)
    assert code == 2 and err.startswith("error: cannot write the data file:") and len(err.splitlines()) == 1


# --- the procedural scene -----------------------------------------------------------------------------------------
def test_synthetic_writes_exactly_the_named_file(tmp_path, capsys):
    out = tmp_path / "scene"  # no .npz suffix: np.savez must not append one
    assert data_setup.main(["--synthetic", str(out)]) == 0
    assert os.listdir(tmp_path) == ["scene"]
    views = data_setup.load_npz(str(out))
    assert tuple(views.images.shape) == (106, 100, 100, 3) and views.depth is not None
    assert "106 views, 100x100" in capsys.readouterr().out


# --- NeRF-synthetic (Blender) scenes -------------------------------------------------------------------------------
ANGLE_X = 0.6911112070083618  # the lego scene's camera_angle_x


def rigid_pose(rng) -> list:
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))  # a rotation (det +1)
    pose = np.eye(4)
    pose[:3, :3], pose[:3, 3] = q, rng.normal(size=3) * 4
    return pose.tolist()  # float64 values, as json.dump writes them


@pytest.fixture
def blender_scene(tmp_path):
    """A NeRF-synthetic-shaped folder: transforms_train.json and 5 RGBA PNGs of 8x4 pixels, in train/."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = tmp_path / "toy"
    (folder / "train").mkdir(parents=True)
    frames, images = [], []
    for i in range(5):
        rgba = rng.integers(0, 256, size=(4, 8, 4), dtype=np.uint8)
        rgba[:, :4, 3] = rng.choice([0, 255], size=(4, 4))  # fully transparent and opaque pixels too
        if i == 1:
            rgba[:, :4] = (255, 255, 255, 0)  # a white but fully transparent block must come out black
        Image.fromarray(rgba, "RGBA").save(folder / "train" / f"r_{i}.png")
        images.append(rgba)
        # the dataset's paths have no extension; one with it must work too
        frames.append({"file_path": f"./train/r_{i}" + (".png" if i == 4 else ""), "rotation": 0.0126,
                       "transform_matrix": rigid_pose(rng)})
    (folder / "transforms_train.json").write_text(json.dumps({"camera_angle_x": ANGLE_X, "frames": frames}))
    return folder, frames, images


def reference_view(rgba: np.ndarray, k: int) -> np.ndarray:
    """Composited on black, then the mean of each k x k block: written out pixel by pixel in Python floats."""
    h, w = rgba.shape[0] // k, rgba.shape[1] // k
    out = np.zeros((h, w, 3))
    for y in range(h):
        for x in range(w):
            for c in range(3):
                block = [rgba[y * k + dy, x * k + dx] for dy in range(k) for dx in range(k)]
                out[y, x, c] = sum(float(p[c]) / 255 * float(p[3]) / 255 for p in block) / (k * k)
    return out


def test_blender_scene_is_composited_on_black_shrunk_by_area_and_thinned(blender_scene, tmp_path, capsys):
    folder, frames, images = blender_scene
    out = tmp_path / "toy2.npz"
    argv = ["--blender", str(folder), "--size", "2", "--leave-out", "2:1", "--out", str(out)]
    assert data_setup.main(argv) == 0
    assert "3 views" in capsys.readouterr().out
    with np.load(out) as npz:
        arrays = {k: npz[k] for k in npz.files}
    kept = [0, 2, 4]  # frames 1 and 3 left out
    assert arrays["images"].dtype == np.float32 and arrays["images"].shape == (3, 1, 2, 3)
    for image, i in zip(arrays["images"], kept):
        np.testing.assert_allclose(image, reference_view(images[i], 4), rtol=0, atol=1e-7)
        # exactly the float32 of an integer block sum of 8-bit colour x alpha over 255^2 * 16
        sums = np.round(image.astype(np.float64) * 255 * 255 * 16)
        assert np.array_equal(image, (sums / (255 * 255 * 16)).astype(np.float32))
    expected_poses = np.array([frames[i]["transform_matrix"] for i in kept], dtype=np.float32)
    assert arrays["poses"].dtype == np.float32 and np.array_equal(arrays["poses"], expected_poses)
    assert arrays["focal"].dtype == np.float32 and arrays["focal"] == np.float32(1 / math.tan(ANGLE_X / 2))
    views = data_setup.load_npz(str(out))  # the loader takes it as it is
    assert len(views) == 3 and (views.height, views.width) == (1, 2)


def test_blender_transparent_pixels_come_out_black_and_all_frames_by_default(blender_scene, tmp_path):
    folder, _, images = blender_scene
    out = tmp_path / "toy.npz"
    assert data_setup.main(["--blender", str(folder), "--size", "4", "--out", str(out)]) == 0
    with np.load(out) as npz:
        got = npz["images"]
    assert got.shape == (5, 2, 4, 3)  # every frame, 2x2 blocks
    assert np.all(got[1, :, :2] == 0)  # white at alpha 0 is background: black
    np.testing.assert_allclose(got[3], reference_view(images[3], 2), rtol=0, atol=1e-7)


def test_blender_default_output_is_named_after_the_scene_and_size(blender_scene, tmp_path, monkeypatch):
    folder, _, _ = blender_scene
    monkeypatch.chdir(tmp_path)
    assert data_setup.main(["--blender", str(folder), "--size", "4"]) == 0
    assert os.path.isfile(tmp_path / "data" / "toy4.npz")


@pytest.mark.parametrize("change, argv_extra, problem", [
    (None, ["--size", "3"], "--size 3 must divide its width"),
    (None, ["--split", "val"], "transforms_val.json not found"),
    (None, ["--leave-out", "0:1"], "--leave-out expects STEP:START"),
    (None, ["--leave-out", "1:0"], "no frames left"),
    ("missing-image", ["--size", "4"], "cannot read"),
    ("bad-pose", ["--size", "4"], "is not a rigid camera-to-world matrix"),
    ("no-angle", ["--size", "4"], "is not a NeRF-synthetic transforms file"),
], ids=["size", "split", "leave-out", "nothing-left", "missing-image", "bad-pose", "no-angle"])
def test_blender_problems_are_one_line_and_write_nothing(blender_scene, tmp_path, capsys, change, argv_extra,
                                                         problem):
    folder, frames, _ = blender_scene
    meta = folder / "transforms_train.json"
    if change == "missing-image":
        os.remove(folder / "train" / "r_2.png")
    elif change == "bad-pose":
        frames[2]["transform_matrix"][0][0] *= 2
        meta.write_text(json.dumps({"camera_angle_x": ANGLE_X, "frames": frames}))
    elif change == "no-angle":
        meta.write_text(json.dumps({"frames": frames}))
    out = tmp_path / "out" / "x.npz"
    assert data_setup.main(["--blender", str(folder), "--out", str(out), *argv_extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and problem in err[0], err
    assert not out.exists()


def test_blender_and_synthetic_together_are_refused(blender_scene, tmp_path, capsys):
    folder, _, _ = blender_scene
    assert data_setup.main(["--blender", str(folder), "--synthetic", str(tmp_path / "s.npz")]) == 2
    assert "give one of them" in capsys.readouterr().err


# --- NeRF-synthetic scene folders (--folder, --resplit) -----------------------------------------------------------
def known_block(rgba: np.ndarray) -> None:
    """Two 2x2 blocks whose area means are known by hand: at (0, 0) two red pixels of alpha 204 beside two white
    ones of alpha 0; at (0, 2) four opaque ones."""
    rgba[:2, :2] = [[(200, 0, 0, 204), (100, 0, 0, 204)], [(255, 255, 255, 0), (255, 255, 255, 0)]]
    rgba[:2, 2:4] = [[(200, 0, 0, 255), (100, 0, 0, 255)], [(0, 40, 0, 255), (0, 0, 80, 255)]]


@pytest.fixture
def lego_like(tmp_path):
    """A NeRF-synthetic-shaped scene: transforms_train.json with 20 views r_0 ... r_19 of 16x16 RGBA (listed out of
    order: the re-split goes by the number in the name) and transforms_val.json with 3 views of its own."""
    from PIL import Image

    rng = np.random.default_rng(1)
    folder = tmp_path / "lego"
    meta, images = {}, {}
    for split, numbers in (("train", rng.permutation(20)), ("val", [0, 1, 2])):
        (folder / split).mkdir(parents=True)
        frames = []
        for k in numbers:
            rgba = rng.integers(0, 256, size=(16, 16, 4), dtype=np.uint8)
            rgba[8:, :, 3] = rng.choice([0, 255], size=(8, 16))
            if split == "train" and k == 3:
                known_block(rgba)
            Image.fromarray(rgba, "RGBA").save(folder / split / f"r_{k}.png")
            images[split, int(k)] = rgba
            frames.append({"file_path": f"./{split}/r_{k}", "rotation": 0.0126, "transform_matrix": rigid_pose(rng)})
        meta[split] = {"camera_angle_x": ANGLE_X, "frames": frames}
        (folder / f"transforms_{split}.json").write_text(json.dumps(meta[split], indent=4))
    return folder, meta, images


def read_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


def test_resplit_folder_holds_the_figures_views_with_the_sources_poses(lego_like, tmp_path, capsys):
    from dataset import load_views

    folder, meta, images = lego_like
    out = tmp_path / "data" / "lego8"
    assert data_setup.main(["--blender", str(folder), "--size", "8", "--resplit", "--folder", str(out)]) == 0
    assert "train 16 views, val 2 views" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["train", "transforms_train.json", "transforms_val.json"]  # no test split
    source = {f["file_path"]: f for f in meta["train"]["frames"]}
    expect = {"train": [p for p in source if int(p.split("_")[-1]) % 10 not in (0, 5)],  # in the source's order
              "val": [p for p in source if int(p.split("_")[-1]) % 10 == 0]}
    assert sorted(expect["val"]) == ["./train/r_0", "./train/r_10"] and len(expect["train"]) == 16
    for split, paths in expect.items():
        written = read_json(out / f"transforms_{split}.json")
        assert written["camera_angle_x"] == ANGLE_X
        assert [f["file_path"] for f in written["frames"]] == paths
        assert [f["transform_matrix"] for f in written["frames"]] == [source[p]["transform_matrix"] for p in paths]
        assert all(f["rotation"] == 0.0126 for f in written["frames"])
    assert sorted(os.listdir(out / "train")) == sorted(f"r_{k}.png" for k in range(20) if k % 10 != 5)
    # through dataset.py's NeRF-synthetic loader, as training reads it
    for split, n in (("train", 16), ("val", 2)):
        views = load_views(str(out), split, val_views=10)
        assert len(views) == n and tuple(views.images.shape) == (n, 8, 8, 4)
        poses = np.array([source[p]["transform_matrix"] for p in expect[split]], dtype=np.float32)
        assert np.array_equal(views.poses.numpy(), poses)
        assert np.allclose(views.cameras.fx.numpy(), 4 / math.tan(ANGLE_X / 2))


def test_resplit_area_filter_is_premultiplied_and_agrees_with_the_npz_path(lego_like, tmp_path):
    from scene_files import read_image

    folder, _, images = lego_like
    out = tmp_path / "lego8"
    assert data_setup.main(["--blender", str(folder), "--size", "8", "--resplit", "--folder", str(out)]) == 0
    png = data_setup.read_png(str(out / "train" / "r_3.png"))
    assert png.shape == (8, 8, 4)
    # by hand: alpha (204 + 204 + 0 + 0) / 4 = 102; colour (200 * 204 + 100 * 204) / 4 / 102 = 150, 0, 0: the
    # transparent white adds nothing (a box filter over straight colour would give 202.5, 127.5, 127.5)
    assert tuple(png[0, 0]) == (150, 0, 0, 102)
    assert tuple(png[0, 1]) == (75, 10, 20, 255)  # four opaque pixels: their plain mean
    assert tuple(read_image(str(out / "train" / "r_3.png"))[0, 0]) == (60, 0, 0, 102)  # the loader premultiplies
    for k in (k for k in range(20) if k % 10 != 5):  # one rule: the folder's colour x alpha is the .npz's value
        png = data_setup.read_png(str(out / "train" / f"r_{k}.png")).astype(np.float64)
        premultiplied = png[..., :3] * png[..., 3:] / 255**2
        np.testing.assert_allclose(premultiplied, data_setup.composite_and_shrink(images["train", k], 2),
                                   rtol=0, atol=0.5 / 255 + 1e-6)


def test_folder_without_resplit_keeps_the_sources_splits(lego_like, tmp_path):
    folder, meta, _ = lego_like
    out = tmp_path / "lego16"
    assert data_setup.main(["--blender", str(folder), "--size", "16", "--folder", str(out)]) == 0
    for split in ("train", "val"):
        written = read_json(out / f"transforms_{split}.json")
        assert written == meta[split]  # the same paths (without extension), poses and angle
    assert sorted(os.listdir(out / "val")) == ["r_0.png", "r_1.png", "r_2.png"]


@pytest.mark.parametrize("kind", ["folder", "npz"])
def test_an_existing_output_is_replaced_only_with_force(lego_like, tmp_path, capsys, kind):
    folder, _, _ = lego_like
    out = tmp_path / "out" / ("lego8" if kind == "folder" else "lego8.npz")
    out.parent.mkdir()
    if kind == "folder":
        out.mkdir()
        (out / "mine.txt").write_text("keep me")
        argv = ["--blender", str(folder), "--size", "8", "--resplit", "--folder", str(out)]
    else:
        out.write_bytes(b"keep me")
        argv = ["--blender", str(folder), "--size", "8", "--out", str(out)]
    assert data_setup.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {out} already exists: give --force to replace it"]
    assert (out / "mine.txt" if kind == "folder" else out).read_bytes() == b"keep me"
    assert data_setup.main([*argv, "--force"]) == 0
    assert os.listdir(out.parent) == [out.name]  # replaced, and no temporary left beside it
    if kind == "folder":
        assert sorted(os.listdir(out)) == ["train", "transforms_train.json", "transforms_val.json"]
    else:
        assert len(data_setup.load_npz(str(out))) == 20


@pytest.mark.parametrize("change, argv_extra, problem", [
    ("no-source", [], "transforms_train.json not found: --blender takes a NeRF-synthetic scene folder"),
    (None, ["--size", "3"], "--size 3 must divide its width"),
    ("missing-image", [], "cannot read"),
    ("not-r_K", [], "is not named r_K"),
    ("bad-pose", [], "is not a rigid camera-to-world matrix"),
    (None, ["--leave-out", "10:5"], "--leave-out apply to a .npz"),
], ids=["no-source", "size", "missing-image", "not-r_K", "bad-pose", "leave-out"])
def test_folder_problems_are_one_line_and_leave_nothing(lego_like, tmp_path, capsys, change, argv_extra, problem):
    folder, meta, _ = lego_like
    frames = meta["train"]["frames"]
    if change == "no-source":
        folder = tmp_path / "nowhere"
    elif change == "missing-image":
        os.remove(folder / "train" / "r_7.png")
    elif change in ("not-r_K", "bad-pose"):
        if change == "not-r_K":
            os.rename(folder / "train" / "r_7.png", folder / "train" / "seven.png")
            next(f for f in frames if f["file_path"] == "./train/r_7")["file_path"] = "./train/seven"
        else:
            frames[4]["transform_matrix"][0][0] *= 2
        (folder / "transforms_train.json").write_text(json.dumps(meta["train"]))
    out = tmp_path / "out" / "lego8"
    argv = ["--blender", str(folder), "--folder", str(out), "--resplit", "--size", "8", *argv_extra]
    assert data_setup.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and problem in err[0], err
    assert ".tmp-" not in err[0]  # the message names the output, not its temporary
    assert not out.parent.exists() or os.listdir(out.parent) == []


def test_folder_arguments_that_do_not_go_together_are_refused(lego_like, tmp_path, capsys):
    folder, _, _ = lego_like
    assert data_setup.main(["--folder", str(tmp_path / "x")]) == 2
    assert data_setup.main(["--blender", str(folder), "--resplit"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "give --blender DIR too" in err[0] and "--resplit applies to --folder" in err[1]


@pytest.mark.slow
def test_cli_missing_source_folder_is_one_line(tmp_path):
    """The real script: a source folder that is not there is one line on stderr and exit 2."""
    out = tmp_path / "lego400"
    proc = subprocess.run([sys.executable, "data_setup.py", "--blender", str(tmp_path / "nerf_synthetic" / "lego"),
                           "--size", "400", "--resplit", "--folder", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "transforms_train.json not found" in proc.stderr and not out.exists()
