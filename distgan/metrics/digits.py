"""The embedded digits' two networks: a judge of generated digits, and a feature space for their FID.

Are generated digits recognisable? A classifier trained on the real digits judges them (`evaluate`).

The classifier (a logistic regression) is trained on sklearn's real digits brought to the generator's
resolution exactly as the training pipeline brings them (8x8 PNG -> bilinear resize), so real
and generated images are judged in the same space. Reported: the fraction of samples it is
confident about, the classes covered and the class histogram; the same numbers for held-out
real digits are the reference.

`DigitFeatures` is the feature space of FID/KID on digits when no Inception file is given (and of the
stacked-digits mode count): a one-hidden-layer MLP (128 ReLU units) trained once on the real digits at
the model's resolution and cached as plain arrays ($DISTGAN_CACHE/eval/), its held-out accuracy
reported. Both train on the same split of the real digits (`split`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def real_digits(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """The real digits as (N, resolution * resolution) features in [-1, 1], as training sees them."""
    from PIL import Image

    from distgan.data import builtin

    x, y, _ = builtin.load("digits")
    out = np.stack(
        [np.asarray(Image.fromarray(img[..., 0]).resize((resolution, resolution), Image.BILINEAR)) for img in x]
    )
    return out.reshape(len(x), -1).astype(np.float32) / 127.5 - 1.0, y


def split(resolution: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, x_test, y_train, y_test): the real digits (as `real_digits`) split 3:1, stratified by
    class; the judges (this classifier and DigitFeatures below) train on the first part."""
    from sklearn.model_selection import train_test_split

    x, y = real_digits(resolution)
    return train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)


def fit_classifier(resolution: int, seed: int = 0):
    from sklearn.linear_model import LogisticRegression

    x_train, x_test, y_train, y_test = split(resolution, seed)
    clf = LogisticRegression(C=1.0, max_iter=5000).fit(x_train, y_train)
    return clf, x_test, y_test


def to_features(images: torch.Tensor) -> np.ndarray:
    """(N, 1, H, W) in [-1, 1] -> (N, H * W)."""
    return images.float().clamp(-1, 1).reshape(len(images), -1).numpy()


def summarize(probs: np.ndarray, threshold: float = 0.9) -> dict:
    pred = probs.argmax(1)
    conf = probs.max(1)
    confident = conf >= threshold
    hist = np.bincount(pred[confident], minlength=10)
    return {
        "n": int(len(probs)),
        "confident_fraction": float(confident.mean()),
        "mean_max_prob": float(conf.mean()),
        "classes_covered": int((hist > 0).sum()),
        "min_class_fraction": float(hist.min() / max(confident.sum(), 1)),
        "class_histogram": hist.tolist(),
    }


def evaluate(images: torch.Tensor, threshold: float = 0.9, seed: int = 0) -> dict:
    """Quality of generated digits, next to the same figures for held-out real digits."""
    clf, x_test, y_test = fit_classifier(images.shape[-1], seed)
    fake = summarize(clf.predict_proba(to_features(images)), threshold)
    real = summarize(clf.predict_proba(x_test), threshold)
    real["accuracy"] = float((clf.predict(x_test) == y_test).mean())
    return {"generated": fake, "real_heldout": real, "threshold": threshold}


class DigitFeatures:
    """A small MLP classifier of the real digits at one resolution; its hidden layer is the feature space."""

    def __init__(self, resolution: int, seed: int = 0):
        from distgan.files import cache_root

        path = cache_root() / "eval" / f"digits-mlp-r{resolution}-s{seed}.npz"
        if not path.is_file():
            self._train(resolution, seed, path)
        z = np.load(path)
        self.w1, self.b1, self.w2, self.b2 = z["w1"], z["b1"], z["w2"], z["b2"]
        self.test_accuracy = float(z["test_accuracy"])
        self.resolution = resolution

    @staticmethod
    def _train(resolution: int, seed: int, path: Path) -> None:
        from sklearn.neural_network import MLPClassifier

        x_tr, x_te, y_tr, y_te = split(resolution, seed)
        clf = MLPClassifier(hidden_layer_sizes=(128,), max_iter=500, random_state=seed).fit(x_tr, y_tr)
        from distgan import files

        arrays = dict(
            w1=clf.coefs_[0],
            b1=clf.intercepts_[0],
            w2=clf.coefs_[1],
            b2=clf.intercepts_[1],
            test_accuracy=clf.score(x_te, y_te),
        )
        files.write_atomic(path, lambda fh: np.savez(fh, **arrays))

    def features(self, images: torch.Tensor) -> np.ndarray:
        """(N, 1, R, R) in [-1, 1] -> (N, 128)."""
        x = images.float().clamp(-1, 1).reshape(len(images), -1).numpy().astype(np.float64)
        return np.maximum(x @ self.w1 + self.b1, 0.0)

    def probs(self, images: torch.Tensor) -> np.ndarray:
        logits = self.features(images) @ self.w2 + self.b2
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)
