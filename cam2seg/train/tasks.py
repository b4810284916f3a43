"""What each stage brings to the one fold loop (:func:`cam2seg.train.loop.train_loop_per_worker`): a plain dict registry.

A task is built from the loop config (``task(config)``) and supplies, with ``cfg`` its typed
config section (the fields of ``cam2seg.config._FoldTraining`` and its own):

* ``create_model()``, ``param_groups(core)`` (Adam's groups, each with its ``lr``) and
  ``lr_fields(lrs)`` (how the rates appear in a history row);
* ``size`` (HEIGHT, WIDTH) and ``decode(rows)``: manifest rows (:mod:`cam2seg.train.manifest`) ->
  (images ``uint8[N, h, w(, 3)]``, targets); ``observe(targets)`` sees the training targets as they
  are read and ``load_note()`` says what it saw, on the load line;
* ``augment(augment, images, targets)``, ``loss(logits, targets)`` (float32 logits);
* ``validate(core, source, device, amp)`` -> :class:`cam2seg.train.loop.Validation`;
* ``finish(core, keeper, source, device, amp, say)`` after the weight average ->
  :class:`cam2seg.train.loop.Finish`;

where ``source`` gives the fold's decoded batches, in memory or streamed
(:mod:`cam2seg.train.ingest`).
"""

from __future__ import annotations

from .classifier_task import ClassifierTask
from .segmenter_task import SegmenterTask

__all__ = ["TASKS"]

TASKS = {"classifier": ClassifierTask, "segmenter": SegmenterTask}
