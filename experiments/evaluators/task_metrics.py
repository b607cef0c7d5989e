"""The task's loss and accuracies on the test split, through the run's runner.

  loss           Σ_n w_n ℓ_n / Σ_n w_n, the mean cross-entropy (nats) over the examples
                 (classify), the non-pad target tokens (seq2seq) or every token (lm), without
                 label smoothing
  accuracy       classify: the fraction of examples whose argmax is the label
  token_accuracy seq2seq, lm: the fraction of target tokens whose argmax is right
  exact_match    seq2seq: the fraction of sequences with every target token right (teacher
                 forcing; experiments/evaluators/exact_match_by_length.py decodes for real)
  bits_per_char  lm: loss / ln 2

Sums and counts are accumulated over the test set on the devices and divided once, so the
numbers do not depend on the batch size or the device count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from experiments import tasks
from experiments.data import pipeline


def metric_names(task: str) -> tuple[str, ...]:
  return tasks.EVAL_METRICS[task]


def evaluate(context) -> list[dict]:
  run, runner = context.run, context.runner
  total = None  # summed on the devices, fetched once.
  size = run.config.eval_batch_size or run.config.batch_size
  with pipeline.eval_feed(run.dataset, size, run.config.data.get('workers', 0)) as batches:
    for batch in batches:
      sums = runner.eval_step(context.state, batch)
      total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  per_token = run.dataset.info.get('chars_per_token', 1.0)
  return [tasks.eval_metrics_of(run.task, tasks.summarize(s), per_token)
          for s in runner.fetch(total)]
