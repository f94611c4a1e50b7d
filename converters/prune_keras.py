"""Structured channel pruning of Keras 3 models, plus fine-tuning to win the accuracy back.

:func:`channel_prune_keras` rebuilds a ``Sequential`` or functional model (from its config)
with fewer ``filters``/``units`` in its ``Conv1D``/``Conv2D``/``SeparableConv2D``/``Dense``
layers and copies the surviving weights. It follows the same rules as
:func:`converters.prune_onnx.channel_prune_onnx` (channels_last layout):

* importance: L1 norm of each output filter, times the following ``BatchNormalization``'s
  ``|gamma| / sqrt(var + eps)``, normalised per layer and summed over a group;
* per-channel layers are sliced along: ``BatchNormalization`` (gamma, beta, moving mean and
  variance), ``DepthwiseConv2D`` with ``depth_multiplier=1`` (kernel and bias);
* pass-through layers keep the channel axis: activations, ``Dropout``-like layers, pooling
  (incl. global), ``ZeroPadding``/``Cropping``/``UpSampling``;
* consumers lose the matching input channels (``Conv*``/``Dense`` kernels, the depthwise and
  pointwise kernels of ``SeparableConv2D``); ``Flatten`` maps channel ``c`` of an
  ``(H, W, C)`` tensor to the columns ``(h * W + w) * C + c`` of the following ``Dense``;
* ``Concatenate`` on the channel axis: each input keeps its own channels at its offset;
* residual merges (``Add``, ``Subtract``, ``Multiply``, ``Average``, ``Maximum``,
  ``Minimum``): every producer joined this way forms one group pruned with the same indices;
* anything else (model outputs, ``Softmax``/``LayerNormalization`` over channels,
  ``Reshape``, ``Permute``, raw ``keras.ops`` in the graph, ``depth_multiplier > 1``, grouped
  convolutions, custom layers...) leaves the affected producers unpruned, and the report
  says why.

Pruning costs accuracy; :func:`finetune` trains the pruned model for a few epochs (a small
learning rate, the original training data or a sample of it: ``--finetune-data`` as an
``.npz`` with ``x`` and ``y``, read by :func:`load_finetune_data`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from converters import deps
from converters.model_stats import keras_stats
from converters.prune_onnx import (
    IntArray,
    PruneReport,
    SkippedLayer,
    _filter_l1,
    _flat_columns,
    _keep_indices,
    _n_keep,
    _Space,
    layer_rows,
)
from edge_runtime.errors import CalibrationError, ConversionError

__all__ = ["channel_prune_keras", "finetune", "load_finetune_data", "magnitude_prune_keras"]

log = logging.getLogger(__name__)

_PASS = {
    "Activation", "ReLU", "LeakyReLU", "ELU", "Dropout", "SpatialDropout1D", "SpatialDropout2D",
    "GaussianNoise", "GaussianDropout", "AlphaDropout", "ActivityRegularization", "Identity",
    "MaxPooling1D", "MaxPooling2D", "AveragePooling1D", "AveragePooling2D", "ZeroPadding1D",
    "ZeroPadding2D", "Cropping1D", "Cropping2D", "UpSampling1D", "UpSampling2D",
}  # fmt: skip
_GLOBAL_POOL = {
    "GlobalAveragePooling1D",
    "GlobalAveragePooling2D",
    "GlobalMaxPooling1D",
    "GlobalMaxPooling2D",
}
_MERGE = {"Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum"}
_PRODUCERS = {"Conv1D", "Conv2D", "SeparableConv2D", "Dense"}


def _import_keras() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    deps.tensorflow("Pruning and fine-tuning Keras models")  # Keras 3 runs on the TensorFlow backend
    import keras

    return keras


class _KAnalysis:
    """Channel spaces over a Keras functional graph (same model as the ONNX analysis)."""

    def __init__(self, model: Any, skip: set[str]) -> None:
        keras = _import_keras()
        self.keras = keras
        self.model = model
        self.prod_layers: list[Any] = []  # producer id -> layer
        self.parent: list[int] = []
        self.bad: dict[int, str] = {}
        self.bn_scale: dict[int, npt.NDArray[np.float32]] = {}
        self.spaces: dict[int, _Space] = {}  # id(KerasTensor) -> space
        # layer name -> [(weight name, axis, space)]
        self.slices: dict[str, list[tuple[str, int, _Space]]] = {}
        self.skip = skip
        graph = model._functional if hasattr(model, "_functional") else model
        by_depth = getattr(graph, "_nodes_by_depth", None)
        if by_depth is None:
            raise ConversionError(
                f"cannot walk the layers of {type(model).__name__} {model.name!r}: channel pruning supports "
                "built Sequential and functional Keras models (not subclassed models)"
            )
        for depth in sorted(by_depth, reverse=True):
            for node in by_depth[depth]:
                self._visit(node)
        for t in graph.outputs:
            sp = self.spaces.get(id(t))
            if sp is not None:
                self._mark(sp, "its channels reach a model output")

    def find(self, p: int) -> int:
        while self.parent[p] != p:
            self.parent[p] = self.parent[self.parent[p]]
            p = self.parent[p]
        return p

    def _union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def _mark(self, sp: _Space, reason: str) -> None:
        for p, _ in sp.segs:
            if p >= 0 and p not in self.bad:
                self.bad[p] = reason

    def groups(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for p in range(len(self.prod_layers)):
            out.setdefault(self.find(p), []).append(p)
        return out

    def _slice(self, layer: Any, weight: str, axis: int, sp: _Space) -> None:
        self.slices.setdefault(layer.name, []).append((weight, axis, sp))

    def _visit(self, node: Any) -> None:
        op = node.operation
        cls = type(op).__name__
        ins = list(node.input_tensors)
        outs = list(node.output_tensors)
        spaced = [self.spaces[id(t)] for t in ins if id(t) in self.spaces]
        what = f"{cls} {op.name!r}"
        is_layer = isinstance(op, self.keras.layers.Layer)
        if is_layer and cls in _PRODUCERS | {"DepthwiseConv2D"}:
            self._weight_layer(op, cls, ins, outs, spaced, what)
            return
        if not spaced:
            return
        if not is_layer:
            for sp in spaced:
                self._mark(sp, f"consumed by the keras.ops operation {what}, which pruning does not follow")
            return
        sp = spaced[0]
        if cls in _PASS or cls in _GLOBAL_POOL or cls in {"Softmax", "BatchNormalization"}:
            if len(spaced) != 1 or sp.flat is not None or sp.axis != len(ins[0].shape) - 1:
                self._mark(sp, f"consumed by {what} on a non-channel axis")
                return
            if cls == "Softmax":
                axes = op.axis if isinstance(op.axis, (list, tuple)) else [op.axis]
                if any(a % len(ins[0].shape) == sp.axis for a in axes):
                    self._mark(sp, f"normalised across channels by {what}")
                    return
            if cls == "Activation" and getattr(op.activation, "__name__", "") in ("softmax", "log_softmax"):
                self._mark(sp, f"normalised across channels by {what}")
                return
            if cls == "BatchNormalization":
                axis = op.axis if isinstance(op.axis, int) else -1
                if axis % len(ins[0].shape) != sp.axis:
                    self._mark(sp, f"normalised along a non-channel axis by {what}")
                    return
                for w in op.weights:
                    self._slice(op, w.name, 0, sp)
                if len(sp.segs) == 1 and sp.segs[0][0] >= 0:
                    named = {w.name: np.asarray(w.numpy()) for w in op.weights}
                    gamma = named.get("gamma")
                    var = named.get("moving_variance")
                    if gamma is not None and var is not None:
                        scale = np.abs(gamma) / np.sqrt(var + float(op.epsilon))
                        self.bn_scale[sp.segs[0][0]] = scale.astype(np.float32)
            out_axis = len(outs[0].shape) - 1
            self.spaces[id(outs[0])] = _Space(out_axis, sp.segs)
            return
        if cls in _MERGE:
            if len(spaced) != len(ins) or any(
                s.flat is not None or len(s.segs) != len(sp.segs) or s.axis != sp.axis for s in spaced
            ):
                for s in spaced:
                    self._mark(s, f"merged by {what} with a tensor that is not pruned along")
                return
            for s in spaced[1:]:
                for (p1, c1), (p2, c2) in zip(sp.segs, s.segs, strict=True):
                    if c1 != c2 or (p1 < 0) != (p2 < 0):
                        for s2 in spaced:
                            self._mark(s2, f"merged by {what} with a differently laid out tensor")
                        return
            for s in spaced[1:]:
                for (p1, _), (p2, _) in zip(sp.segs, s.segs, strict=True):
                    if p1 >= 0:
                        self._union(p1, p2)
            self.spaces[id(outs[0])] = sp
            return
        if cls == "Concatenate":
            rank = len(outs[0].shape)
            axis = int(op.axis) % rank
            if any(s.flat is not None or s.axis != axis for s in spaced):
                for s in spaced:
                    self._mark(s, f"concatenated along a non-channel axis by {what}")
                return
            segs: list[tuple[int, int]] = []
            for t in ins:
                if id(t) in self.spaces:
                    segs.extend(self.spaces[id(t)].segs)
                else:
                    segs.append((-1, int(t.shape[axis])))
            self.spaces[id(outs[0])] = _Space(axis, tuple(segs))
            return
        if cls == "Flatten" and sp.flat is None and len(ins[0].shape) >= 3:
            pre = tuple(int(d) if d is not None else 1 for d in ins[0].shape)
            if sp.axis != len(pre) - 1:
                self._mark(sp, f"flattened by {what} with channels not last")
                return
            self.spaces[id(outs[0])] = _Space(1, sp.segs, flat=pre, flat_axis=sp.axis)
            return
        for s in spaced:
            self._mark(s, f"consumed by {what}, which channel pruning does not support")

    def _weight_layer(
        self, op: Any, cls: str, ins: list[Any], outs: list[Any], spaced: list[_Space], what: str
    ) -> None:
        data_format = getattr(op, "data_format", "channels_last")
        for sp in spaced:
            if data_format != "channels_last" or (sp.axis != len(ins[0].shape) - 1 and sp.flat is None):
                self._mark(sp, f"read by {what} on a non-channel axis")
                continue
            if cls == "DepthwiseConv2D":
                if int(op.depth_multiplier) != 1:
                    self._mark(sp, f"read by {what} with depth_multiplier {op.depth_multiplier}")
                    continue
                self._slice(op, "kernel", 2, sp)
                if op.use_bias:
                    self._slice(op, "bias", 0, sp)
                self.spaces[id(outs[0])] = _Space(len(outs[0].shape) - 1, sp.segs)
                return
            if int(getattr(op, "groups", 1)) != 1:
                self._mark(sp, f"read by the grouped {what}")
                continue
            if sp.flat is not None and cls != "Dense":
                self._mark(sp, f"flattened tensor read by {what}")
                continue
            if cls == "SeparableConv2D":
                if int(op.depth_multiplier) != 1:
                    self._mark(sp, f"read by {what} with depth_multiplier {op.depth_multiplier}")
                    continue
                self._slice(op, "depthwise_kernel", 2, sp)
                self._slice(op, "pointwise_kernel", 2, sp)
            else:
                self._slice(op, "kernel", -2, sp)
        if cls == "DepthwiseConv2D":
            return
        if data_format != "channels_last" or int(getattr(op, "groups", 1)) != 1:
            return
        pid = len(self.prod_layers)
        self.prod_layers.append(op)
        self.parent.append(pid)
        if op.name in self.skip:
            self.bad[pid] = "listed in skip"
        channels = int(op.units if cls == "Dense" else op.filters)
        self.spaces[id(outs[0])] = _Space(len(outs[0].shape) - 1, ((pid, channels),))


def _kernel_name(cls: str) -> str:
    return "pointwise_kernel" if cls == "SeparableConv2D" else "kernel"


def channel_prune_keras(
    model: Any,
    ratio: float,
    *,
    round_to: int = 1,
    min_channels: int = 1,
    skip: Iterable[str] = (),
) -> tuple[Any, PruneReport]:
    """A rebuilt copy of ``model`` with ``ratio`` of the prunable channels removed, and the report.

    ``round_to`` rounds each kept channel count up to a multiple (8/16 suit CPU kernels),
    ``min_channels`` is the fewest a layer keeps, ``skip`` names layers never to prune. The
    new model is not compiled; fine-tune it with :func:`finetune`. The report's
    ``max_abs_diff`` is ``None`` (pruning changes the function; evaluate accuracy instead).
    """
    _import_keras()
    if not 0.0 <= ratio < 1.0:
        raise ConversionError(f"ratio must be in [0, 1), got {ratio}; e.g. 0.3 removes 30% of the channels")
    if not getattr(model, "built", False):
        raise ConversionError("the Keras model is not built; call it once or give it an Input before pruning")
    an = _KAnalysis(model, set(skip))
    keep: dict[int, IntArray] = {}
    skipped: list[SkippedLayer] = []
    for root, members in an.groups().items():
        reason = next((an.bad[p] for p in members if p in an.bad), None)
        names = [an.prod_layers[p].name for p in members]
        chans = {int(getattr(an.prod_layers[p], "units", 0) or an.prod_layers[p].filters) for p in members}
        if reason is None and len(chans) != 1:
            reason = "residual group members have different channel counts"
        if reason is not None:
            suffix = f" (residual group {', '.join(names)})" if len(members) > 1 else ""
            skipped.extend(SkippedLayer(n, reason + suffix) for n in names)
            continue
        c = chans.pop()
        n_keep = _n_keep(c, ratio, round_to, min_channels)
        if n_keep >= c:
            skipped.extend(
                SkippedLayer(n, f"{c} channels: nothing to remove at ratio {ratio}") for n in names
            )
            continue
        imp = np.zeros(c, np.float32)
        for p in members:
            layer = an.prod_layers[p]
            kname = _kernel_name(type(layer).__name__)
            kernel = next(np.asarray(w.numpy()) for w in layer.weights if w.name == kname)
            v = _filter_l1(kernel, kernel.ndim - 1)
            if p in an.bn_scale:
                v = v * an.bn_scale[p]
            imp += v / (float(np.mean(v)) + 1e-12)
        keep[root] = np.sort(np.argsort(-imp, kind="stable")[:n_keep]).astype(np.intp)

    # rebuild from the config with the new widths
    cfg = model.get_config()
    new_width = {
        an.prod_layers[p].name: len(keep[an.find(p)])
        for p in range(len(an.prod_layers))
        if an.find(p) in keep
    }
    for entry in cfg["layers"]:
        entry.pop("build_config", None)  # recorded input shapes would pin the old widths
        lcfg = entry.get("config", {})
        name = lcfg.get("name")
        if name in new_width:
            lcfg["units" if entry.get("class_name") == "Dense" else "filters"] = new_width[name]
    try:
        new_model = type(model).from_config(cfg)
    except Exception as exc:
        raise ConversionError(
            f"cannot rebuild {model.name!r} from its config ({exc}); custom layers must be registered "
            "with keras.saving.register_keras_serializable"
        ) from exc
    # copy the surviving weights
    for old in _flat_layers(model):
        try:
            new = new_model.get_layer(old.name)
        except ValueError as exc:
            raise ConversionError(f"rebuilt model lacks layer {old.name!r}") from exc
        weights = {w.name: np.asarray(w.numpy()) for w in old.weights}
        ops_by_weight: dict[str, list[tuple[int, IntArray]]] = {}
        if old in an.prod_layers:
            p = an.prod_layers.index(old)
            if an.find(p) in keep:
                idx = keep[an.find(p)]
                kname = _kernel_name(type(old).__name__)
                ops_by_weight.setdefault(kname, []).append((-1, idx))
                if "bias" in weights:
                    ops_by_weight.setdefault("bias", []).append((0, idx))
        for wname, axis, sp in an.slices.get(old.name, []):
            ch = _keep_indices(sp, keep, an.find)
            idx = _flat_columns(sp, ch) if sp.flat is not None else ch
            ops_by_weight.setdefault(wname, []).append((axis, idx))
        values = []
        for w in old.weights:
            arr = weights[w.name]
            for axis, idx in ops_by_weight.get(w.name, []):
                arr = np.take(arr, idx, axis=axis)
            values.append(arr)
        try:
            new.set_weights(values)
        except ValueError as exc:
            raise ConversionError(
                f"internal pruning error while copying the weights of {old.name!r}: {exc}"
            ) from exc

    before, after = keras_stats(model), keras_stats(new_model)
    rows = layer_rows(before, after, new_width)
    report = PruneReport(
        method="channel",
        amount=ratio,
        params_before=before.params,
        params_after=after.params,
        macs_before=before.macs,
        macs_after=after.macs,
        file_bytes_before=0,
        file_bytes_after=0,
        gzip_bytes_before=0,
        gzip_bytes_after=0,
        layers=rows,
        skipped=skipped,
        importance="L1 filter norm (x BN scale)",
        src=str(model.name),
        dst=str(new_model.name),
        notes=[f"{len(keep)} channel groups pruned (round_to={round_to}); fine-tune with finetune()"],
    )
    log.info(
        "keras channel pruning %s: params %d -> %d, MACs %d -> %d, %d layers skipped",
        model.name,
        before.params,
        after.params,
        before.macs,
        after.macs,
        len(skipped),
    )
    return new_model, report


def _flat_layers(model: Any) -> list[Any]:
    return [layer for layer in model.layers if type(layer).__name__ != "InputLayer"]


def finetune(
    model: Any,
    x: Any,
    y: Any,
    epochs: int = 2,
    *,
    batch_size: int = 64,
    learning_rate: float = 5e-4,
    loss: Any = None,
    metrics: Sequence[Any] | None = None,
    validation_data: tuple[Any, Any] | None = None,
    verbose: int = 0,
) -> dict[str, list[float]]:
    """Train a (pruned) model for ``epochs`` epochs to recover accuracy; returns the history.

    ``loss`` defaults to sparse categorical cross-entropy for integer class labels ``y`` of
    shape ``(N,)`` and to categorical cross-entropy otherwise (pass your own loss for
    detection or regression models). Adam with a cosine-decayed ``learning_rate``.
    """
    keras = _import_keras()
    y_arr = np.asarray(y)
    if len(x) == 0 or len(x) != len(y_arr):
        raise CalibrationError(
            f"fine-tuning data has {len(x)} inputs and {len(y_arr)} labels; pass equally many (at least one)"
        )
    if loss is None:
        loss = "sparse_categorical_crossentropy" if y_arr.ndim == 1 else "categorical_crossentropy"
        metrics = ["accuracy"] if metrics is None else metrics
    steps = max(1, epochs * math.ceil(len(x) / batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, steps, alpha=0.05)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=loss, metrics=list(metrics or []))
    hist = model.fit(
        x,
        y_arr,
        epochs=epochs,
        batch_size=batch_size,
        shuffle=True,
        validation_data=validation_data,
        verbose=verbose,
    )
    reestimate_bn_statistics(model, x)
    return {k: [float(v) for v in vals] for k, vals in hist.history.items()}


def reestimate_bn_statistics(model: Any, x: Any, samples: int = 512) -> int:
    """Set every BatchNormalization layer's moving mean/variance from ``x``; returns the layer count.

    Fine-tuning moves the weights faster than the moving statistics follow (momentum 0.99): the
    pruned shapes96 scored 0.967 held-out top-1 with the statistics fit() left behind and 0.995
    with re-estimated ones (docs/performance.md). One training-mode pass over the first
    ``samples`` samples with momentum 0 makes each BN layer's statistics the mean and variance
    of its inputs on them (in training mode every layer already normalizes with those batch
    statistics, so downstream layers see what they will see at inference). Weights do not change.
    """
    keras = _import_keras()
    bns = [layer for layer in _flat_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
    xs = np.asarray(x[:samples])
    if not bns or len(xs) == 0:
        return 0
    saved = [bn.momentum for bn in bns]
    try:
        for bn in bns:
            bn.momentum = 0.0
        model(xs, training=True)
    finally:
        for bn, momentum in zip(bns, saved, strict=True):
            bn.momentum = momentum
    return len(bns)


def load_finetune_data(path: str | Path) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """``(x, y)`` from an ``.npz`` holding ``x``/``inputs`` (model inputs) and ``y``/``labels`` (targets)."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as data:
            xk = next((k for k in ("x", "inputs") if k in data), None)
            yk = next((k for k in ("y", "labels") if k in data), None)
            if xk is None or yk is None:
                raise CalibrationError(
                    f"{p} holds {sorted(data.files)}; --finetune-data needs an .npz with arrays 'x' (or "
                    "'inputs': model inputs) and 'y' (or 'labels': labels or targets)"
                )
            return np.asarray(data[xk]), np.asarray(data[yk])
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"cannot read fine-tuning data {p}: {exc}; pass an .npz file") from exc


def magnitude_prune_keras(model: Any, sparsity: float, *, skip: Iterable[str] = ()) -> dict[str, float]:
    """Zero the smallest-|w| ``sparsity`` of each Conv/Dense kernel in place (first and last skipped).

    Depthwise kernels and biases are never touched. Returns the achieved sparsity per layer.
    Unstructured zeros make a model compress better, not run faster (see
    :func:`converters.prune_onnx.magnitude_prune_onnx`).
    """
    if not 0.0 <= sparsity < 1.0:
        raise ConversionError(f"sparsity must be in [0, 1), got {sparsity}")
    skip_set = set(skip)
    eligible = [layer for layer in _flat_layers(model) if type(layer).__name__ in _PRODUCERS]
    out: dict[str, float] = {}
    for layer in eligible[1:-1]:
        if layer.name in skip_set:
            continue
        kname = _kernel_name(type(layer).__name__)
        for w in layer.weights:
            if w.name != kname:
                continue
            arr = np.asarray(w.numpy()).copy()
            flat = arr.reshape(-1)
            k = math.floor(sparsity * flat.size)
            if k > 0:
                flat[np.argpartition(np.abs(flat), k - 1)[:k]] = 0
            w.assign(arr)
            out[layer.name] = float(np.mean(arr == 0))
    return out
