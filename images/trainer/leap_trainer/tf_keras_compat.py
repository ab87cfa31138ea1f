"""Workarounds that make Keras 3 `fit`/`evaluate` run under MultiWorkerMirroredStrategy.

Keras 3 (3.15 with TF 2.21, here) fails on the first batch of a multi-worker fit
(keras-team/keras#20585, tensorflow/tensorflow#72388) in two places:

1. `_maybe_symbolic_build` reduces the first distributed batch with an eager cross-worker
   MEAN just to learn its shapes; the collective strategy cannot convert that PerReplica
   value. Any one worker's local batch has the right shapes, so it is used instead.
2. `reduce_per_replica` reduces the scalar logs (loss, accuracy) with MEAN over axis=0,
   which a scalar does not have. They are reduced over all replicas with axis=None instead.

A third limit is not patched: with steps_per_execution > 1 Keras places the step (and its
all-reduce) inside tf.cond in a while loop, which collective ops do not support
("You must feed a value for placeholder"), so multi-worker runs use one step per execution.

Both patches touch private Keras code and are applied only for multi-worker runs; each
checks the code it replaces still exists, and fails with a clear message if Keras changed.
"""

from __future__ import annotations

import types

MULTI_WORKER_STEPS_PER_EXECUTION = 1


def patch_keras_for_multi_worker() -> None:
    """Process-wide fix 2 (idempotent)."""
    import keras.src.backend.tensorflow.trainer as tf_trainer
    from keras.src import tree

    original = getattr(tf_trainer, "reduce_per_replica", None)
    if original is None:
        raise RuntimeError(
            "this Keras version has no keras.src.backend.tensorflow.trainer.reduce_per_replica; "
            "leap_trainer.tf_keras_compat needs updating for multi-worker TensorFlow runs"
        )
    if getattr(original, "_leap_patched", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and _is_multi_worker(strategy):
            return tree.map_structure(lambda value: strategy.reduce("MEAN", value, axis=None), values)
        return original(values, strategy, reduction)

    reduce_per_replica._leap_patched = True
    tf_trainer.reduce_per_replica = reduce_per_replica


def patch_model_for_multi_worker(model) -> None:
    """Per-model fix 1: build from a local batch instead of an eager cross-worker reduce."""
    import tensorflow as tf
    from keras.src import tree

    if not hasattr(model, "_maybe_symbolic_build") or not hasattr(model, "_symbolic_build"):
        raise RuntimeError(
            "this Keras version changed Model._maybe_symbolic_build; "
            "leap_trainer.tf_keras_compat needs updating for multi-worker TensorFlow runs"
        )

    def local_value(value, strategy):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self.distribute_strategy
        if iterator is not None:
            for _, _, batches in iterator:
                batch = next(batches)
                data_batch = tree.map_structure(lambda value: local_value(value, strategy), batch)
                break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    model._maybe_symbolic_build = types.MethodType(maybe_symbolic_build, model)


def _is_multi_worker(strategy) -> bool:
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and strategy.extended._in_multi_worker_mode()
