"""The built-in CNN and user-supplied Keras models (real TensorFlow)."""

import numpy as np
import pytest

from alliance import model
from alliance.data.schema import DataSchema

pytestmark = pytest.mark.slow


def test_builtin_cnn_has_the_documented_architecture():
    cnn = model.build_cnn()
    kinds = [type(layer).__name__ for layer in cnn.layers]
    assert kinds == [
        "Conv2D",
        "Conv2D",
        "MaxPooling2D",
        "Dropout",
        "Flatten",
        "Dense",
        "Dropout",
        "Dense",
    ]
    assert cnn.count_params() == 1_199_882
    assert [w.shape for w in cnn.get_weights()][:2] == [(3, 3, 1, 32), (32,)]
    assert cnn.loss == "sparse_categorical_crossentropy"


def test_init_stores_the_seed_once(store):
    first = model.init_alliance(store, seed=1)
    assert first["model"] == {"kind": "builtin", "name": "cnn"}
    assert first["parameters"] == 1_199_882
    seed = store.get_model(first["seedModelId"])
    assert sum(w.size for w in seed) == 1_199_882
    assert model.init_alliance(store, seed=2) == first  # never replaced


def test_a_users_keras_model_file(store, tmp_path):
    import keras

    small = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    small.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    path = tmp_path / "mine.keras"
    small.save(path)
    manifest = model.init_alliance(store, keras_file=path)
    assert manifest["model"]["kind"] == "keras" and manifest["parameters"] == 7850
    rebuilt = model.build(manifest["model"], store)
    assert [w.shape for w in rebuilt.get_weights()] == [(784, 10), (10,)]
    np.testing.assert_array_equal(
        rebuilt.get_weights()[0], store.get_model(manifest["seedModelId"])[0]
    )


def test_a_file_that_is_not_a_model_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.keras"
    bad.write_text("hello")
    with pytest.raises(model.ModelError, match=r"bad\.keras: not a loadable Keras model file"):
        model.load_keras_file(bad)


# --- the model contract (issue 12) ----------------------------------------------------------

DIGITS = DataSchema(feature_shape=(8, 8, 1), num_classes=10, max_value=16, scale=16)


def dense(input_shape, classes, compiled: str | None = None):
    import keras

    m = keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Flatten(),
            keras.layers.Dense(classes, activation="softmax"),
        ]
    )
    if compiled:
        m.compile(optimizer=compiled, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return m


def test_the_builtin_cnn_is_sized_for_the_schemas_images_and_recorded(store):
    manifest = model.init_alliance(store, seed=1, schema=DIGITS)
    assert manifest["model"] == {
        "kind": "builtin",
        "name": "cnn",
        "inputShape": [8, 8, 1],
        "numClasses": 10,
    }
    assert DataSchema.from_dict(manifest["dataSchema"]) == DIGITS
    cnn = model.build(manifest["model"])
    assert cnn.input_shape == (None, 8, 8, 1) and cnn.output_shape == (None, 10)
    with pytest.raises(model.ModelError, match=r"built-in cnn takes images.*\[20\].*--model"):
        model.builtin_definition(DataSchema(feature_shape=(20,), max_value=1, scale=1))


@pytest.mark.parametrize(
    "shape,classes,message",
    [
        (
            (28, 28, 1),
            10,
            r"input shape is \[28, 28, 1\] but the data's featureShape is \[8, 8, 1\]",
        ),
        ((8, 8, 1), 3, r"output shape is \[3\] but the data has 10 classes"),
    ],
)
def test_a_model_that_does_not_fit_the_data_is_refused_at_init(
    store, tmp_path, shape, classes, message
):
    path = tmp_path / "m.keras"
    dense(shape, classes).save(path)
    with pytest.raises(model.ModelError, match=message):
        model.init_alliance(store, keras_file=path, schema=DIGITS)
    assert store.get_alliance() is None  # nothing half-made


def test_an_uncompiled_model_is_compiled_and_a_compiled_one_keeps_its_settings(tmp_path):
    import warnings

    bare, sgd = tmp_path / "bare.keras", tmp_path / "sgd.keras"
    dense((8, 8, 1), 10).save(bare)
    trained = dense((8, 8, 1), 10, compiled="sgd")
    trained.fit(np.zeros((4, 8, 8, 1)), np.zeros(4), verbose=0)  # an optimizer with state
    trained.save(sgd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Skipping variable loading for optimizer" warning
        loaded_bare = model.load_keras_file(bare)
        loaded_sgd = model.load_keras_file(sgd)
    assert type(loaded_bare.optimizer).__name__ == "Adam"
    assert loaded_bare.loss == "sparse_categorical_crossentropy"
    assert type(loaded_sgd.optimizer).__name__ == "SGD"
    # A one-hot loss and no metrics in the file: the platform's loss and metric all the same.
    onehot = dense((8, 8, 1), 10)
    onehot.compile(optimizer="rmsprop", loss="categorical_crossentropy")
    onehot.save(tmp_path / "onehot.keras")
    loaded = model.load_keras_file(tmp_path / "onehot.keras")
    assert type(loaded.optimizer).__name__ == "RMSprop"
    assert loaded.loss == "sparse_categorical_crossentropy"
    loaded.fit(np.zeros((4, 8, 8, 1)), np.zeros(4), verbose=0)
    assert len(loaded.evaluate(np.zeros((4, 8, 8, 1)), np.zeros(4), verbose=0)) == 2
    loaded_bare.fit(np.zeros((4, 8, 8, 1)), np.zeros(4), verbose=0)  # trainable as loaded
