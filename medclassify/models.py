"""Model builders (Keras functional API).

Every model takes uint8-range pixels (0..255) of the task's input shape and does
its own rescaling, so callers can never feed it differently in training and
serving.  Augmentation layers sit inside the model too; Keras runs them only
when ``training=True``.  The head ends in three named layers:

    logits -> temperature (Rescaling by 1/T) -> probabilities (softmax)

so temperature scaling is part of the saved model and every caller gets the
calibrated probabilities.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from .registry import TaskSpec, get_task

MODEL_KINDS = ("cnn", "vgg16")

# ImageNet channel means in BGR order, as keras.applications.vgg16.preprocess_input uses.
_VGG_BGR_MEANS = np.array([103.939, 116.779, 123.68], dtype=np.float32)


def _keras():
    import keras

    return keras


AUGMENTATION_POLICIES = ("default", "flips", "resample", "flips_resample")

#: ``resample``: the smallest side, as a fraction of the input's, a training image is reduced to before it is
#: enlarged back (a round trip through 13-28 px for a 28-px image).
RESAMPLE_MIN_SCALE = 0.45


def _resample_layer_class():
    """``RandomResample``, defined on first use so that importing this module does not import Keras."""
    global _RandomResample
    if _RandomResample is not None:
        return _RandomResample
    keras = _keras()
    import tensorflow as tf

    @keras.saving.register_keras_serializable(package="medclassify")
    class RandomResample(keras.layers.Layer):
        """Training only: for half the batches, reduce the images to a random side between
        ``min_scale`` and 1 of theirs (area averaging) and enlarge them back (bicubic); a scale that
        rounds to the full side leaves the batch as it is.

        This is the softening an image meets on its way into the model: a full-size
        upload is reduced to 28 px by a filter that need not be the one MedMNIST used,
        and a thumbnail may have been enlarged and compressed before it is uploaded.
        One scale per batch, since a batch is resized as one tensor.
        """

        def __init__(self, min_scale: float = RESAMPLE_MIN_SCALE, seed: Optional[int] = None, **kwargs):
            super().__init__(**kwargs)
            self.min_scale = float(min_scale)
            self.seed = seed
            self.seed_generator = keras.random.SeedGenerator(seed)

        def call(self, images, training=True):
            if not training:
                return images
            draws = keras.random.uniform((2,), seed=self.seed_generator)
            side = tf.shape(images)[1:3]
            scale = self.min_scale + (1.0 - self.min_scale) * draws[0]
            small = tf.maximum(tf.cast(tf.round(tf.cast(side, tf.float32) * scale), tf.int32), 1)
            softened = tf.image.resize(tf.image.resize(images, small, method="area"), side, method="bicubic")
            softened = tf.cast(tf.clip_by_value(softened, 0.0, 255.0), images.dtype)  # bicubic overshoots
            return tf.where(draws[1] < 0.5, softened, images)

        def compute_output_shape(self, input_shape):
            return input_shape

        def get_config(self):
            return {**super().get_config(), "min_scale": self.min_scale, "seed": self.seed}

    _RandomResample = RandomResample
    return RandomResample


_RandomResample = None


def augmentation_layers(spec: TaskSpec, policy: str = "default") -> list:
    """Augmentations that respect each modality.

    ``flips``: only lossless symmetries (horizontal and vertical flips) and whole-pixel
    shifts, which keep every 28-px image sharp -- arbitrary rotations and zooms
    interpolate, and at 28 px that blur costs detail.

    ``resample``: only ``RandomResample``, a resize round trip that softens the
    image as the app's own resizing may (a breast model trained without it moved
    its answers when a validation image was enlarged and reduced again).

    ``flips_resample``: ``flips`` followed by ``RandomResample`` (blood's lossless
    symmetries, plus the softening its flips-only models never saw).

    Blood cells have no preferred orientation, so all flips and full rotations
    are label-preserving; ultrasound has a top (the transducer), so only a
    horizontal flip and small rotations.  (No RandomBrightness: Keras 3.15 cannot
    save it to .h5.)
    """
    layers = _keras().layers
    if policy not in AUGMENTATION_POLICIES:
        raise ValueError(f"unknown augmentation policy {policy!r}; choose one of {AUGMENTATION_POLICIES}")
    if policy == "resample":
        return [_resample_layer_class()(name="aug_resample")]
    if policy in ("flips", "flips_resample"):
        return [
            layers.RandomFlip("horizontal_and_vertical" if spec.name == "blood" else "horizontal", name="aug_flip"),
            layers.RandomTranslation(0.1, 0.1, fill_mode="reflect", interpolation="nearest", name="aug_translate"),
        ] + ([_resample_layer_class()(name="aug_resample")] if policy == "flips_resample" else [])
    if spec.name == "blood":
        return [
            layers.RandomFlip("horizontal_and_vertical", name="aug_flip"),
            layers.RandomRotation(0.5, fill_mode="reflect", name="aug_rotate"),
            layers.RandomTranslation(0.08, 0.08, fill_mode="reflect", name="aug_translate"),
            layers.RandomZoom((-0.1, 0.1), fill_mode="reflect", name="aug_zoom"),
            layers.RandomContrast(0.1, value_range=(0, 255), name="aug_contrast"),
        ]
    return [
        layers.RandomFlip("horizontal", name="aug_flip"),
        layers.RandomRotation(0.04, fill_mode="reflect", name="aug_rotate"),
        layers.RandomTranslation(0.08, 0.08, fill_mode="reflect", name="aug_translate"),
        layers.RandomZoom((-0.12, 0.12), fill_mode="reflect", name="aug_zoom"),
        layers.RandomContrast(0.15, value_range=(0, 255), name="aug_contrast"),
    ]


def _augmented_input(spec: TaskSpec, augment: bool, augmentation: str):
    """The uint8-range image input and, when ``augment``, the training-only augmentation chain after it."""
    inputs = _keras().Input(shape=spec.input_shape, name="image")
    x = inputs
    if augment:
        for layer in augmentation_layers(spec, augmentation):
            x = layer(x)
    return inputs, x


def _head(x, spec: TaskSpec, dropout: float, normalize: bool = False):
    layers = _keras().layers
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    if normalize:
        x = layers.BatchNormalization(momentum=0.9, name="head_bn")(x)
    if dropout:
        x = layers.Dropout(dropout, name="head_dropout")(x)
    logits = layers.Dense(spec.num_classes, name="logits")(x)
    scaled = layers.Rescaling(1.0, name="temperature")(logits)
    return layers.Activation("softmax", dtype="float32", name="probabilities")(scaled)


def _conv_bn(x, filters: int, name: str, stride: int = 1):
    layers = _keras().layers
    x = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x)


def build_cnn(task: str | TaskSpec, augment: bool = True, widths: tuple[int, ...] = (32, 64, 128),
              dropout: float = 0.3, name: Optional[str] = None, augmentation: str = "default"):
    """Self-designed CNN: three stages of two 3x3 conv-BN-ReLU layers with a residual
    shortcut, max-pooling between stages, global average pooling."""
    keras = _keras()
    layers = keras.layers
    spec = get_task(task) if isinstance(task, str) else task
    inputs, x = _augmented_input(spec, augment, augmentation)
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(x)
    for stage, filters in enumerate(widths, start=1):
        if stage > 1:
            x = layers.MaxPooling2D(2, name=f"stage{stage}_pool")(x)
        shortcut = layers.Conv2D(filters, 1, use_bias=False, name=f"stage{stage}_proj")(x)
        x = _conv_bn(x, filters, f"stage{stage}a")
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"stage{stage}b_conv")(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"stage{stage}b_bn")(x)
        x = layers.Add(name=f"stage{stage}_add")([x, shortcut])
        x = layers.Activation("relu", name=f"stage{stage}_out")(x)
    outputs = _head(x, spec, dropout)
    return keras.Model(inputs, outputs, name=name or f"{spec.name}_cnn")


def vgg16_weights_path(weights: Optional[str] = None) -> str:
    """``weights`` if given, else ``$VGG16_WEIGHTS``, else Keras's ImageNet download."""
    return weights or os.environ.get("VGG16_WEIGHTS") or "imagenet"


def _imagenet_vgg16(keras, weights: str, input_size: int):
    """VGG16's convolutional base with ImageNet weights; a missing file or a failed download is a one-line
    ``DataError`` (Keras raises a bare ``Exception`` with the URL, or a ``ValueError`` about 'weights')."""
    from pathlib import Path

    from .data import DataError
    from .preprocessing import first_line

    if weights != "imagenet":
        weights = str(Path(weights).expanduser())
        if not Path(weights).is_file():
            raise DataError(f"VGG16 weights file {weights} not found (--vgg16-weights or $VGG16_WEIGHTS)")
    try:
        return keras.applications.VGG16(include_top=False, weights=weights, input_shape=(input_size, input_size, 3))
    except Exception as exc:
        if weights != "imagenet":
            raise DataError(f"VGG16 weights file {weights} could not be loaded ({first_line(exc)})") from None
        raise DataError(f"the VGG16 ImageNet weights could not be downloaded ({first_line(exc)}); set "
                        "VGG16_WEIGHTS (or --vgg16-weights) to a local vgg16 'notop' .h5") from None


def build_vgg16(task: str | TaskSpec, weights: Optional[str] = None, augment: bool = True,
                input_size: int = 32, dropout: float = 0.4, trainable_base: bool = False,
                name: Optional[str] = None, augmentation: str = "default"):
    """VGG16 ImageNet transfer model.

    The 28-px image is upsampled to ``input_size`` (VGG16 needs >= 32), grayscale
    is repeated to three channels, and VGG16's Caffe preprocessing (RGB->BGR,
    ImageNet mean subtraction) is a frozen 1x1 convolution, so the saved model
    contains only standard layers.  The VGG16 layers are inlined into this
    model rather than nested, so Grad-CAM can reach the last convolution.
    """
    keras = _keras()
    layers = keras.layers
    spec = get_task(task) if isinstance(task, str) else task
    inputs, x = _augmented_input(spec, augment, augmentation)
    x = layers.Resizing(input_size, input_size, interpolation="bilinear", name="upsample")(x)
    caffe = layers.Conv2D(3, 1, name="vgg_preprocess", trainable=False)
    x = caffe(x)
    kernel = np.zeros((1, 1, spec.channels, 3), dtype=np.float32)
    if spec.channels == 1:
        kernel[0, 0, 0, :] = 1.0
    else:
        for bgr, rgb in enumerate((2, 1, 0)):
            kernel[0, 0, rgb, bgr] = 1.0
    caffe.set_weights([kernel, -_VGG_BGR_MEANS])

    base = _imagenet_vgg16(keras, vgg16_weights_path(weights), input_size)
    for layer in base.layers[1:]:
        layer.trainable = trainable_base
        x = layer(x)
    # VGG16's pooled activations run into the hundreds: without normalisation the new head's first
    # steps blow up (measured: loss ~15 in the frozen epoch, 0.65 validation accuracy on blood)
    outputs = _head(x, spec, dropout, normalize=True)
    return keras.Model(inputs, outputs, name=name or f"{spec.name}_vgg16")


def set_base_trainable(model, trainable: bool, from_block: int = 1) -> None:
    """Unfreeze (or freeze) the VGG16 blocks ``from_block``..5 of a model from ``build_vgg16``."""
    for layer in model.layers:
        if layer.name.startswith("block"):
            block = int(layer.name[5])
            layer.trainable = trainable and block >= from_block


def with_temperature(model, temperature: float):
    """The same model (shared weights) whose softmax is applied to logits / T."""
    keras = _keras()
    layers = keras.layers
    logits = model.get_layer("logits").output
    scaled = layers.Rescaling(1.0 / float(temperature), name="temperature")(logits)
    outputs = layers.Activation("softmax", dtype="float32", name="probabilities")(scaled)
    return keras.Model(model.inputs, outputs, name=model.name)


def model_temperature(model) -> float:
    try:
        return 1.0 / float(model.get_layer("temperature").scale)
    except ValueError:
        return 1.0


def last_conv_layer(model):
    """The last 2-D convolution: the layer Grad-CAM explains."""
    keras = _keras()
    for layer in reversed(model.layers):
        # 1x1 convolutions are shortcut projections or VGG's channel preprocessing, not feature maps
        if isinstance(layer, keras.layers.Conv2D) and tuple(layer.kernel_size) != (1, 1):
            return layer
    raise ValueError(f"model {model.name} has no convolution layer")


def predict_probabilities(model, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """``model``'s outputs for a whole split, in batches, in inference mode.

    A direct call per batch rather than ``model.predict``, which builds a
    data pipeline each time; used by training (selection, calibration) and
    evaluation.
    """
    import tensorflow as tf

    outputs = []
    for start in range(0, len(images), batch_size):
        batch = tf.constant(images[start:start + batch_size], dtype=tf.float32)
        outputs.append(model(batch, training=False).numpy())
    return np.concatenate(outputs) if outputs else np.zeros((0, model.output_shape[-1]))


def load_model(path, task: str | TaskSpec | None = None):
    """Load a saved ``.h5``/``.keras`` model for inference (no optimizer state).

    With ``task``, a model built for the other task is refused with a one-line ``ValueError``
    (instead of a TensorFlow shape error many lines long at its first prediction), and a missing file
    with ``FileNotFoundError('model file X not found')`` (not h5py's "Unable to synchronously open file").
    """
    from pathlib import Path

    if not Path(path).is_file():
        raise FileNotFoundError(f"model file {path} not found")
    keras = _keras()
    model = keras.models.load_model(str(path), compile=False)
    if task is not None:
        spec = get_task(task) if isinstance(task, str) else task
        channels, classes = model.input_shape[-1], model.output_shape[-1]
        if (channels, classes) != (spec.channels, spec.num_classes):
            raise ValueError(f"{path} is not a {spec.name} model: it takes {channels}-channel images and gives "
                             f"{classes} classes; a {spec.name} model takes {spec.channels} and gives "
                             f"{spec.num_classes}")
    return model


def build_model(kind: str, task: str | TaskSpec, **kwargs):
    if kind == "cnn":
        return build_cnn(task, **kwargs)
    if kind == "vgg16":
        return build_vgg16(task, **kwargs)
    raise ValueError(f"unknown model kind {kind!r}; choose one of {MODEL_KINDS}")


def _defaults_to_training(layer) -> bool:
    """Whether ``layer.call`` runs in training mode when no ``training`` is given (Keras preprocessing layers)."""
    import inspect

    parameter = inspect.signature(layer.call).parameters.get("training")
    return parameter is not None and parameter.default is True


def _clone_inline(model, inputs, prefix: str = ""):
    """Clone ``model`` onto ``inputs`` with ``prefix`` on every layer name, weights copied.

    Augmentation layers are left out.  Keras preprocessing layers default to
    ``training=True`` when a model is called without a ``training`` argument, and
    the call records that argument, so a saved model that kept them (even as
    ``Identity``) would augment, and run BatchNorm on batch statistics, for any
    caller who forgets ``training=False``.
    """
    keras = _keras()

    def clone_layer(layer):
        config = layer.get_config()
        config["name"] = prefix + layer.name
        return layer.__class__.from_config(config)

    def call_layer(layer, *args, **kwargs):
        if layer.name.startswith(prefix + "aug_"):
            return args[0]
        kwargs.pop("training", None)
        if _defaults_to_training(layer):
            # recorded as training=True (VGG16's Resizing), it would put the BatchNorm and Dropout after it in
            # training mode on a bare call; it computes the same either way
            kwargs["training"] = False
        return layer(*args, **kwargs)

    structure = [inputs] if isinstance(model.input, list) else inputs
    clone = keras.models.clone_model(model, input_tensors=structure, clone_function=clone_layer,
                                     call_function=call_layer)
    for source_layer in model.layers:
        if source_layer.weights and not source_layer.name.startswith("aug_"):
            clone.get_layer(prefix + source_layer.name).set_weights(source_layer.get_weights())
    return clone


def inference_model(model):
    """The trained model without augmentation layers (identical predictions at inference)."""
    keras = _keras()
    inputs = keras.Input(shape=model.input_shape[1:], name="image")
    clone = _clone_inline(model, inputs)
    return keras.Model(inputs, clone.output, name=model.name)


def build_ensemble(members: list, name: Optional[str] = None):
    """One model averaging the logits of ``members`` (trained models of the same task).

    Each member is cloned inline with a ``m<i>_`` name prefix (no nested models),
    so the ensemble saves to a single .h5 of standard layers, Grad-CAM still finds
    a convolution, and ``feature_tensor`` gives the OOD rule the members' pooled
    features side by side.  The averaged logits go through the usual
    temperature -> probabilities head.
    """
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input(shape=members[0].input_shape[1:], name="image")
    clones = [_clone_inline(member, inputs, prefix=f"m{i}_") for i, member in enumerate(members)]
    logits = [clone.get_layer(f"m{i}_logits").output for i, clone in enumerate(clones)]
    # one member still gets a layer named "logits": temperature fitting and Grad-CAM look it up by name
    mean_logits = layers.Average(name="logits")(logits) if len(logits) > 1 else layers.Identity(name="logits")(logits[0])
    scaled = layers.Rescaling(1.0, name="temperature")(mean_logits)
    probabilities = layers.Activation("softmax", dtype="float32", name="probabilities")(scaled)
    return keras.Model(inputs, probabilities, name=name or "ensemble")


def pooled_features(model) -> list:
    """The pooled-feature tensors of ``model``: ``[pool]``, or each ensemble member's pool in layer order."""
    try:
        return [model.get_layer("pool").output]
    except ValueError:
        pass
    pools = [layer.output for layer in model.layers if layer.name.endswith("_pool")
             and isinstance(layer, _keras().layers.GlobalAveragePooling2D)]
    if not pools:
        raise ValueError(f"model {model.name} has no pooled feature layer")
    return pools


def feature_tensor(model):
    """The pooled features the OOD rule uses: ``pool``, or the members' pools side by side."""
    pools = pooled_features(model)
    return pools[0] if len(pools) == 1 else _keras().layers.Concatenate(name="pool_features")(pools)
