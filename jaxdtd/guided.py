"""Explanation-guided training: "right for the right reasons" with LRP relevance as the penalty.

Ross et al. (IJCAI 2017) penalise the input gradient inside regions a model must not use; here the
penalty is the model's own *relevance* there, which is possible because jaxdtd's relevance is a
differentiable function of the weights (``jax.grad`` of a loss on the heatmap is its true
derivative).  The experiment, on scikit-learn's 8x8 digits:

* a *confounder*: a 2x2 mark in the top-left corner whose brightness is ``label / 9`` on every
  training image, so the corner alone predicts the label; on the test images the mark's brightness
  is random (unconfounded);
* two runs of the same CNN and optimizer (optax Adam): plain cross-entropy, and cross-entropy plus
  ``penalty * mean_n share_n`` with ``share_n = sum_(p in mark) |R_np| / sum_p |R_np|``, the share of
  the absolute relevance of sample ``n``'s true class on the mark (composite
  ``EpsilonGammaBox(0, 1)``, pixels in [0, 1]);
* reported for both: the accuracy on the unconfounded test images (did the model learn the digits?),
  the accuracy on confounded test images (does it still read the mark?), and the mean relevance share
  on the mark for the test images.

Run ``python -m jaxdtd.guided`` (about a minute on a laptop CPU); :func:`run` returns the numbers.
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import composites
from .api import explain
from .demo import fit, load_digits

__all__ = ["MARK", "confound", "mark_share", "run", "train"]

MARK = (slice(0, 2), slice(0, 2))  # rows, columns of the confounder


def confound(images: np.ndarray, labels: np.ndarray, correlated: bool, seed: int = 0) -> np.ndarray:
    """``images`` (N, 8, 8, 1) with the 2x2 corner mark: brightness ``label / 9`` when ``correlated``,
    else a random one of the same ten levels."""
    images = np.array(images, copy=True)
    if correlated:
        level = labels / 9.0
    else:
        level = np.random.default_rng(seed).integers(0, 10, len(labels)) / 9.0
    images[:, MARK[0], MARK[1], :] = level[:, None, None, None]
    return images


def mark_share(relevance: jax.Array) -> jax.Array:
    """Per sample: ``sum_(p in mark) |R_p| / (sum_p |R_p| + 1e-12)``."""
    absolute = jnp.abs(relevance).reshape(relevance.shape[0], *relevance.shape[1:])
    inside = absolute[:, MARK[0], MARK[1]].reshape(relevance.shape[0], -1).sum(-1)
    return inside / (absolute.reshape(relevance.shape[0], -1).sum(-1) + 1e-12)


def _relevance(model: Any, variables: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    relevance, _ = explain(
        model.apply, variables, x, target=y, composite=composites.EpsilonGammaBox(0.0, 1.0)
    )
    return relevance


def train(
    penalty: float,
    epochs: int = 30,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> tuple[Any, Any]:
    """Train :class:`~jaxdtd.demo.DigitsCNN` (:func:`jaxdtd.demo.fit`) on the confounded training
    digits with loss ``CE + penalty * mean(mark_share(R))`` (``R`` the relevance of the true class);
    returns ``(model, variables)``."""
    x_train, y_train, _, _ = load_digits(seed)
    x_train = confound(x_train, y_train, correlated=True)

    def relevance_penalty(model, v, x, y):
        return penalty * mark_share(_relevance(model, v, x, y)).mean()

    model, variables = fit(
        x_train, y_train, relevance_penalty if penalty else None, epochs=epochs, batch_size=batch_size,
        seed=seed, verbose=progress, desc=f"training (penalty {penalty:g})", stream=None,
    )  # fmt: skip
    return model, variables


def run(
    penalty: float = 10.0, epochs: int = 30, seed: int = 0, progress: bool = True
) -> dict[str, dict[str, float]]:
    """Both runs (``penalty`` 0 and ``penalty``); for each: ``accuracy`` on unconfounded test digits,
    ``accuracy_confounded`` with the mark telling the label, ``mark_share`` of the test relevance."""
    _, _, x_test, y_test = load_digits(seed)
    clean = confound(x_test, y_test, correlated=False, seed=seed + 1)
    marked = confound(x_test, y_test, correlated=True)
    report = {}
    for weight in (0.0, penalty):
        model, variables = train(weight, epochs=epochs, seed=seed, progress=progress)

        def accuracy(x, model=model, variables=variables):
            return float((jnp.argmax(model.apply(variables, x), -1) == y_test).mean())

        share = mark_share(_relevance(model, variables, jnp.asarray(clean), jnp.asarray(y_test)))
        report[f"penalty {weight:g}"] = {
            "accuracy": accuracy(clean),
            "accuracy_confounded": accuracy(marked),
            "mark_share": float(share.mean()),
        }
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--penalty", type=float, default=10.0, help="weight of the relevance penalty")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    report = run(args.penalty, args.epochs, args.seed)
    print(
        "| training | test accuracy (mark random) | test accuracy (mark = label) "
        "| relevance share on the mark |"
    )
    print("|---|---:|---:|---:|")
    for name, row in report.items():
        print(
            f"| {name} | {row['accuracy']:.3f} | {row['accuracy_confounded']:.3f} | {row['mark_share']:.3f} |"
        )


if __name__ == "__main__":
    main()
