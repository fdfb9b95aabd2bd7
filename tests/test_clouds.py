"""Cloud synthesis (mmovseg_jax.data.clouds) and its CLI (mmovseg_jax.clouds)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mmovseg_jax import clouds as cli
from mmovseg_jax.data import clouds as C

# Every test uses one tile size (48 x 56 x 3) and few distinct calls, so the compiled
# programs are shared: compiling dominates this file's run time on CPU.
add_clouds_jit = jax.jit(C.add_clouds, static_argnames=("params",))
SHADOWS = dataclasses.replace(C.THIN, shadows=True)
H, W = 48, 56


def _ground(b: int | None = None) -> jax.Array:
    """A strongly coloured test scene in [0.05, 0.75]: (H, W, 3) or (b, H, W, 3) float32."""
    y, x = np.mgrid[0:H, 0:W] / max(H, W)
    img = np.stack([0.4 + 0.3 * np.sin(9 * x), 0.3 + 0.2 * np.cos(7 * y), 0.1 + 0.05 * np.sin(11 * (x + y))], -1)
    img = img.astype(np.float32)
    return jnp.asarray(img if b is None else np.stack([np.roll(img, 5 * i, 1) for i in range(b)]))


def test_presets_follow_reference():
    assert set(C.PRESETS) == {"thin", "big", "local", "fog", "wide"}
    assert (C.THIN.min_lvl, C.THIN.max_lvl, C.THIN.locality_degree, C.THIN.channel_offset) == \
        ((0.0, 0.1), (0.4, 0.7), (1, 3), 4)
    assert (C.BIG.min_lvl, C.BIG.max_lvl, C.BIG.clear_threshold, C.BIG.locality_degree) == \
        ((0.0, 0.0), (1.0, 1.0), (0.0, 0.2), (1, 1))
    assert C.LOCAL == dataclasses.replace(C.BIG, locality_degree=(2, 4))
    assert (C.FOG.min_lvl, C.FOG.max_lvl) == ((0.3, 0.6), (0.6, 0.7))
    assert (C.WIDE.min_lvl, C.WIDE.max_lvl, C.WIDE.decay_factor) == ((0.0, 0.8), (0.0, 1.0), (0.8, 1.2))
    for p in C.PRESETS.values():
        assert p.blur_scaling == 2 and p.cloud_color and not p.shadows
        assert (p.shadow_max_lvl, p.shadow_clear_threshold, p.shadow_decay_factor) == ((0.3, 0.6), 0.4, 1.5)
        hash(p)  # static jit argument
    shadow = C.shadow_params(C.THIN)
    assert (shadow.min_lvl, shadow.max_lvl, shadow.clear_threshold, shadow.locality_degree, shadow.decay_factor) \
        == ((0.0, 0.0), (0.3, 0.6), (0.4, 0.4), (1, 2), (1.5, 1.5))
    with pytest.raises(ValueError):
        C.CloudParams(min_lvl=(0.5, 0.1))
    with pytest.raises(ValueError):
        C.CloudParams(locality_degree=(0, 2))


def test_noise_shapes_and_ranges():
    assert C.octave_cell_sizes(256) == (4, 8, 16, 32, 64)
    assert C.octave_cell_sizes(1024)[-1] == 256 and C.octave_cell_sizes(300)[-1] == 64
    p = np.asarray(C.perlin_noise(jax.random.key(0), (H, W), 8))
    assert p.shape == (H, W) and np.abs(p).max() <= math.sqrt(0.5) + 1e-6 and p.std() > 0.05
    assert np.abs(p[::8, ::8]).max() < 1e-6  # gradient noise is zero on the lattice
    n = np.asarray(C.multi_octave_noise(jax.random.key(1), (H, W), 1.3))
    assert n.shape == (H, W) and np.abs(n).max() == pytest.approx(math.tanh(4.0), abs=1e-5)
    m = np.asarray(jax.jit(C.cloud_mask, static_argnums=(1, 2))(jax.random.key(2), (H, W), C.THIN))
    assert m.shape == (H, W) and 0.0 <= m.min() <= 0.1 + 1e-6 and 0.4 - 1e-6 <= m.max() <= 0.7 + 1e-6


@pytest.mark.parametrize("name", sorted(C.PRESETS))
def test_opacity_and_output_in_unit_range(name):
    params = dataclasses.replace(C.WIDE, shadows=True) if name == "wide" else C.PRESETS[name]
    img = _ground()
    for seed in range(3):
        out, alpha = C.add_clouds(jax.random.key(seed), img, params)
        out, alpha = np.asarray(out), np.asarray(alpha)
        assert out.shape == alpha.shape == img.shape and out.dtype == alpha.dtype == np.float32
        assert alpha.min() >= 0.0 and alpha.max() <= 1.0
        assert out.min() >= 0.0 and out.max() <= 1.0 + 1e-6


@pytest.mark.parametrize("params", [C.THIN, C.BIG])
def test_zero_opacity_leaves_image_unchanged(params):
    img = _ground()
    out, alpha = C.add_clouds(jax.random.key(3), img, params, opacity=0.0)
    assert np.all(np.asarray(alpha) == 0.0)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(img))
    rgb = np.asarray(img * 255).astype(np.uint8)
    out8, _ = C.add_clouds_uint8(jax.random.key(3), rgb, params, opacity=0.0)
    np.testing.assert_array_equal(np.asarray(out8), rgb)


def test_full_opacity_approaches_cloud_colour():
    """out = x (1 - a) + B a with base B = a + colour (1 - a), per band: |out - B| <= 1 - a, so
    the output approaches the cloud base as the opacity grows, and at a = 1 the fully opaque
    cloud is white in every band (the default +-5 % band jitter keeps a >= 0.95)."""
    tinted = jnp.zeros((H, W, 3)) + jnp.array([0.6, 0.3, 0.1])  # constant red-dominant scene
    for img, level in ((_ground(), 0.9), (_ground(), 0.99), (_ground(), 1.0), (tinted, 0.5)):
        out, alpha = (np.asarray(v) for v in C.add_clouds(jax.random.key(0), img, C.THIN, opacity=level))
        a_band = alpha[0, 0]  # uniform per band: level * (1 +- 5 %), clipped
        assert np.all(np.abs(alpha - a_band) <= 1e-6) and np.all(np.abs(a_band / level - 1) <= 0.05 + 1e-6)
        colour = np.asarray(C.cloud_colour(img))  # of the unblurred image: equal up to the blur at the edges
        base = alpha + colour * (1 - alpha)
        assert np.all(np.abs(out - base) <= (1 - alpha) + 1e-3)
        if level == 1.0:
            assert out.min() >= 0.95 ** 2 - 1e-6
            np.testing.assert_allclose(out[..., a_band == 1.0], 1.0, atol=1e-6)
        if level == 0.5:  # the cloud takes the scene's tint: colour (1, 1/2, 1/6)
            cloud_base = a_band + np.array([1, 0.5, 1 / 6]) * (1 - a_band)
            expect = np.array([0.6, 0.3, 0.1]) * (1 - a_band) + cloud_base * a_band
            np.testing.assert_allclose(out.mean((0, 1)), expect, atol=1e-4)


def test_shadows_only_darken():
    img = np.asarray(_ground())
    for seed in range(3):
        out, alpha = C.add_clouds(jax.random.key(seed), img, SHADOWS, opacity=0.0)
        out = np.asarray(out)
        assert np.all(np.asarray(alpha) == 0.0)
        assert np.all(out <= img)
        darkening = 1 - out / img  # the shadow opacity: max in [0.3, 0.6] (+-5 %)
        assert 0.3 * 0.95 - 1e-4 <= darkening.max() <= 0.6 * 1.05 + 1e-4 and darkening.min() >= 0.0


def test_same_seed_same_output_different_seed_different():
    img = _ground()
    a1, m1 = add_clouds_jit(jax.random.key(11), img, params=C.THIN)
    a2, m2 = add_clouds_jit(jax.random.key(11), img, params=C.THIN)
    b, mb = add_clouds_jit(jax.random.key(12), img, params=C.THIN)
    np.testing.assert_array_equal(np.asarray(a1), np.asarray(a2))
    np.testing.assert_array_equal(np.asarray(m1), np.asarray(m2))
    assert np.abs(np.asarray(a1) - np.asarray(b)).max() > 0.05
    assert np.abs(np.asarray(m1) - np.asarray(mb)).mean() > 0.02


def test_jit_and_batch_equal_eager_single_call():
    imgs = _ground(3)
    key = jax.random.key(5)
    keys = jax.random.split(key, 3)
    batched = add_clouds_jit(key, imgs, params=C.THIN)  # image i gets split(key, 3)[i]
    for i in range(3):
        eager = C.add_clouds(keys[i], imgs[i], C.THIN)
        jitted = add_clouds_jit(keys[i], imgs[i], params=C.THIN)
        for got in (jitted, (batched[0][i], batched[1][i])):
            np.testing.assert_allclose(np.asarray(got[0]), np.asarray(eager[0]), atol=1e-5)
            np.testing.assert_allclose(np.asarray(got[1]), np.asarray(eager[1]), atol=1e-5)
    with pytest.raises(ValueError):
        C.add_clouds(key, imgs[0, :, :, 0])


# ----------------------------------------------------------------------------- statistics
#
# Expected statistics, derived from the algorithm (REFERENCE.md section 4); the opacity map
# is the per-band opacity averaged over the bands.
#
# Noise. With decay 1 the octave of cell s has amplitude ~ s, so variance ~ s^2: the top
# cell N/4 carries 75 % of the variance (4096/5456 at 256 px, 65536/87376 at 1024 px). The
# sum is about Gaussian; a tile spans only ~(N/s_top)^2 = 16 top cells, so its max |x| is
# ~2.5-3 sigma and after the normalisation sigma(x) ~ 0.35-0.4. tanh(4x) pushes most pixels
# towards +-1: the noise scaled to [0, 1], n, is bimodal with mean ~0.5, and
# P(n > 0.1) = P(tanh(4x) > -0.8) = P(x > -0.275) = P(z > -0.74) ~ 0.77,
# P(n > 0.28) = P(x > -0.12) ~ 0.63.
# THIN: min ~ U[0, 0.1] (mean 0.05), max ~ U[0.4, 0.7] (mean 0.55), no clear threshold, k ~ {1,2,3}
# noises multiplied and renormalised to max 1. E[mask] ~ 0.5 (k=1), ~0.25/0.8 ~ 0.3 (k=2),
# ~0.125/0.6 ~ 0.2 (k=3): ~0.33. Mean opacity ~ 0.05 + 0.5 * 0.33 ~ 0.22. Coverage (opacity > 0.1
# <=> mask > (0.1 - min) / (max - min) ~ 0.1): ~0.77 (k=1), ~0.65^2 ~ 0.45 (k=2), ~0.3 (k=3):
# ~0.55. k, min and max vary per image: one image's coverage has sd ~0.2 (k's spread), its
# mean opacity sd ~0.09.
# BIG: min 0, max 1, k = 1, threshold t ~ U[0, 0.2]: opacity = (n - t)+ / (1 - t). Coverage =
# P(n > t + 0.1 (1 - t)), threshold 0.1..0.28: ~0.77..0.63, ~0.70. Mean opacity ~ (E[n] -
# t P(n > t)) / (1 - t) ~ (0.5 - 0.1 * 0.75) / 0.9 ~ 0.47. Per image sd ~0.065 (t's spread) and ~0.05.
# Bands: derived value +- (0.05 coverage / 0.04 mean for the approximations above + 3 sd / sqrt(seeds)).
# Correlation length (lag where the autocorrelation along x and y first drops below 1/e):
# one Perlin octave of cell s drops to 1/e at a lag of s/2 (smoothstep-interpolated
# gradients, zero on the lattice). The top octave (75 % of the variance, s = N/4) alone would
# give N/8; the lower octaves are decorrelated at that lag, so the sum reaches 1/e where
# rho_top ~ 0.49, ~0.4 s_top = N/10; tanh's saturation and the products shorten it a little.
# Band [N/16, N/6]. Cell sizes scale with the tile, so the 1024 px length is ~4x the 256 px
# one; one image's length varies by ~12 % (sd), so with 3-4 seeds at 1024 px: band 2.5x..5.5x.
# Measured over many seeds (256 seeds at 256 px, 16 at 1024 px; not the test's seeds):
#   THIN 256: coverage 0.604 (sd 0.22), mean 0.199 (sd 0.09), corr 25.5 px (sd 3.3);
#       1024: coverage 0.647, mean 0.227, corr 98.9 px (sd 12)
#   BIG  256: coverage 0.719 (sd 0.06), mean 0.458 (sd 0.045), corr 26.1 px (sd 2.5);
#       1024: coverage 0.719, mean 0.460, corr 104.8 px (sd 8)

EXPECTED = {"thin": (0.55, 0.22, 0.2, 0.09), "big": (0.70, 0.47, 0.065, 0.05)}  # coverage, mean, their sd per image
SEEDS = {256: {"thin": 16, "big": 16}, 1024: {"thin": 4, "big": 3}}


def stat_band(name: str, size: int, which: str) -> tuple[float, float]:
    """(low, high) band of the seed-averaged coverage or mean opacity (see the derivation above)."""
    coverage, mean, sd_coverage, sd_mean = EXPECTED[name]
    centre, tol, sd = (coverage, 0.05, sd_coverage) if which == "coverage" else (mean, 0.04, sd_mean)
    half = tol + 3 * sd / math.sqrt(SEEDS[size][name])
    return centre - half, centre + half


def correlation_length(alpha: np.ndarray) -> int:
    """Lag (pixels) where the autocorrelation of the (H, W) map, averaged over x and y, first drops below 1/e."""
    a = alpha - alpha.mean()
    n = min(a.shape) // 2

    def along(x: np.ndarray) -> np.ndarray:  # linear autocovariance along axis 1, lags 0..n-1, per overlap
        m = x.shape[1]
        ac = np.fft.irfft(np.abs(np.fft.rfft(x, 2 * m, axis=1)) ** 2, 2 * m, axis=1).sum(0)[:n]
        return ac / (x.shape[0] * (m - np.arange(n)))

    rho = 0.5 * (along(a) + along(a.T))
    rho = rho / rho[0]
    below = np.nonzero(rho < 1 / math.e)[0]
    return int(below[0]) if below.size else n


@pytest.fixture(scope="module")
def stats() -> dict:
    """(preset, size) -> per-seed coverage, mean opacity, correlation length, min/max opacity."""
    result = {}
    for size, seeds in SEEDS.items():
        for name, n in seeds.items():
            img = jnp.full((n, size, size, 3), 0.3, jnp.float32)
            keys = jax.random.split(jax.random.key(0), n)  # a batch of keys, one per image
            _, alpha = add_clouds_jit(keys, img, params=C.PRESETS[name])
            alpha = np.asarray(alpha)
            grey = alpha.mean(-1)
            result[name, size] = {"coverage": (grey > 0.1).mean((1, 2)), "mean": grey.mean((1, 2)),
                                  "corr": np.array([correlation_length(g) for g in grey]),
                                  "min": alpha.min((1, 2, 3)), "max": alpha.max((1, 2, 3))}
    return result


def test_thin_opacity_inside_configured_range(stats):
    s = stats["thin", 256]
    jitter = 1 + C.THIN.channel_magnitude_shift
    assert np.all(s["min"] >= 0.0) and np.all(s["min"] <= C.THIN.min_lvl[1] * jitter + 1e-6)
    assert np.all(s["max"] >= C.THIN.max_lvl[0] * (2 - jitter) - 1e-6)
    assert np.all(s["max"] <= C.THIN.max_lvl[1] * jitter + 1e-6)
    assert np.all((s["mean"] > C.THIN.min_lvl[0]) & (s["mean"] < C.THIN.max_lvl[1]))


@pytest.mark.parametrize("name", ["thin", "big"])
@pytest.mark.parametrize("size", [256, 1024])
def test_statistics_within_bands(stats, name, size):
    s = stats[name, size]
    coverage, mean, corr = s["coverage"].mean(), s["mean"].mean(), s["corr"].mean()
    c_lo, c_hi = stat_band(name, size, "coverage")
    m_lo, m_hi = stat_band(name, size, "mean")
    print(f"{name} {size}px, {len(s['mean'])} seeds: coverage {coverage:.3f} in [{c_lo:.2f}, {c_hi:.2f}], "
          f"mean opacity {mean:.3f} in [{m_lo:.2f}, {m_hi:.2f}], correlation length {corr:.1f} px "
          f"in [{size / 16:.0f}, {size / 6:.0f}]")
    assert c_lo <= coverage <= c_hi
    assert m_lo <= mean <= m_hi
    assert size / 16 <= corr <= size / 6


@pytest.mark.parametrize("name", ["thin", "big"])
def test_correlation_length_scales_with_tile(stats, name):
    ratio = stats[name, 1024]["corr"].mean() / stats[name, 256]["corr"].mean()
    print(f"{name}: correlation length 1024 px / 256 px = {ratio:.2f}")
    assert 2.5 <= ratio <= 5.5


# ----------------------------------------------------------------------------- CLI

@pytest.fixture
def small_png(tmp_path):
    path = tmp_path / "tile.png"
    Image.fromarray(np.asarray(_ground() * 255).astype(np.uint8)).save(path)
    return path


def test_cli_writes_cloudy_image_and_opacity_map(small_png, tmp_path, capsys):
    out, omap = tmp_path / "cloudy.png", tmp_path / "opacity.png"
    assert cli.main([str(small_png), str(out), "--preset", "BIG", "--seed", "3", "--opacity-map", str(omap)]) == 0
    cloudy, grey = np.array(Image.open(out)), np.array(Image.open(omap))
    assert cloudy.shape == (H, W, 3) and cloudy.dtype == np.uint8 and grey.shape == (H, W)
    assert grey.max() > 200 and grey.min() < 30  # BIG spans opacity 0..1
    assert "wrote" in capsys.readouterr().out
    again, again_map = tmp_path / "again.tif", tmp_path / "again_map.tif"  # same seed, TIFF: same pixels
    argv = [str(small_png), str(again), "--preset", "big", "--seed", "3", "--opacity-map", str(again_map)]
    assert cli.main(argv) == 0
    import tifffile

    np.testing.assert_array_equal(tifffile.imread(again), cloudy)
    float_map = tifffile.imread(again_map)
    assert float_map.dtype == np.float32 and np.abs(float_map * 255 - grey).max() <= 0.5 + 1e-3
    clear = tmp_path / "clear.jpg"
    assert cli.main([str(small_png), str(clear), "--opacity", "0"]) == 0
    assert np.abs(np.array(Image.open(clear), np.int16) - np.array(Image.open(small_png))).mean() < 3  # JPEG
    shadow = tmp_path / "shadow.png"
    assert cli.main([str(small_png), str(shadow), "--opacity", "0", "--shadows"]) == 0
    assert np.all(np.array(Image.open(shadow)) <= np.array(Image.open(small_png)))
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("case", ["missing", "preset", "opacity", "extension"])
def test_cli_errors_exit_2_with_one_line(small_png, tmp_path, capsys, case):
    out = tmp_path / "out.png"
    argv = {"missing": [str(tmp_path / "nope.png"), str(out)],
            "preset": [str(small_png), str(out), "--preset", "cumulus"],
            "opacity": [str(small_png), str(out), "--opacity", "1.5"],
            "extension": [str(small_png), str(tmp_path / "out.bmp")]}[case]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert {"missing": "nope.png", "preset": "cumulus", "opacity": "1.5", "extension": "out.bmp"}[case] in err[0]
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))
