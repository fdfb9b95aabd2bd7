"""Float8 inference through the user-facing paths: `Segmenter.load(fp8=True)`,
`Segmenter.calibrate_fp8` and `predict --fp8`, on the tiny random-weight model folder of
test_predict.

- calibrate_fp8 calibrates on exactly the inputs prediction runs (a large tile's windows
  and global view; a small tile resized to the model input): the same ranges as
  fp8_inference.calibrate on those crops cut by hand.
- A static-float8 Segmenter stays as close to the bf16 one as current scaling does.
- Misuse fails with messages that say what to do.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from mmovseg_jax import predict
from mmovseg_jax.data import preprocess
from mmovseg_jax.evaluation.sliding_window import window_origins
from mmovseg_jax.inference import Segmenter, _full_batches, _to_model_input
from mmovseg_jax.models import fp8_inference, params, storage
from mmovseg_jax.ops.resize import resize_bilinear
from tests.test_fp8 import _rel
from tests.test_predict import CLASSES, SIZE, model_dir, pair, tile  # noqa: F401 - fixtures

LARGE = (100, 90)  # 2 x 2 windows of 64 px and the global view


@pytest.fixture(scope="module")
def plain(model_dir):  # noqa: F811
    return Segmenter.load(model_dir, dtype="bfloat16", batch_size=4)


@pytest.fixture(scope="module")
def static(model_dir):  # noqa: F811
    seg = Segmenter.load(model_dir, fp8=True, batch_size=4)
    summary = seg.calibrate_fp8([tile(*LARGE, seed=0), tile(40, 50, seed=1)])
    return seg, summary


def _hand_cut_inputs(rgb: np.ndarray, sar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The windows and global view of a large tile, cut here independently of the Segmenter."""
    origins = window_origins(*rgb.shape[:2], SIZE, 1 / 3)
    assert len(origins) == 4
    crops = [(rgb[y:y + SIZE, x:x + SIZE], sar[y:y + SIZE, x:x + SIZE]) for y, x in origins]
    crops.append((resize_bilinear(rgb.astype(np.float32), (SIZE, SIZE), axes=(0, 1)),
                  resize_bilinear(sar.astype(np.float32), (SIZE, SIZE), axes=(0, 1))))
    return (np.stack([np.asarray(r, np.float32) for r, _ in crops]),
            np.stack([np.asarray(s, np.float32) for _, s in crops]))


def _forward(model, rgb, sar):
    return model.encode_images(_to_model_input(rgb, SIZE), _to_model_input(preprocess.sar_as_rgb(sar), SIZE))


def test_load_with_fp8_runs_float8_in_bf16(model_dir, plain):  # noqa: F811
    seg = Segmenter.load(model_dir, fp8=True)
    assert seg.fp8 == "on" and seg.config.dtype == "bfloat16" and plain.fp8 == "off"
    assert len(fp8_inference.float8_layers(seg.model)) > 0
    # the same parameters as the plain model: only the products differ
    ours, theirs = params.flat_params(seg.model), params.flat_params(plain.model)
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)


def test_calibration_runs_the_inputs_prediction_runs(model_dir, static):  # noqa: F811
    seg, summary = static
    layers_count = len(fp8_inference.float8_layers(seg.model))
    # 5 inputs of the large tile + 1 of the small one, 4 at a time
    assert summary == {"tiles": 2, "batches": 2, "layers": layers_count, "frozen": summary["frozen"]}
    assert 0 < summary["frozen"] <= layers_count and seg.fp8 == "static"

    by_hand = Segmenter.load(model_dir, fp8=True).model
    large_rgb, large_sar = _hand_cut_inputs(*tile(*LARGE, seed=0))
    small_rgb, small_sar = tile(40, 50, seed=1)
    small = (resize_bilinear(small_rgb.astype(np.float32), (SIZE, SIZE), axes=(0, 1))[None],
             resize_bilinear(small_sar.astype(np.float32), (SIZE, SIZE), axes=(0, 1))[None])
    fp8_inference.calibrate(by_hand, _forward, [(jnp.asarray(large_rgb), jnp.asarray(large_sar)),
                                                 tuple(jnp.asarray(x) for x in small)])
    want, got = fp8_inference.input_amaxes(by_hand), fp8_inference.input_amaxes(seg.model)
    assert want.keys() == got.keys() and len(got) > 0
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, err_msg=name)

    # a calibration that misses the global view (or any window) gives other ranges
    partial = Segmenter.load(model_dir, fp8=True).model
    fp8_inference.calibrate(partial, _forward, [(jnp.asarray(large_rgb[:2]), jnp.asarray(large_sar[:2]))])
    assert fp8_inference.input_amaxes(partial) != got


def test_calibration_batches_are_full_and_wrap_round_to_the_first_rows():
    def rows(start, n, sar=True):  # row i holds the value i in every pixel
        values = np.arange(start, start + n, dtype=np.float32)[:, None, None]
        return np.broadcast_to(values[..., None], (n, 2, 2, 3)), np.broadcast_to(values, (n, 2, 2)) if sar else None

    def seen(batches):
        out = [(np.asarray(r)[:, 0, 0, 0].tolist(), None if s is None else np.asarray(s)[:, 0, 0].tolist())
               for r, s in batches]
        assert all(s is None or s == r for r, s in out)  # rgb and sar rows stay paired
        return [r for r, _ in out]

    # 5 + 1 + 3 rows, 4 at a time: the last batch is row 8, then rows 0, 1, 2
    assert seen(_full_batches(iter([rows(0, 5), rows(5, 1), rows(6, 3)]), 4)) == [
        [0, 1, 2, 3], [4, 5, 6, 7], [8, 0, 1, 2]]
    assert seen(_full_batches(iter([rows(0, 4), rows(4, 4)]), 4)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # fewer rows than a batch: they cycle; RGB-only inputs give None for SAR
    assert seen(_full_batches(iter([rows(0, 2, sar=False)]), 5)) == [[0, 1, 0, 1, 0]]
    assert list(_full_batches(iter([]), 4)) == []


def test_a_bad_tile_after_good_ones_leaves_the_model_uncalibrated(model_dir):  # noqa: F811
    seg = Segmenter.load(model_dir, fp8=True, batch_size=4)
    tiles = (t for t in [tile(*LARGE, seed=0), (tile(SIZE, SIZE)[0], None)])  # a generator; the 2nd lacks SAR
    with pytest.raises(ValueError, match="SAR branch"):
        seg.calibrate_fp8(tiles)
    assert seg.fp8 == "on" and fp8_inference.input_amaxes(seg.model) == {}


def test_static_segmenter_stays_as_close_to_bf16_as_float8_does(model_dir, plain, static):  # noqa: F811
    seg, _ = static
    current = Segmenter.load(model_dir, fp8=True, batch_size=4)
    for rgb, sar in (tile(*LARGE, seed=0), tile(*LARGE, seed=5)):  # the calibration tile and a new one
        ref = plain.probabilities(rgb, sar, CLASSES)
        frozen = seg.probabilities(rgb, sar, CLASSES)
        assert frozen.shape == ref.shape == (3, *LARGE) and np.isfinite(frozen).all()
        frozen_err, current_err = _rel(frozen, ref), _rel(current.probabilities(rgb, sar, CLASSES), ref)
        print("probabilities vs bf16: static", frozen_err, "current", current_err)
        assert 1e-5 < frozen_err < 0.15 and frozen_err < 2 * current_err + 1e-3, (frozen_err, current_err)


def test_rebuild_keeps_parameters_and_changes_kernels(plain):
    rebuilt = storage.rebuild(plain.model, "mmovseg", fp8=True, gelu="tanh")
    assert rebuilt.config.dino.fp8 and rebuilt.config.dino.gelu == "tanh" and not plain.config.dino.fp8
    ours, theirs = params.flat_params(rebuilt), params.flat_params(plain.model)
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)


def test_misuse_says_what_to_do(model_dir, plain, static):  # noqa: F811
    with pytest.raises(ValueError, match="no float8 layers.*fp8=True"):
        plain.calibrate_fp8([tile(SIZE, SIZE)])
    with pytest.raises(ValueError, match="frozen already"):
        static[0].calibrate_fp8([tile(SIZE, SIZE)])
    with pytest.raises(ValueError, match="at least one tile"):
        Segmenter.load(model_dir, fp8=True).calibrate_fp8([])
    with pytest.raises(ValueError, match="SAR branch"):
        Segmenter.load(model_dir, fp8=True).calibrate_fp8([(tile(SIZE, SIZE)[0], None)])
    with pytest.raises(ValueError, match="bfloat16 compute, not dtype 'float32'"):
        Segmenter.load(model_dir, dtype="float32", fp8=True)


def test_cli_fp8_static(model_dir, pair, tmp_path, capsys):  # noqa: F811
    rgb_path, sar_path, _ = pair
    base = ["--checkpoint", str(model_dir), "--rgb", str(rgb_path), "--sar", str(sar_path), "--classes",
            ",".join(CLASSES)]
    assert predict.main(base + ["--out", str(tmp_path / "bf16.png"), "--dtype", "bfloat16",
                                "--probabilities", str(tmp_path / "bf16.npy")]) == 0
    assert predict.main(base + ["--out", str(tmp_path / "f8.png"), "--fp8", "static",
                                "--probabilities", str(tmp_path / "f8.npy")]) == 0
    printed = capsys.readouterr().out
    assert "float8 static" in printed and "seconds: load and calibrate" in printed
    ref, got = np.load(tmp_path / "bf16.npy"), np.load(tmp_path / "f8.npy")
    assert got.shape == ref.shape == (3, 70, 90) and 1e-5 < _rel(got, ref) < 0.15

    rc = predict.main(base + ["--out", str(tmp_path / "x.png"), "--fp8", "on", "--dtype", "float32"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --fp8 on runs with bfloat16") and not (tmp_path / "x.png").exists()
