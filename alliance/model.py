"""The alliance's model: the built-in CNN, or a user-supplied Keras model file.

TensorFlow is imported inside the functions that need it, so the coordinator (which only moves
arrays) never pays for it. The model *definition* is a small dict kept in ``alliance.json``:

    {"kind": "builtin", "name": "cnn"}            the base CNN for 28×28×1 images, 10 classes
    {"kind": "keras", "sha256": "<hex>"}          a .keras file stored under model-files/

The seed (initial) weights are written to the store once, when the alliance is initialised.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from alliance.store import Store

BUILTIN_CNN = {"kind": "builtin", "name": "cnn"}


class ModelError(ValueError):
    pass


def configure_threads(threads: int) -> None:
    """Cap TensorFlow's threads to this process's CPU share; call before any TF work.

    Several members on one machine each with default threading oversubscribe the cores and run
    several times slower; one op-parallel pool of ``threads`` and a single inter-op thread
    keeps each member to its share.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(max(1, threads))
    tf.config.threading.set_inter_op_parallelism_threads(1 if threads <= 1 else 2)


def build_cnn(input_shape: tuple[int, ...] = (28, 28, 1), num_classes: int = 10) -> Any:
    """The base CNN for handwritten digits (Keras' classic MNIST convnet)."""
    import keras
    from keras import layers

    model = keras.Sequential(
        [
            keras.Input(shape=input_shape),
            layers.Conv2D(32, 3, activation="relu"),
            layers.Conv2D(64, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Dropout(0.25),
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
            layers.Dropout(0.5),
            layers.Dense(num_classes, activation="softmax"),
        ],
        name="alliance_cnn",
    )
    compile_model(model)
    return model


def compile_model(model: Any) -> None:
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])


def build(definition: dict, store: Store | None = None) -> Any:
    """A compiled Keras model from its definition (a Keras file is fetched from the store)."""
    kind = definition.get("kind")
    if kind == "builtin" and definition.get("name") == "cnn":
        return build_cnn()
    if kind == "keras":
        if store is None:
            raise ModelError("a Keras model file needs the store to fetch it from")
        data = store.get_file("model-files", definition["sha256"], ".keras")
        return load_keras_bytes(data)
    raise ModelError(
        f"unknown model definition {definition!r}; use the built-in 'cnn' or a .keras file"
    )


def load_keras_file(path: Path) -> Any:
    import keras

    try:
        model = keras.models.load_model(path, compile=True)
    except Exception as exc:  # Keras raises many types for a bad file
        raise ModelError(f"{path}: not a loadable Keras model file: {exc}") from exc
    if not model.optimizer or not getattr(model, "loss", None):
        compile_model(model)
    return model


def load_keras_bytes(data: bytes) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.keras"
        path.write_bytes(data)
        return load_keras_file(path)


def init_alliance(
    store: Store, keras_file: Path | None = None, seed: int = 0, keras_object: str | None = None
) -> dict:
    """Create the bucket, store the model definition and the seed model, once.

    The model is the built-in CNN, a local ``keras_file``, or ``keras_object``: the key of a
    .keras file the user uploaded to the bucket (an Alliance's ``spec.model.kerasObject``).
    Idempotent: an initialised alliance is returned as it is, so the seed model is never
    replaced under a running federation.
    """
    store.ensure_bucket()
    manifest = store.get_alliance()
    if manifest is not None:
        return manifest
    import keras

    keras.utils.set_random_seed(seed)
    if keras_object is not None:
        data = store.get_bytes(keras_object)
        if data is None:
            raise ModelError(
                f"model.kerasObject: no object {keras_object!r} in bucket {store.bucket!r}: "
                "upload the .keras file there first"
            )
        model = load_keras_bytes(data)
        definition = {"kind": "keras", "sha256": store.put_file("model-files", data, ".keras")}
    elif keras_file is None:
        definition = dict(BUILTIN_CNN)
        model = build_cnn()
    else:
        model = load_keras_file(Path(keras_file))
        sha = store.put_file("model-files", Path(keras_file).read_bytes(), ".keras")
        definition = {"kind": "keras", "sha256": sha}
    seed_weights = [np.asarray(w) for w in model.get_weights()]
    manifest = {
        "model": definition,
        "seedModelId": store.put_model(seed_weights),
        "parameters": int(sum(w.size for w in seed_weights)),
        "createdAt": time.time(),
    }
    store.put_alliance(manifest)
    return manifest
