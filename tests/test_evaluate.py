"""Region perturbation / AOPC (Samek et al. 2017) and the parameter-randomization check (Adebayo et
al. 2018) against known answers: linear models whose relevant pixels are known by construction, and
hand-computed rankings and curves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import CNN
from scipy import stats

import jaxdtd
from jaxdtd import baselines as B
from jaxdtd import evaluate as E


def linear(w, x):
    """One class score ``sum(w * x)`` plus a constant second class, on NHWC (or NHW) images."""
    s = jnp.sum(w * x, axis=tuple(range(1, x.ndim)))
    return jnp.stack([s, jnp.zeros_like(s)], axis=-1)


# the 4x4 example: tile sums with region=2 are top-left 1, top-right 7, bottom-left 3, bottom-right -2
A = jnp.array([[1, 0, 2, 3], [0, 0, 1, 1], [1, 1, -1, 0], [1, 0, -1, 0]], jnp.float32)


def test_aopc_of_a_hand_made_curve():
    curve = jnp.array([[4.0, 2.0], [3.0, 2.0], [1.0, 0.0]])  # (L + 1, N) = (3, 2)
    # sample 0: (0 + 1 + 3) / 3, sample 1: (0 + 0 + 2) / 3
    np.testing.assert_allclose(E.aopc(curve, per_sample=True), [4 / 3, 2 / 3], rtol=1e-6)
    np.testing.assert_allclose(E.aopc(curve), 1.0, rtol=1e-6)


def test_region_ranks_region_2_on_4x4():
    ranks = E.region_ranks(A[None], region=2)
    expected = np.array([[2, 2, 0, 0], [2, 2, 0, 0], [1, 1, 3, 3], [1, 1, 3, 3]])
    np.testing.assert_array_equal(ranks[0], expected)
    np.testing.assert_array_equal(
        E.region_ranks(A[None], region=2, order="least_relevant_first")[0], 3 - expected
    )
    # channels are summed: the same map split over two channels ranks the same
    two = jnp.stack([A - 1.0, jnp.ones_like(A)], axis=-1)[None]
    np.testing.assert_array_equal(E.region_ranks(two, region=2)[0], expected)
    # a random order is a permutation of the tiles, constant on each tile
    r = E.region_ranks(jnp.zeros((3, 4, 4)), region=2, order="random", key=jax.random.key(1))
    for sample in np.asarray(r):
        assert sorted(sample[::2, ::2].ravel()) == [0, 1, 2, 3]
        np.testing.assert_array_equal(sample, np.kron(sample[::2, ::2], np.ones((2, 2), int)))


def test_region_ranks_with_partial_tiles():
    a = jnp.arange(25.0).reshape(1, 5, 5)  # tiles of 2: 3 x 3, the last row/column 1 pixel wide
    ranks = np.asarray(E.region_ranks(a, region=2))[0]
    tile = lambda i, j: a[0, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].sum()
    sums = np.array([[tile(i, j) for j in range(3)] for i in range(3)])
    order = np.argsort(-sums.ravel(), kind="stable")
    expected_tile_rank = np.argsort(order).reshape(3, 3)
    np.testing.assert_array_equal(ranks, np.kron(expected_tile_rank, np.ones((2, 2), int))[:5, :5])


def test_zero_perturbation_curve_by_hand():
    x = jnp.ones((1, 4, 4))
    # MoRF: f = 9, then remove 7, 3, 1, -2
    curve = E.region_perturbation(linear, A, x, attribution=A[None], target=0, region=2, perturbation="zero")
    np.testing.assert_allclose(curve[:, 0], [9, 2, -1, -2, 0], atol=1e-6)
    lerf = E.region_perturbation(
        linear,
        A,
        x,
        attribution=A[None],
        target=0,
        region=2,
        perturbation="zero",
        order="least_relevant_first",
    )
    np.testing.assert_allclose(lerf[:, 0], [9, 11, 10, 7, 0], atol=1e-6)
    short = E.region_perturbation(
        linear, A, x, attribution=A[None], target=0, region=2, perturbation="zero", steps=2
    )
    np.testing.assert_allclose(short[:, 0], [9, 2, -1], atol=1e-6)
    # AOPC of the MoRF curve: (0 + 7 + 10 + 11 + 9) / 5
    np.testing.assert_allclose(E.aopc(curve), 37 / 5, rtol=1e-6)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(6, 6, 3)), jnp.float32)
    x = jnp.asarray(rng.uniform(size=(4, 6, 6, 3)), jnp.float32)
    return w, x


@pytest.mark.parametrize("region", [1, 4])
def test_zero_perturbation_curve_of_linear_model(images, region):
    """f(x^(k)) = f(x) - (sum of the k largest region contributions), computed with NumPy."""
    w, x = images
    R = w * x  # gradient x input of the linear model: exact contributions
    curve = np.asarray(
        E.region_perturbation(linear, w, x, attribution=R, target=0, region=region, perturbation="zero")
    )
    contrib = np.asarray(R).sum(-1)
    n_side = -(-6 // region)
    assert curve.shape == (n_side * n_side + 1, 4)
    for n in range(4):
        tiles = [
            contrib[n, i * region : (i + 1) * region, j * region : (j + 1) * region].sum()
            for i in range(n_side)
            for j in range(n_side)
        ]
        drop = np.concatenate([[0.0], np.cumsum(sorted(tiles, reverse=True))])
        np.testing.assert_allclose(curve[:, n], contrib[n].sum() - drop, rtol=1e-5, atol=1e-4)
    # removing the most relevant regions first is the steepest descent there is
    rnd = E.random_baseline(linear, w, x, target=0, region=region, perturbation="zero", repetitions=4)
    lerf = E.region_perturbation(
        linear,
        w,
        x,
        attribution=R,
        target=0,
        region=region,
        perturbation="zero",
        order="least_relevant_first",
    )
    assert float(E.aopc(curve)) > float(E.aopc(rnd)) > float(E.aopc(lerf))


def test_relevant_patch_is_found_with_uniform_noise():
    """Only a 3x3 patch of bright pixels matters: MoRF destroys it first, random later, LeRF last."""
    rng = np.random.default_rng(1)
    w = np.zeros((8, 8, 1), np.float32)
    w[2:5, 3:6] = 1.0
    x = rng.uniform(0.0, 0.2, size=(6, 8, 8, 1)).astype(np.float32)
    x[:, 2:5, 3:6] = 1.0
    x[:, 0, 0] = 0.0  # the noise range [min, max] is [0, 1]
    w, x = jnp.asarray(w), jnp.asarray(x)
    R, _ = B.gradient_x_input(linear, w, x, target=0)
    opts = dict(target=0, region=1, steps=20, perturbation="uniform", key=jax.random.key(3))
    morf = E.region_perturbation(linear, w, x, attribution=R, **opts)
    lerf = E.region_perturbation(linear, w, x, attribution=R, order="least_relevant_first", **opts)
    rnd = E.random_baseline(linear, w, x, repetitions=8, **opts)
    assert float(E.aopc(morf)) > float(E.aopc(rnd)) > float(E.aopc(lerf))
    np.testing.assert_allclose(lerf, 9.0)  # pixels outside the patch do not count
    # after 9 steps the patch holds uniform noise only: f = sum of 9 draws from U(0, 1) per sample
    assert bool(jnp.all(morf[9] < 9.0)) and bool(jnp.all(morf[9:] == morf[9]))


def test_uniform_noise_range_and_determinism(images):
    w, x = images
    R = w * x
    opts = dict(attribution=R, target=0, region=2, perturbation="uniform")
    a = E.region_perturbation(linear, w, x, key=jax.random.key(5), **opts)
    b = E.region_perturbation(linear, w, x, key=jax.random.key(5), **opts)
    c = E.region_perturbation(linear, w, x, key=jax.random.key(6), **opts)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # with low = high = 0.5 every perturbed pixel is 0.5
    half = E.region_perturbation(linear, w, x, key=jax.random.key(5), low=0.5, high=0.5, **opts)
    np.testing.assert_allclose(half[-1], linear(w, jnp.full_like(x, 0.5))[:, 0], rtol=1e-5)


def test_jit_equals_eager_and_batch_size(images):
    w, x = images
    R = w * x
    opts = dict(target=0, region=2, perturbation="uniform", key=jax.random.key(7), repetitions=2)
    eager = E.region_perturbation(linear, w, x, attribution=R, **opts)
    jitted = jax.jit(lambda w, x, R: E.region_perturbation(linear, w, x, attribution=R, **opts))(w, x, R)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)
    chunked = E.region_perturbation(linear, w, x, attribution=R, batch_size=4, **opts)
    np.testing.assert_allclose(chunked, eager, rtol=1e-5, atol=1e-5)


def test_mean_and_blur_replacements(images):
    w, x = images
    R = w * x
    opts = dict(attribution=R, target=0, region=3)
    mean = E.region_perturbation(linear, w, x, perturbation="mean", **opts)
    channel_mean = jnp.broadcast_to(x.mean(axis=(1, 2), keepdims=True), x.shape)
    np.testing.assert_allclose(mean[0], linear(w, x)[:, 0], rtol=1e-5)
    np.testing.assert_allclose(mean[-1], linear(w, channel_mean)[:, 0], rtol=1e-5)
    blur = E.region_perturbation(linear, w, x, perturbation="blur", blur_sigma=1.0, **opts)
    np.testing.assert_allclose(blur[-1], linear(w, E.gaussian_blur(x, 1.0))[:, 0], rtol=1e-5)
    # the blur keeps constants and is a normalized Gaussian
    const = jnp.full((1, 5, 5, 2), 3.0)
    np.testing.assert_allclose(E.gaussian_blur(const, 1.5), const, rtol=1e-6)
    impulse = jnp.zeros((1, 9, 9, 1)).at[0, 4, 4, 0].set(1.0)
    blurred = np.asarray(E.gaussian_blur(impulse, 1.0))[0, :, :, 0]
    np.testing.assert_allclose(blurred.sum(), 1.0, rtol=1e-5)
    g = np.exp(-0.5 * np.arange(-3, 4) ** 2)
    np.testing.assert_allclose(blurred[1:8, 1:8], np.outer(g, g) / g.sum() ** 2, rtol=1e-5)


def test_errors(images):
    w, x = images
    with pytest.raises(ValueError, match="needs an attribution"):
        E.region_perturbation(linear, w, x, target=0)
    with pytest.raises(ValueError, match="perturbation"):
        E.region_perturbation(linear, w, x, attribution=x, perturbation="noise")
    with pytest.raises(ValueError, match="steps"):
        E.region_perturbation(linear, w, x, attribution=x, steps=100)


def test_rank_correlations_match_scipy():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(3, 20))
    a[0, :5] = 1.0  # ties
    b = rng.normal(size=(3, 20)) + a
    np.testing.assert_allclose(E.rankdata(a), stats.rankdata(a, axis=-1), rtol=1e-6)
    rho = [stats.spearmanr(a[i], b[i])[0] for i in range(3)]
    r = [stats.pearsonr(a[i], b[i])[0] for i in range(3)]
    np.testing.assert_allclose(E.spearman(a, b), rho, rtol=1e-5)
    np.testing.assert_allclose(E.pearson(a, b), r, rtol=1e-5)
    np.testing.assert_allclose(E.spearman(a, a**3), 1.0, rtol=1e-6)  # monotone: rank correlation 1
    np.testing.assert_allclose(E.spearman(a, -a), -1.0, rtol=1e-6)
    np.testing.assert_array_equal(E.pearson(a, np.ones_like(a)), 0.0)  # constant: defined as 0


def numpy_init(model, x, seed):
    """Variables with the shapes of ``model.init`` drawn by NumPy (fan-in scaled kernels, non-zero
    biases): ``model.init`` would compile a random-number program per parameter shape."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)

    def draw(s):
        scale = np.sqrt(2.0 / np.prod(s.shape[:-1])) if len(s.shape) > 1 else 0.1
        return jnp.asarray(rng.normal(0.0, scale, s.shape), s.dtype)

    return jax.tree_util.tree_map(draw, shapes)


@pytest.fixture(scope="module")
def cnn_numpy_init():
    """The CNN of tests/models.py with NumPy-drawn variables (seed 4) on 4 images (seed 3); not the
    ``cnn`` fixture of conftest.py (``model.init`` variables, 2 images)."""
    model = CNN()
    x = jnp.asarray(np.random.default_rng(3).uniform(size=(4, 8, 8, 3)), jnp.float32)
    return model, numpy_init(model, x, 4), x


def test_parameter_randomization_lrp(cnn_numpy_init):
    model, variables, x = cnn_numpy_init
    composite = jaxdtd.composites.EpsilonPlusFlat()
    explain = lambda v, x, t: jaxdtd.explain(model.apply, v, x, target=t, composite=composite)
    nothing = E.parameter_randomization(explain, variables, x, layers=[])
    assert nothing.layers == ((),)
    np.testing.assert_allclose(nothing.spearman, 1.0, rtol=1e-6)
    np.testing.assert_allclose(nothing.pearson, 1.0, rtol=1e-6)
    result = E.parameter_randomization(
        explain, variables, x, layers=["Dense_1", "Dense_0"], key=jax.random.key(1)
    )
    assert result.layers == ((), ("Dense_1",), ("Dense_1", "Dense_0"))
    assert result.spearman.shape == result.pearson.shape == (3, 4)
    np.testing.assert_allclose(result.spearman[0], 1.0, rtol=1e-6)
    assert float(result.spearman[1:].mean()) < 0.9, result.spearman
    assert float(result.spearman[2].mean()) < 0.9


def test_parameter_randomization_gradient(cnn_numpy_init):
    model, variables, x = cnn_numpy_init
    explain = lambda v, x, t: B.gradient(model.apply, v, x, target=t)
    result = E.parameter_randomization(
        explain, variables, x, target=0, layers=["Dense_1", "Dense_0", "Conv_1"], cascading=False,
        randomize="permute", absolute=True,
    )  # fmt: skip
    assert result.layers == ((), ("Dense_1",), ("Dense_0",), ("Conv_1",))
    np.testing.assert_allclose(result.spearman[0], 1.0, rtol=1e-6)
    assert bool(jnp.all(result.spearman[1:] < 0.95)), result.spearman
    # a callable randomizer: zeroing the top layer makes every gradient zero, correlation 0
    zero = lambda key, tree: jax.tree_util.tree_map(jnp.zeros_like, tree)
    zeroed = E.parameter_randomization(explain, variables, x, target=0, layers=["Dense_1"], randomize=zero)
    np.testing.assert_array_equal(zeroed.pearson[1], 0.0)
    with pytest.raises(KeyError, match="Dense_9"):
        E.parameter_randomization(explain, variables, x, target=0, layers=["Dense_9"])


def test_lrp_heatmap_beats_random_order_on_cnn(cnn_numpy_init):
    model, variables, x = cnn_numpy_init
    R, y = jaxdtd.explain(model.apply, variables, x, composite=jaxdtd.composites.EpsilonPlusFlat())
    target = jnp.argmax(y, axis=-1)
    opts = dict(target=target, region=2, perturbation="zero")
    morf = E.region_perturbation(model.apply, variables, x, attribution=R, **opts)
    lerf = E.region_perturbation(
        model.apply, variables, x, attribution=R, order="least_relevant_first", **opts
    )
    rnd = E.random_baseline(model.apply, variables, x, repetitions=4, **opts)
    np.testing.assert_allclose(morf[0], jnp.take_along_axis(y, target[:, None], 1)[:, 0], rtol=1e-5)
    assert float(E.aopc(morf)) > float(E.aopc(rnd)) > float(E.aopc(lerf))
