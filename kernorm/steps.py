"""The compiled training and evaluation steps, and the learning-rate schedule they follow.

Each step runs under a `tf.distribute` strategy as TensorFlow's custom-loop
guides write it: `strategy.run` on a replica function, the loss averaged over
the global batch, the replicas' sums reduced. Several steps run per call into
the compiled graph, which saves Python round trips.
"""

import keras
import tensorflow as tf

# The one-cycle schedule: a linear warm-up from lr / WARMUP_DIVISOR to lr over the
# first WARMUP_FRACTION of all steps, then a cosine decay to 0 at the last step.
WARMUP_FRACTION = 0.2
WARMUP_DIVISOR = 25


def learning_rate(config, steps_per_epoch):
    """The optimizer's learning rate for `config`: a float, or a schedule over the run's steps.

    "constant" keeps `config.lr`. "onecycle" rises linearly from
    `lr / WARMUP_DIVISOR` to `lr` over the first `WARMUP_FRACTION` of the
    steps, then falls along a half cosine to 0 at the last step.
    """
    if config.schedule == "constant":
        return float(config.lr)  # a config.json or grid file may hold an integer; Keras takes floats only
    total = config.epochs * steps_per_epoch
    warmup = max(1, round(total * WARMUP_FRACTION))
    return keras.optimizers.schedules.CosineDecay(
        config.lr / WARMUP_DIVISOR, decay_steps=max(1, total - warmup), alpha=0.0,
        warmup_target=config.lr, warmup_steps=warmup)


def _compile_runner(strategy, replica_fn):
    """A graph that runs `replica_fn` on `steps` batches and sums its [loss, correct, count]."""

    @tf.function
    def run(iterator, steps):
        totals = tf.zeros(3)
        for _ in tf.range(steps):
            sums = strategy.run(replica_fn, args=next(iterator))
            totals += strategy.reduce(tf.distribute.ReduceOp.SUM, sums, axis=None)
        return totals

    return run


def agree_on_overflow(grads):
    """Makes every replica's gradients non-finite when any replica's are.

    Keras 3's LossScaleOptimizer skips a step whose loss-scaled gradients
    overflowed, but under a strategy it judges each replica's own gradients
    before they are summed: replicas would then take different branches and
    their collective ops would no longer match. Adding NaN to all gradients
    when any replica overflowed (and 0 otherwise) makes them all skip together.
    Call it in a replica context.
    """
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
    overflowed = tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(finite, tf.float32))
    poison = tf.where(overflowed > 0, float("nan"), 0.0)
    return [g + tf.cast(poison, g.dtype) for g in grads]


def _sums(per_example_loss, logits, labels):
    correct = tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels)
    return tf.stack([tf.reduce_sum(per_example_loss), tf.reduce_sum(tf.cast(correct, tf.float32)),
                     tf.cast(tf.size(labels), tf.float32)])


def _training_loss(labels, logits, label_smoothing):
    """Per-image cross-entropy against targets smoothed by `label_smoothing` (plain when it is 0)."""
    if not label_smoothing:
        return keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    return keras.losses.categorical_crossentropy(tf.one_hot(labels, tf.shape(logits)[-1]), logits, from_logits=True,
                                                 label_smoothing=label_smoothing)


def make_steps(model, optimizer, strategy, label_smoothing=0.0):
    """The compiled training and evaluation graphs for `model`.

    Args:
        model, optimizer: what is trained, and how.
        strategy: the `tf.distribute` strategy the steps run under.
        label_smoothing: the training loss's targets are 1 − ε + ε/C for the true
            class and ε/C for the others (C classes); evaluation stays plain.

    Returns:
        `(train, evaluate)`: each takes a (distributed) dataset iterator and a
        step count and returns the summed cross-entropy, correct predictions and
        image count over those steps. `train` also updates the weights.
    """

    def train_step(images, labels):
        # The loss is the mean over the global batch: each replica divides its sum by the
        # global count (a last, smaller batch may split unevenly), and the optimizer sums
        # the replicas' gradients.
        global_batch = tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, tf.shape(labels)[0])
        with tf.GradientTape() as tape:
            logits = model(images, training=True)  # float32 under any precision: see build_model
            per_example = _training_loss(labels, logits, label_smoothing)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            if model.losses:  # the kernel regularizers' l1·Σ|w| + l2·Σw²
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            scaled = optimizer.scale_loss(loss)  # mixed_float16's loss scaling; the loss itself otherwise
        grads = tape.gradient(scaled, model.trainable_variables)
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            grads = agree_on_overflow(grads)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return _sums(per_example, logits, labels)

    def eval_step(images, labels):
        logits = model(images, training=False)
        per_example = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        return _sums(per_example, logits, labels)

    return _compile_runner(strategy, train_step), _compile_runner(strategy, eval_step)
