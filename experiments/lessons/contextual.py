"""Static to contextual embeddings, layer by layer (Ethayarajh, 2019, "How Contextual are
Contextualized Word Representations?"), in a trained LM and a trained encoder.

  python -m experiments.lessons.contextual [--quick] [--workdir=DIR] [--seeds=N]

Two models train with the one training loop (experiments.train; the seeds of a model as one
vectorized program), then every layer l of their residual stream (tx.analysis.hidden_states:
layer 0 is the token embedding plus the position embedding, layer l the output of block l) is
measured on held-out sequences. For a word w seen in n contexts, with h_l(s, w) its
representation at layer l in sentence s:

  SelfSim_l(w)  = 1/(n² − n) Σ_{i≠j} cos(h_l(s_i, w), h_l(s_j, w))   (1: static; low: contextual)
  IntraSim_l(s) = 1/n Σ_i cos(h_l(s, w_i), s̄_l),  s̄_l = 1/n Σ_i h_l(s, w_i)
  baseline_l    = the mean cosine of two random occurrences of the held-out text (anisotropy)
  MEV_l(w)      = σ_1² / Σ σ_i² of w's occurrence matrix: what one static vector explains

averaged over the words seen ≥ MIN_COUNT times (SelfSim, MEV) and over the sentences of ≥ 2
words (IntraSim); the adjusted values subtract baseline_l, as Ethayarajh does for both. The
same is measured on each seed's initial parameters (the random-init control: the parameters
that seed's training starts from).

  lm       configs/lm.py:tokenizer=bpe,posemb=learn: the decoder-only LM on Python's pydoc
           text with a byte-level BPE of 2,048 tokens (subwords are closer to words than
           characters) and learned positions (as GPT-2, so that layer 0 holds the position;
           with rope it would be the static embedding alone). Held out: the last 10% of the
           text in windows of 128 tokens (103 sentences, 526 words seen ≥ 5 times).
  encoder  configs/seq2seq.py (task=reverse): the encoder of the encoder-decoder, bidirectional,
           with sinusoidal positions; 10 digit symbols. Held out: the 1,000 test sources
           (words: the symbols; <eos> and padding left out).

Both use LAYERS blocks instead of the configs' 2, so that there is a depth to look along; the
LM trains for its config's 500 BPE steps, the encoder-decoder for 1,000 (its config: 2,500;
reversal is learnt well before). The encoder is the bidirectional model here because tx trains
no masked LM (an EncoderClassifier learns labels, and MNIST-1D has no tokens that recur in
other contexts). Writes to --workdir (default runs/lesson-contextual[-quick]): one run
directory per model and seed (a rerun resumes or skips them), results.json (every seed's
values), results.md (mean ± std over seeds) and contextual_by_layer.png. --quick trains
1-layer, 16-wide models for 60 steps on 2 seeds: it checks the machinery and is no result.
The models are trained and measured float32 on the CPU; docs/lessons.md §5 reads the results.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from absl import app, flags, logging
import numpy as np

from experiments import library_log
from experiments import workdir as workdir_lib
from experiments.cli import exit_on_interrupt, fail, fail_unless_verbose, parse_flags

MIN_COUNT = 5  # occurrences a word needs in the held-out text for SelfSim and MEV.
LAYERS = 4  # blocks of each model (the configs have 2).
QUICK_STEPS = 60  # training steps with --quick.
METRICS = ('self_similarity', 'intra_similarity', 'baseline', 'self_similarity_adjusted',
           'intra_similarity_adjusted', 'mev')
TITLES = {'self_similarity': 'self-similarity', 'intra_similarity': 'intra-sentence similarity',
          'baseline': 'anisotropy baseline', 'self_similarity_adjusted': 'self-sim − baseline',
          'intra_similarity_adjusted': 'intra-sim − baseline',
          'mev': 'max explainable variance'}
SHOWN_WORDS = 6  # the most and least contextual words listed per model.


@dataclasses.dataclass(frozen=True)
class Model:
  """One model of the lesson: its config, the stack measured and how its inputs are read."""
  name: str
  label: str
  config: str  # a config file and its argument, as experiments.run takes them
  stack: str  # the key of tx.analysis.hidden_states
  method: str | None  # the model method that runs that stack
  first_word: int  # token ids below this are not words (padding, <bos>, <eos>), or 0
  steps: int  # training steps of the default run


MODELS = (
    Model('lm', 'LM (decoder, BPE)', 'configs/lm.py:tokenizer=bpe,posemb=learn', 'decoder',
          None, 0, 500),
    Model('encoder', 'seq2seq encoder', 'configs/seq2seq.py', 'encoder', 'encode', 3, 1000),
)


def define_flags():
  """The command's flags; defined only when run as a program."""
  flags.DEFINE_bool('quick', False, 'A smoke run: 1-layer, 16-wide models, 60 steps, 2 seeds.')
  flags.DEFINE_string('workdir', None, 'Output directory; default runs/lesson-contextual '
                      '(-quick with --quick). A rerun resumes or skips the trained runs.')
  flags.DEFINE_integer('seeds', None, 'Seeds per model (0..N-1); default 3, 2 with --quick.')
  flags.DEFINE_bool('verbose', False, 'Show full tracebacks.')


def model_config(model: Model, seed: int, quick: bool):
  """The training config of `model` for `seed`: its config file at LAYERS blocks and
  model.steps steps (quick: common.make_quick), evaluated on the test split at the end only."""
  import importlib

  from configs import common
  path, _, arg = model.config.partition(':')
  module = importlib.import_module('configs.' + os.path.splitext(os.path.basename(path))[0])
  c = module.get_config(arg or None)
  c.model.num_layers = LAYERS
  c.update(dict(total_steps=model.steps, eval_every=model.steps, checkpoint_every=model.steps,
                log_every=100))
  if quick:
    common.make_quick(c, QUICK_STEPS)
    if 'train_size' in c.data:  # seq2seq: a smaller set, made faster.
      c.data.train_size, c.data.test_size = 2000, 200
  c.evals = {'test': dict(type='task_metrics', at='eval')}
  c.seed = seed
  return c


def layer_metrics(h, words, valid, min_count: int = MIN_COUNT) -> dict:
  """Ethayarajh's measures of one layer: h [N, T, d] the representations of N sentences,
  words [N, T] their word ids, valid [N, T] the positions that count.

  self_similarity and mev: means over the words with ≥ min_count valid occurrences of
  tx.analysis.mean_pairwise_cosine and max_explainable_variance of their representations;
  intra_similarity: the mean over sentences of ≥ 2 words of intra_sentence_similarity;
  baseline: mean_pairwise_cosine of all valid positions; *_adjusted: minus the baseline.
  'by_word' maps each counted word to (occurrences, SelfSim).
  """
  from tx.analysis import (intra_sentence_similarity, max_explainable_variance,
                           mean_pairwise_cosine)
  h, words, valid = np.asarray(h, np.float64), np.asarray(words), np.asarray(valid, bool)
  flat, ids = h[valid], words[valid]
  order = np.argsort(ids, kind='stable')
  kinds, starts, counts = np.unique(ids[order], return_index=True, return_counts=True)
  by_word = {}
  mevs = []
  for word, start, count in zip(kinds, starts, counts):
    if count >= min_count:
      rows = flat[order[start:start + count]]
      by_word[int(word)] = (int(count), mean_pairwise_cosine(rows))
      mevs.append(max_explainable_variance(rows))
  if not by_word:
    raise ValueError(f'min_count={min_count}: no word occurs that often in the held-out text')
  sentences = valid.sum(-1) >= 2
  out = dict(self_similarity=float(np.mean([s for _, s in by_word.values()])),
             intra_similarity=float(intra_sentence_similarity(h, valid)[sentences].mean()),
             baseline=mean_pairwise_cosine(flat), mev=float(np.mean(mevs)))
  out['self_similarity_adjusted'] = out['self_similarity'] - out['baseline']
  out['intra_similarity_adjusted'] = out['intra_similarity'] - out['baseline']
  return out | {'words': len(by_word), 'by_word': by_word}


def train_and_measure(model: Model, workdir: str, seeds, quick: bool) -> dict:
  """Trains `model` for every seed (one vectorized program; finished runs are skipped) in
  WORKDIR/<name>/seed_<s>, then measures, with layer_metrics, every layer of the trained and
  of the initial parameters of each seed on the test split. Returns {'trained': [per seed:
  [per layer: metrics]], 'init': [...], 'eval': [per seed: the test metrics], 'run': the
  experiments.steps.Run}."""
  import contextlib

  import jax

  from experiments import steps
  from experiments.checkpoints import Checkpoints
  from experiments.runners import VmapRunner
  from experiments.train import train
  from tx.analysis import hidden_states
  configs = [model_config(model, s, quick) for s in seeds]
  dirs = [os.path.join(workdir, model.name, f'seed_{s}') for s in seeds]
  summaries, _ = train(configs, dirs, vectorize=len(configs) > 1)
  run = steps.setup(configs[0])
  layers = jax.jit(lambda p, x: hidden_states(run.model, {'params': p}, x,
                                              method=model.method)[model.stack])
  tokens = np.asarray(run.dataset.test['inputs'])
  valid = tokens >= model.first_word
  out = {'trained': [], 'init': [], 'eval': [], 'run': run}
  # Each seed's initial state, as experiments.train starts a vectorized group from it.
  starts = VmapRunner(run, [c.model.beta_scale for c in configs]).init(run, seeds)
  for start, c, d, summary in zip(starts, configs, dirs, summaries):
    ckpt = Checkpoints(d, best_metric=c.best_metric, best_mode=c.best_mode, reader=True)
    with contextlib.closing(ckpt):
      trained, _ = ckpt.restore(start, ckpt.steps()[-1])
    for state, params in (('trained', trained.params), ('init', start.params)):
      out[state].append([layer_metrics(h, tokens, valid) for h in layers(params, tokens)])
    out['eval'].append({k[len('eval/'):]: v for k, v in summary.items()
                        if k.startswith('eval/') and isinstance(v, float)})
  return out


def _token_names(run) -> dict:
  """{id: label} of the test split's tokens, for a text model; {} for others."""
  if 'tokenizer' not in run.dataset.info and 'chars' not in run.dataset.info:
    return {}
  from experiments.data.text import codec
  _, _, token_name = codec(run.dataset.info)
  tokens = np.asarray(run.dataset.test['inputs'])
  return {int(i): token_name(i) for i in np.unique(tokens)}


def summarize(values: list[list[dict]]) -> list[dict]:
  """Per layer, the mean and std (ddof 1; 0 for one seed) over seeds of every metric."""
  out = []
  for layer in zip(*values):
    row = {}
    for metric in METRICS:
      x = np.array([seed[metric] for seed in layer])
      row[metric] = {'mean': float(x.mean()), 'std': float(x.std(ddof=1)) if len(x) > 1 else 0.0}
    out.append(row)
  return out


def word_ranking(values: list[list[dict]], names: dict) -> list[tuple]:
  """(word, occurrences, mean SelfSim over seeds) at the top layer, least self-similar first."""
  top = [seed[-1]['by_word'] for seed in values]
  words = sorted(set.intersection(*(set(t) for t in top)))
  rows = [(names.get(w, str(w)), top[0][w][0], float(np.mean([t[w][1] for t in top])))
          for w in words]
  return sorted(rows, key=lambda r: r[2])


def plot(results: dict, path: str):
  """Each metric against the layer, mean ± std over seeds: one colour per model, solid
  trained, dashed at initialisation."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
  for metric, ax in zip(METRICS, axes.flat):
    for color, (name, res) in zip(('C0', 'C1', 'C2'), results['models'].items()):
      for state, style in (('trained', '-'), ('init', '--')):
        rows = res['summary'][state]
        mean = np.array([r[metric]['mean'] for r in rows])
        std = np.array([r[metric]['std'] for r in rows])
        layers = np.arange(len(rows))
        ax.plot(layers, mean, style, color=color, marker='o', ms=3,
                label=f'{res["label"]}, {"trained" if state == "trained" else "random init"}')
        ax.fill_between(layers, mean - std, mean + std, color=color, alpha=0.15, lw=0)
    ax.set_title(TITLES[metric])
    ax.set_xlabel('layer (0: embedding + position)')
    ax.set_xticks(range(len(rows)))
    ax.grid(alpha=0.3)
  axes.flat[0].legend(fontsize=8)
  fig.suptitle(f'How contextual is each layer? (Ethayarajh, 2019); mean ± std over '
               f'{results["seeds"]} seeds, held-out text')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def markdown(results: dict) -> str:
  """results.md: per model, the test metrics and a table of every metric by layer."""
  f = lambda s: f'{s["mean"]:.3f} ± {s["std"]:.3f}'
  lines = [f'# Static to contextual embeddings by layer ({results["seeds"]} seeds, mean ± std)',
           '', f'Words: seen ≥ {MIN_COUNT} times in the held-out text. Adjusted = minus the '
           'anisotropy baseline.', '']
  for res in results['models'].values():
    evals = {k: np.array([e[k] for e in res['eval']]) for k in res['eval'][0]}
    shown = ', '.join(f'{k} {v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0:.3f}'
                      for k, v in evals.items())
    lines += [f'## {res["label"]} ({res["config"]}, {res["steps"]} steps)', '',
              f'Test: {shown}. Words counted: {res["words"]}.', '']
    for state in ('trained', 'init'):
      lines += [f'{"Trained" if state == "trained" else "Random init (the same seeds)"}:', '',
                '| layer | ' + ' | '.join(TITLES[m] for m in METRICS) + ' |',
                '| --- |' + ' --- |' * len(METRICS)]
      for layer, row in enumerate(res['summary'][state]):
        lines.append(f'| {layer} | ' + ' | '.join(f(row[m]) for m in METRICS) + ' |')
      lines.append('')
    if res['ranking'] and len(res['ranking']) > 2 * SHOWN_WORDS:
      show = lambda rows: ', '.join(f'`{w}` {s:.2f} ({n})' for w, n, s in rows)
      lines += [f'Top layer, least self-similar words (SelfSim, occurrences): '
                f'{show(res["ranking"][:SHOWN_WORDS])}; most: '
                f'{show(res["ranking"][-SHOWN_WORDS:][::-1])}.', '']
  return '\n'.join(lines)


def run_lesson(workdir: str, seeds: int, quick: bool, models=MODELS) -> list[str]:
  """Trains and measures `models`; writes results.json, results.md and the plot; returns
  their paths."""
  if seeds < 1:
    raise ValueError(f'--seeds={seeds}; allowed: >= 1')
  import jax
  if not jax.config.jax_compilation_cache_dir:
    # A rerun (or a resumed one) compiles the same programs: a persistent cache in the
    # workdir compiles each once, as experiments.sweep does.
    jax.config.update('jax_compilation_cache_dir',
                      os.path.abspath(os.path.join(workdir, '.jax_cache')))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  start = time.time()
  results = {'seeds': seeds, 'quick': quick, 'min_count': MIN_COUNT, 'models': {}}
  for model in models:
    print(f'{model.name}: training {seeds} seed(s) in {workdir}/{model.name}', flush=True)
    res = train_and_measure(model, workdir, range(seeds), quick)
    steps = model_config(model, 0, quick).total_steps
    names = _token_names(res.pop('run'))
    results['models'][model.name] = {
        'label': model.label, 'config': model.config, 'steps': steps,
        'words': res['trained'][0][0]['words'], 'eval': res['eval'],
        'summary': {state: summarize(res[state]) for state in ('trained', 'init')},
        'ranking': word_ranking(res['trained'], names) if names else [],
        'per_seed': {state: [[{k: v for k, v in layer.items() if k != 'by_word'}
                              for layer in seed] for seed in res[state]]
                     for state in ('trained', 'init')}}
  results['wall_time_s'] = round(time.time() - start, 1)
  os.makedirs(workdir, exist_ok=True)
  paths = [os.path.join(workdir, n) for n in ('results.json', 'results.md',
                                               'contextual_by_layer.png')]
  with open(paths[0], 'w') as fh:
    json.dump(results, fh, indent=1)
  with open(paths[1], 'w') as fh:
    fh.write(markdown(results))
  plot(results, paths[2])
  return paths


def main(argv):
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}; use [--quick] [--workdir=DIR] [--seeds=N]')
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  workdir = f.workdir or ('runs/lesson-contextual' + ('-quick' if f.quick else ''))
  seeds = f.seeds if f.seeds is not None else 2 if f.quick else 3
  if seeds < 1:
    fail(f'--seeds={seeds}; allowed: an integer >= 1')
  print(f'workdir: {workdir}', flush=True)
  try:
    if not f.verbose:  # orbax's messages go to the workdir, as experiments.run sends them.
      os.makedirs(workdir, exist_ok=True)
      library_log.route_to(os.path.join(workdir, workdir_lib.LIBRARY_LOG))
    paths = run_lesson(workdir, seeds, f.quick)
  except Exception as e:
    fail_unless_verbose(e, f.verbose)
  print(open(paths[1]).read(), flush=True)
  print(f'wrote {", ".join(paths)}', flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(exit_on_interrupt(main, 'the runs trained so far are kept; the same command resumes'),
          flags_parser=parse_flags)
