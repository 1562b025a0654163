"""Write a model file for examples/digits: a small Keras 3 CNN for 8x8x1 digits, 10 classes.

    python examples/digits/make_model.py model.keras
    alliance run --data-dir examples/digits --schema examples/digits/schema.yaml \\
        --model model.keras ...

The model follows the platform's model contract (docs/member-commands.md, "The model"): its
input is one row's features in the schema's featureShape, [8, 8, 1] (pixel / 16, 0..1); its
output is 10 class probabilities (softmax); it is trained on the integer labels 0..9. It is
saved uncompiled, so the platform compiles it (adam, sparse categorical cross-entropy,
accuracy); with --learning-rate it is saved compiled with Adam at that rate, and the platform
keeps those settings.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def build(learning_rate: float | None = None):
    import keras
    from keras import layers

    model = keras.Sequential(
        [
            keras.Input(shape=(8, 8, 1)),  # the schema's featureShape
            layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(2),  # 4x4x32
            layers.Flatten(),
            layers.Dense(64, activation="relu"),
            layers.Dropout(0.2),
            layers.Dense(10, activation="softmax"),  # numClasses probabilities
        ],
        name="digits_cnn",
    )
    if learning_rate is not None:
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
    return model


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Write a small Keras CNN for 8x8x1 images and 10 classes (the "
        "examples/digits schema) to OUTPUT, for `alliance run --model OUTPUT` or "
        "`alliance init --model OUTPUT`.",
        epilog="See docs/member-commands.md, 'The model', for what a model file must be.",
    )
    parser.add_argument("output", type=Path, help="the .keras file to write, e.g. model.keras")
    parser.add_argument(
        "--learning-rate",
        type=float,
        metavar="LR",
        help="save it compiled with Adam(LR) (default: uncompiled; the platform compiles it "
        "with adam at Keras' default rate, 0.001)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    args = parser.parse_args()
    if args.output.suffix != ".keras":
        parser.error(f"{args.output}: the file name must end in .keras")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    keras.utils.set_random_seed(args.seed)
    model = build(args.learning_rate)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    model.save(args.output)
    print(
        f"wrote {args.output}: {model.count_params():,} parameters, "
        f"input {list(model.input_shape[1:])}, output {list(model.output_shape[1:])}"
    )


if __name__ == "__main__":
    main()
