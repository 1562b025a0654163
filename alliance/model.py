"""The alliance's model: the built-in CNN, or a user-supplied Keras model file.

TensorFlow is imported inside the functions that need it, so the coordinator (which only moves
arrays) never pays for it. The model *definition* is a small dict kept in ``alliance.json``:

    {"kind": "builtin", "name": "cnn"}            the base CNN for 28×28×1 images, 10 classes
    {"kind": "builtin", "name": "cnn", "inputShape": [8, 8, 1], "numClasses": 10}
                                                   the same CNN sized for the alliance's data
    {"kind": "keras", "sha256": "<hex>"}          a .keras file stored under model-files/

The seed (initial) weights are written to the store once, when the alliance is initialised.

The model contract (docs/member-commands.md, "The model"): a Keras 3 model whose input is one
row's features in the schema's ``featureShape`` (batch dimension aside) and whose output is
``numClasses`` class probabilities (softmax), trained on integer labels. A model saved
uncompiled is compiled here (adam); a compiled one keeps its optimizer and its settings; the
loss and metric are always sparse categorical cross-entropy and accuracy. ``check_fits`` says,
before any training, when a model does not fit the data.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from alliance.data.schema import DataSchema
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


def builtin_definition(schema: DataSchema | None = None) -> dict:
    """The built-in CNN sized for ``schema``'s images (an [H, W, C] shape, H and W at least 6:
    two 3×3 convolutions and a 2×2 pooling must fit)."""
    schema = schema or DataSchema()
    shape = list(schema.feature_shape)
    if len(shape) != 3 or shape[0] < 6 or shape[1] < 6:
        raise ModelError(
            f"the built-in cnn takes images, a featureShape [height, width, channels] of at "
            f"least [6, 6, 1]; this data's is {shape}: give your own model (--model "
            "model.keras, docs/member-commands.md)"
        )
    if shape == [28, 28, 1] and schema.num_classes == 10:
        return dict(BUILTIN_CNN)
    return {**BUILTIN_CNN, "inputShape": shape, "numClasses": schema.num_classes}


def check_fits(model: Any, schema: DataSchema) -> None:
    """ModelError unless ``model`` takes rows of ``schema``'s featureShape and gives one
    probability per class: the mismatch is named before any training."""
    try:
        inputs, outputs = tuple(model.input_shape), tuple(model.output_shape)
    except (AttributeError, ValueError) as exc:
        raise ModelError(f"the model has no single input and output: {exc}") from None
    want = tuple(schema.feature_shape)
    if inputs[1:] != want:
        raise ModelError(
            f"the model's input shape is {list(inputs[1:])} but the data's featureShape is "
            f"{list(want)}: a model takes one row's features, shaped as the schema says"
        )
    if outputs[1:] != (schema.num_classes,):
        raise ModelError(
            f"the model's output shape is {list(outputs[1:])} but the data has "
            f"{schema.num_classes} classes (numClasses): the last layer must be "
            f"Dense({schema.num_classes}, activation='softmax')"
        )


def build(definition: dict, store: Store | None = None) -> Any:
    """A compiled Keras model from its definition (a Keras file is fetched from the store)."""
    kind = definition.get("kind")
    if kind == "builtin" and definition.get("name") == "cnn":
        shape = tuple(definition.get("inputShape") or (28, 28, 1))
        return build_cnn(shape, int(definition.get("numClasses") or 10))
    if kind == "keras":
        if store is None:
            raise ModelError("a Keras model file needs the store to fetch it from")
        data = store.get_file("model-files", definition["sha256"], ".keras")
        return load_keras_bytes(data)
    raise ModelError(
        f"unknown model definition {definition!r}; use the built-in 'cnn' or a .keras file"
    )


def load_keras_file(path: Path) -> Any:
    """The model in a .keras file, compiled: with the file's own compile settings, else ours.
    (Loaded with compile=False and compiled from the file's config: Keras would otherwise
    restore a saved optimizer's state and warn that it does not match.)"""
    import keras

    try:
        model = keras.models.load_model(path, compile=False)
        with zipfile.ZipFile(path) as archive:
            compile_config = json.loads(archive.read("config.json")).get("compile_config")
    except Exception as exc:  # Keras raises many types for a bad file
        raise ModelError(f"{path}: not a loadable Keras model file: {exc}") from exc
    optimizer = "adam"
    if compile_config and compile_config.get("optimizer"):
        try:
            model.compile_from_config(compile_config)
        except Exception as exc:
            raise ModelError(f"{path}: its compile settings do not load: {exc}") from exc
        optimizer = model.optimizer  # the file's, with its settings (e.g. learning rate)
    # The loss and metric are the platform's: labels are integers, and every validation
    # reports the loss and the accuracy.
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def load_keras_bytes(data: bytes) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.keras"
        path.write_bytes(data)
        return load_keras_file(path)


def init_alliance(
    store: Store,
    keras_file: Path | None = None,
    seed: int = 0,
    keras_object: str | None = None,
    schema: DataSchema | None = None,
) -> dict:
    """Create the bucket, store the model definition and the seed model, once.

    The model is the built-in CNN (sized for ``schema``), a local ``keras_file``, or
    ``keras_object``: the key of a .keras file the user uploaded to the bucket (an Alliance's
    ``spec.model.kerasObject``); it must fit ``schema`` (the default: mnist-in-csv), which is
    recorded with it so that members and ``predict`` find it. Idempotent: an initialised
    alliance is returned as it is, so the seed model is never replaced under a running
    federation.
    """
    store.ensure_bucket()
    manifest = store.get_alliance()
    if manifest is not None:
        return manifest
    import keras

    schema = schema or DataSchema()
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
        definition = builtin_definition(schema)
        model = build(definition)
    else:
        model = load_keras_file(Path(keras_file))
        check_fits(model, schema)
        sha = store.put_file("model-files", Path(keras_file).read_bytes(), ".keras")
        definition = {"kind": "keras", "sha256": sha}
    check_fits(model, schema)
    seed_weights = [np.asarray(w) for w in model.get_weights()]
    manifest = {
        "model": definition,
        "dataSchema": schema.to_dict(),
        "seedModelId": store.put_model(seed_weights),
        "parameters": int(sum(w.size for w in seed_weights)),
        "createdAt": time.time(),
    }
    store.put_alliance(manifest)
    return manifest
