"""The built-in CNN and user-supplied Keras models (real TensorFlow)."""

import numpy as np
import pytest

from alliance import model

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
