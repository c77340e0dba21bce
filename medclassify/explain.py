"""Grad-CAM (Selvaraju et al., 2017): which pixels pushed the model towards a class.

The heatmap is the ReLU of the feature maps weighted by the spatially averaged
gradient of the class *logit* (not the softmax probability, which saturates)
with respect to them.  The explained feature map is the one that feeds global
average pooling (``pool``): in the residual CNN that is the rectified output
of the last stage (main path plus shortcut), where ``models.last_conv_layer``
would give the main path's last convolution alone, before the shortcut is
added.  An ensemble (``m0_pool``,
``m1_pool``...) gets the sum of its members' maps; ``last_conv_layer`` is the
fallback for models whose pooled map is too small.

The gradient model is built once per loaded model (``explainer_for`` caches it)
and runs as a ``tf.function`` with a fixed signature, so one heatmap costs a few
milliseconds after the first trace (``GradCAM.warm_up``).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Optional

import numpy as np

#: A feature map smaller than this (per side) says nothing about *where*: look further back.
MIN_FEATURE_SIDE = 4
#: Heatmaps remembered per explainer (the app redraws the same image when a slider moves).
CACHE_SIZE = 256


def _side(tensor) -> int:
    shape = tensor.shape
    return min(int(shape[1] or 0), int(shape[2] or 0)) if len(shape) == 4 else 0


def target_tensors(model) -> list[tuple[object, str]]:
    """The 4-D feature maps Grad-CAM explains, each with a name for display.

    One per global-average-pooling layer (its input: the rectified feature map
    the classifier head reads), so an ensemble of members (``m0_pool``,
    ``m1_pool``...) gets one map per member, summed later.  Models whose pooled
    map is too small to say *where* (VGG16 on 32 px: 1x1) fall back to the
    last convolution with some spatial extent.
    """
    import keras

    from .models import last_conv_layer

    targets = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.GlobalAveragePooling2D):
            tensor = layer.input
            if _side(tensor) >= MIN_FEATURE_SIDE:
                targets.append((tensor, f"input of '{layer.name}'"))
    if targets:
        return targets
    layer = last_conv_layer(model)
    if _side(layer.output) >= MIN_FEATURE_SIDE:
        return [(layer.output, layer.name)]
    for candidate in reversed(model.layers):
        if (isinstance(candidate, keras.layers.Conv2D) and candidate.name != "vgg_preprocess"
                and _side(candidate.output) >= MIN_FEATURE_SIDE):
            return [(candidate.output, candidate.name)]
    return [(layer.output, layer.name)]


def target_tensor(model):
    """The first (for a single model: the only) explained feature map and its name."""
    return target_tensors(model)[0]


class GradCAM:
    """Grad-CAM for one model: ``GradCAM(model)(image_uint8, class_index) -> (H, W) heatmap in [0, 1]``."""

    def __init__(self, model):
        import keras
        import tensorflow as tf

        self.model = model
        targets = target_tensors(model)
        self.target_names = [name for _, name in targets]
        self.target_name = ", ".join(self.target_names)
        self.grad_model = keras.Model(model.inputs, [[t for t, _ in targets], model.get_layer("logits").output])
        self.input_shape = tuple(int(d) for d in model.inputs[0].shape[1:])
        size = self.input_shape[:2]

        def compute(image, class_index):
            with tf.GradientTape() as tape:
                maps, logits = self.grad_model(image, training=False)
                score = tf.gather(logits[0], class_index)
            grads = tape.gradient(score, maps)
            total = tf.zeros(size, tf.float32)
            for feature_map, grad in zip(maps, grads):
                if grad is None:  # checked once, when the function is traced
                    raise RuntimeError("Grad-CAM: the class logit does not depend on the explained feature map")
                weights = tf.reduce_mean(grad, axis=(1, 2))  # (1, channels): alpha_k
                cam = tf.nn.relu(tf.reduce_sum(feature_map * weights[:, None, None, :], axis=-1))  # (1, h, w)
                total += tf.image.resize(cam[..., None], size, method="bilinear")[0, ..., 0]
            return total

        signature = [tf.TensorSpec([1, *self.input_shape], tf.float32), tf.TensorSpec([], tf.int32)]
        # autograph=False: nothing to convert (Python loops over lists unroll when traced), and autograph would
        # write its generated source to /tmp
        self._compute = tf.function(compute, input_signature=signature, autograph=False)
        self._cache: OrderedDict[tuple[bytes, int], np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()

    def warm_up(self) -> "GradCAM":
        self(np.zeros(self.input_shape, dtype=np.uint8), 0)
        return self

    def raw(self, image: np.ndarray, class_index: int) -> np.ndarray:
        """The un-normalised class activation map (feature maps resized to the input size and summed)."""
        image = np.asarray(image)
        if image.ndim == 2:
            image = image[..., None]
        if image.shape != self.input_shape:
            raise ValueError(f"Grad-CAM expects an image of shape {self.input_shape}, got {image.shape}")
        cam = self._compute(image[None].astype(np.float32), np.int32(class_index))
        return cam.numpy()

    def __call__(self, image: np.ndarray, class_index: int) -> np.ndarray:
        image = np.ascontiguousarray(image)
        key = (image.shape, image.dtype.str, image.tobytes(), int(class_index))
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key].copy()
        heatmap = _normalise(self.raw(image, class_index))
        with self._cache_lock:
            self._cache[key] = heatmap
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return heatmap.copy()


_EXPLAINERS: dict[int, GradCAM] = {}
_EXPLAINERS_LOCK = threading.Lock()


def explainer_for(model) -> GradCAM:
    """One ``GradCAM`` per loaded model (keyed by identity; the cache keeps the model alive)."""
    key = id(model)
    with _EXPLAINERS_LOCK:
        explainer = _EXPLAINERS.get(key)
        if explainer is None or explainer.model is not model:
            explainer = _EXPLAINERS[key] = GradCAM(model)
        return explainer


def gradcam(model, image_uint8: np.ndarray, class_index: int) -> np.ndarray:
    """Heatmap (H, W) float32 in [0, 1] of ``class_index`` for one uint8 image (H, W, C) the model accepts."""
    return explainer_for(model)(image_uint8, class_index)


def _resize(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    cam = np.asarray(cam, dtype=np.float32)
    if cam.shape == tuple(size):
        return cam
    return np.asarray(Image.fromarray(cam).resize((size[1], size[0]), Image.Resampling.BILINEAR),
                      dtype=np.float32)


def _normalise(cam: np.ndarray) -> np.ndarray:
    cam = np.nan_to_num(np.maximum(np.asarray(cam, dtype=np.float32), 0.0))
    high = float(cam.max())
    if high <= 1e-12:
        return np.zeros_like(cam, dtype=np.float32)
    return np.clip(cam / high, 0.0, 1.0).astype(np.float32)


def colormap(heatmap: np.ndarray, name: str = "jet") -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 colours."""
    from matplotlib import colormaps

    values = np.clip(np.asarray(heatmap, dtype=np.float32), 0.0, 1.0)
    return (colormaps[name](values)[..., :3] * 255.0 + 0.5).astype(np.uint8)


def to_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    return image[..., :3]


def overlay(image: np.ndarray, heatmap: np.ndarray, opacity: float = 0.5, size: Optional[int] = None) -> np.ndarray:
    """Blend a colour-mapped heatmap over ``image`` -> RGB uint8.

    ``opacity`` 0 shows only the image, 1 only the heatmap.  With ``size`` the
    image is enlarged with nearest neighbour (the pixels the model saw) and the
    heatmap smoothly, to ``size`` x ``size`` for display.
    """
    from PIL import Image

    opacity = float(np.clip(opacity, 0.0, 1.0))
    rgb = to_rgb(image)
    heat = np.asarray(heatmap, dtype=np.float32)
    if size is not None:
        rgb = np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.NEAREST))
        heat = _resize(heat, (size, size))
    elif heat.shape != rgb.shape[:2]:
        heat = _resize(heat, rgb.shape[:2])
    colours = colormap(heat).astype(np.float32)
    blended = (1.0 - opacity) * rgb.astype(np.float32) + opacity * colours
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def with_colour_key(picture: np.ndarray, height: int = 10, gap: int = 4) -> np.ndarray:
    """``picture`` (RGB) with the heatmap's colour scale beneath it, low on the left, high on the right.

    Drawn into the same image so that the key cannot be separated from the map it explains.
    """
    picture = to_rgb(picture)
    width = picture.shape[1]
    key = np.repeat(colormap(np.linspace(0.0, 1.0, width, dtype=np.float32))[None], height, axis=0)
    space = np.full((gap, width, 3), 255, np.uint8)
    return np.concatenate([picture, space, key], axis=0)
