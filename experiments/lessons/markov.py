"""Lesson 1: from Markov chains to attention with skips (docs/lessons.md, section 1).

  python -m experiments.lessons.markov [--quick] [--workdir=DIR] [--seeds=N]

The lecture's sentences (experiments/data/skips.py): what follows "ran" (down or please) is
decided by program / battery, k tokens back. Three kinds of model predict it:

  Markov order n: the count table N(w_{t−n+1..t}, w_{t+1}) of the training windows; the
    prediction is argmax_w N(context, w). Its context holds the decisive word only when
    k ≤ n − 1, so for larger k it can do no better than the prior, P(please | ran) = 0.6.
  Attention (configs/ablations/markov_skips.py): a one-layer, attention-only DecoderLM,
    logits_t = W_out·LN(e(w_t) + Σ_{j≤t} a_tj v_j), a_tj = softmax_j(β q_t·k_j): the query
    of "ran" can pick the decisive word at any distance (the lecture's mask over the
    (word, ran) features), trained for each seed through experiments.sweep's grid.

Writes into the workdir (default runs/lesson-markov[-quick]): the runs (seed=N/), results.json,
results.md (accuracy on the word after "ran", and the attention mass of the "ran" query on the
decisive word, by k; mean ± std over seeds; the same by seed), accuracy_vs_distance.png and
attention_heatmap.png (the lecture's two sentences, k = 7: every weight for the seed that
attends most to both decisive words, and the "ran" row of every seed).
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags, logging

from experiments.cli import exit_on_interrupt, fail, fail_unless_verbose, parse_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, 'configs', 'ablations', 'markov_skips.py')
ORDERS = (1, 2, 3)  # Markov orders fitted.
PARTS = ('decisive', 'ran', 'template', 'distractors')  # where the "ran" query's mass goes.


def ngram_counts(inputs: np.ndarray, targets: np.ndarray, order: int, vocab: int) -> np.ndarray:
  """counts[c, w] = #{(n, t) : context(n, t) = c, targets[n, t] = w}, over the positions
  t ≥ order − 1 of every window, the context being the `order` last inputs w_{t−order+1..t}
  as the index c = Σ_i w_{t−i}·V^i."""
  t = inputs.shape[1]
  index = sum(inputs[:, order - 1 - i:t - i] * vocab ** i for i in range(order))
  counts = np.zeros((vocab ** order, vocab), np.int64)
  np.add.at(counts, (index.ravel(), targets[:, order - 1:].ravel()), 1)
  return counts


def ngram_predict(counts: np.ndarray, inputs: np.ndarray, positions: np.ndarray,
                  order: int, vocab: int) -> np.ndarray:
  """argmax_w counts[context, w] at inputs[n, positions[n]] for every row n (the smallest id
  among ties)."""
  rows = np.arange(len(inputs))
  index = sum(inputs[rows, positions - i] * vocab ** i for i in range(order))
  return counts[index].argmax(-1)


def markov_hits(dataset, order: int) -> np.ndarray:
  """1 where the order-n table of the training windows predicts the test word after "ran"."""
  vocab = dataset.info['vocab_size']
  counts = ngram_counts(dataset.train['inputs'], dataset.train['targets'], order, vocab)
  test = dataset.test
  pred = ngram_predict(counts, test['inputs'], test['ran'], order, vocab)
  return (pred == test['targets'][np.arange(len(pred)), test['ran']]).astype(float)


def model_outputs(run, params, betas, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(logits [S, N, T, V], attention weights [S, N, Tq, Tk] averaged over heads) of the one
  attention layer, for S members (params with a leading member axis, their β scales), in one
  compiled program."""
  import jax
  import jax.numpy as jnp
  import tx

  def one(p, beta):
    model = run.model_for(beta)
    (weights,) = tx.attention_weights(model, {'params': p}, inputs).values()
    return model.apply({'params': p}, inputs), weights.mean(-3)

  out = jax.jit(jax.vmap(one))(params, jnp.asarray(betas, jnp.float32))
  return tuple(np.asarray(x) for x in out)


def attention_measures(test: dict, logits: np.ndarray, weights: np.ndarray) -> dict:
  """One member's model on the test set: 'hits' (argmax of the logits at "ran" is the word that
  follows it) and the mass of the query "ran" (weights [N, Tq, Tk]) on each of PARTS: the
  decisive word, "ran" itself, the template's other words, the distractors."""
  from experiments.data import skips
  rows = np.arange(len(test['ran']))
  hits = logits[rows, test['ran']].argmax(-1) == test['targets'][rows, test['ran']]
  query = weights[rows, test['ran']]  # [N, Tk]: a_{ran, j}
  keys = np.arange(query.shape[1])
  before = keys < test['ran'][:, None]
  distractor = np.isin(test['inputs'], [skips.ID[w] for w in skips.DISTRACTORS]) & before
  masks = {'decisive': keys == test['decisive'][:, None], 'ran': keys == test['ran'][:, None],
           'distractors': distractor}
  masks['template'] = before & ~distractor & ~masks['decisive']
  out = {'hits': hits.astype(float)}
  out.update({part: (query * masks[part]).sum(1) for part in PARTS})
  return out


def by_distance(values: np.ndarray, distance: np.ndarray, select=None) -> list[float]:
  """The mean of values[n] over the test rows at each distance k = 1..max (and `select`)."""
  select = np.ones(len(values), bool) if select is None else select
  return [float(values[(distance == k) & select].mean()) for k in range(1, distance.max() + 1)]


def is_program(test: dict) -> np.ndarray:
  """True for the test sentences whose decisive word is "program"."""
  from experiments.data import skips
  return test['inputs'][np.arange(len(test['ran'])), test['decisive']] == skips.ID['program']


def evaluate(context) -> list[dict]:
  """The lesson's evaluator (config.evals.after_ran, at='end'), one 'after_ran' entry per
  member for its summary.json: 'accuracy' on the word after "ran" by k; 'mass' of the "ran"
  query on each of PARTS, by sentence class (program, battery) and k, and 'mass_overall' over
  all k; 'lecture' the attention weights [sentence, query, key] on the lecture's two sentences
  (k = 7)."""
  test = context.run.dataset.test
  examples = lecture_sentences(test['inputs'].shape[1])
  logits, weights = model_outputs(context.run, context.params(), context.betas,
                                  np.concatenate([test['inputs'], examples]))
  n, distance, program = len(test['ran']), test['distance'], is_program(test)
  out = []
  for member_logits, member_weights in zip(logits, weights):
    m = attention_measures(test, member_logits[:n], member_weights[:n])
    classes = (('program', program), ('battery', ~program))
    out.append({'after_ran': {
        'accuracy': by_distance(m['hits'], distance),
        'mass': {c: {part: by_distance(m[part], distance, select) for part in PARTS}
                 for c, select in classes},
        'mass_overall': {c: {part: float(m[part][select].mean()) for part in PARTS}
                         for c, select in classes},
        'lecture': np.round(member_weights[n:], 5).tolist()}})
  return out


def mean_std(per_seed: list) -> dict:
  """{'mean', 'std', 'per_seed'} over the seeds (axis 0; std with ddof 1, 0 for one seed)."""
  x = np.asarray(per_seed, float)
  std = x.std(0, ddof=1) if len(x) > 1 else np.zeros_like(x[0])
  return {'mean': x.mean(0).tolist(), 'std': np.asarray(std).tolist(), 'per_seed': x.tolist()}


def lecture_sentences(seq_len: int) -> np.ndarray:
  """The lecture's two sentences (program, battery; k = 7), padded to seq_len ids."""
  from experiments.data import skips
  out = np.full((2, seq_len), skips.ID[skips.PAD_WORD], np.int32)
  for i, word in enumerate(skips.DECISIVE):
    ids = [skips.ID[w] for w in skips.sentence(word, 7, np.random.default_rng(0))]
    out[i, :len(ids)] = ids[:seq_len]
  return out


def run_lesson(workdir: str, quick: bool = False, seeds: int = 5, verbose: bool = False) -> dict:
  """Trains the config's seeds as one vectorized program in workdir/seed=N (through the sweep
  grid: finished seeds are not trained again; each summary.json holds its `evaluate` entry),
  fits the Markov tables, and writes results.json, results.md and the two PNGs; returns the
  results."""
  from experiments import library_log, tasks
  from experiments import workdir as workdir_lib
  from experiments.sweep import grid
  module, _ = grid.load(CONFIG)
  arg = f'seeds={seeds}' + (',quick' if quick else '')
  points = grid.expand(module, arg)
  os.makedirs(workdir, exist_ok=True)
  if not verbose:
    library_log.route_to(workdir_lib.library_log(workdir))
  with workdir_lib.locked([workdir]):
    rows = grid.run_all(module, arg, points, workdir, vectorize=True)
    dataset = tasks.load_dataset(module.get_config(arg))
    distance, program = dataset.test['distance'], is_program(dataset.test)
    for row in rows:
      if 'after_ran' not in row:  # a diverged run has no end-of-run measures.
        raise ValueError(f'seed {row["seed"]} in {row["workdir"]}: '
                         f'{row.get("diverged", "no after_ran measures in its summary.json")}')
    members = [row['after_ran'] for row in rows]
    results = {
        'command': 'python -m experiments.lessons.markov' + (' --quick' if quick else
                                                             f' --seeds={seeds}'),
        'seeds': [row['seed'] for row in rows],
        'steps': [row['steps'] for row in rows],
        'train_wall_time_s': max(row.get('wall_time_s', 0.0) for row in rows),
        'distances': list(range(1, int(distance.max()) + 1)),
        'test_per_distance': int((distance == 1).sum()),
        'prior': by_distance(program.astype(float), distance),
        'accuracy': {f'markov{n}': by_distance(markov_hits(dataset, n), distance)
                     for n in ORDERS},
        'attention_mass': {c: {part: mean_std([m['mass'][c][part] for m in members])
                               for part in PARTS} for c in ('program', 'battery')},
        'attention_mass_overall': {
            c: {part: mean_std([m['mass_overall'][c][part] for m in members]) for part in PARTS}
            for c in ('program', 'battery')}}
    results['accuracy']['attention'] = mean_std([m['accuracy'] for m in members])
    write_json(os.path.join(workdir, 'results.json'), results)
    write_markdown(os.path.join(workdir, 'results.md'), results)
    plot_accuracy(os.path.join(workdir, 'accuracy_vs_distance.png'), results)
    plot_heatmap(os.path.join(workdir, 'attention_heatmap.png'),
                 lecture_sentences(dataset.test['inputs'].shape[1]),
                 np.array([m['lecture'] for m in members]), results['seeds'])
  print(f'wrote results.json, results.md, accuracy_vs_distance.png, attention_heatmap.png in '
        f'{workdir}', flush=True)
  return results


def write_json(path: str, results: dict):
  """results.json: the results, indented."""
  from experiments.metrics import write_atomically
  write_atomically(path, json.dumps(results, indent=1) + '\n')


def _pm(stats: dict, i: int | None = None) -> str:
  mean, std = (stats['mean'], stats['std']) if i is None else (stats['mean'][i], stats['std'][i])
  return f'{mean:.3f} ± {std:.3f}'


def write_markdown(path: str, results: dict):
  """results.md: accuracy and the "ran" query's mass on the decisive word by k, then where
  the rest of its mass goes."""
  from experiments.metrics import write_atomically
  acc, mass = results['accuracy'], results['attention_mass']
  n = len(results['seeds'])
  lines = [
      '# Markov chains → attention with skips', '',
      f'`{results["command"]}`: accuracy on the word after "ran" over '
      f'{results["test_per_distance"]} test sentences per distance k; the Markov tables are '
      f'one fit of the training split (no seed), attention is mean ± std (ddof 1) over {n} '
      f'seeds ({results["steps"][0]} steps each). mass on X: the attention weight of the "ran" '
      'query on the decisive word, in program and in battery sentences.', '',
      '| k | prior (program) | ' + ' | '.join(f'Markov-{o}' for o in ORDERS) +
      ' | attention | mass on X (program) | mass on X (battery) |',
      '| ---: | ---: | ' + ' | '.join('---:' for _ in ORDERS) + ' | ---: | ---: | ---: |']
  for i, k in enumerate(results['distances']):
    lines.append(f'| {k} | {results["prior"][i]:.3f} | ' +
                 ' | '.join(f'{acc[f"markov{o}"][i]:.3f}' for o in ORDERS) +
                 f' | {_pm(acc["attention"], i)} | {_pm(mass["program"]["decisive"], i)} | '
                 f'{_pm(mass["battery"]["decisive"], i)} |')
  lines += ['', 'Where the "ran" query\'s attention goes, over all k (mean ± std over seeds):', '',
            '| sentences | ' + ' | '.join(PARTS) + ' |', '| --- |' + ' ---: |' * len(PARTS)]
  for cls, parts in results['attention_mass_overall'].items():
    lines.append(f'| {cls} | ' + ' | '.join(_pm(parts[p]) for p in PARTS) + ' |')
  lines += ['', 'By seed: the "ran" query\'s weight on the decisive word, over all k:', '',
            '| seed | on "program" (program sentences) | on "battery" (battery sentences) |',
            '| ---: | ---: | ---: |']
  overall = results['attention_mass_overall']
  lines += [f'| {seed} | {overall["program"]["decisive"]["per_seed"][i]:.3f} | '
            f'{overall["battery"]["decisive"]["per_seed"][i]:.3f} |'
            for i, seed in enumerate(results['seeds'])]
  write_atomically(path, '\n'.join(lines) + '\n')


def plot_accuracy(path: str, results: dict):
  """Accuracy on the word after "ran" against k (left); the "ran" query's mass on the
  decisive word against k, program and battery sentences, each seed (right)."""
  from experiments.metrics import pyplot, save_figure
  k = np.array(results['distances'])
  fig, (left, right) = pyplot().subplots(1, 2, figsize=(11, 4.2))
  for order, marker in zip(ORDERS, 'sov'):
    left.plot(k, results['accuracy'][f'markov{order}'], marker=marker, ms=4,
              label=f'Markov order {order} (counts)')
  att = results['accuracy']['attention']
  left.errorbar(k, att['mean'], yerr=att['std'], marker='D', ms=4, capsize=2, color='k',
                label=f'1-layer attention-only ({len(results["seeds"])} seeds)')
  left.plot(k, results['prior'], ':', color='grey', label='prior P(program) = P(please)')
  left.set(xlabel='k: tokens from the decisive word to "ran"', ylim=(0.3, 1.05),
           ylabel='accuracy on the word after "ran"', title='next word after "ran"',
           xticks=k if len(k) <= 20 else None)
  left.legend(fontsize=8, loc='lower right')
  for cls, style in (('program', '-'), ('battery', '--')):
    for i, (seed, mass) in enumerate(zip(results['seeds'],
                                         results['attention_mass'][cls]['decisive']['per_seed'])):
      right.plot(k, mass, style, marker='o', ms=3, color=f'C{i}',
                 label=f'seed {seed}' if cls == 'program' else None)
  right.plot([], [], 'k-', label='program sentences: on "program"')
  right.plot([], [], 'k--', label='battery sentences: on "battery"')
  right.set(xlabel='k', ylabel='attention weight of "ran" on the decisive word', ylim=(0, 1.02),
            title='where the query "ran" looks, by seed', xticks=k if len(k) <= 20 else None)
  right.legend(fontsize=7, ncol=2, loc='upper center', bbox_to_anchor=(0.55, 0.87))
  save_figure(fig, path)


def plot_heatmap(path: str, examples: np.ndarray, weights: np.ndarray, seeds: list):
  """Top: the attention weights [query, key] (head mean) of each example sentence for the seed
  whose "ran" query puts the most weight on the decisive word of both, its "ran" row outlined.
  Bottom: the "ran" row of every seed. weights: [seed, example, query, key]."""
  from experiments.data import skips
  from experiments.metrics import pyplot, save_figure
  plt = pyplot()
  n = [int((ids != skips.ID[skips.PAD_WORD]).sum()) for ids in examples]
  sentences = [[skips.WORDS[i] for i in ids[:m]] for ids, m in zip(examples, n)]
  ran = [words.index('ran') for words in sentences]
  on_decisive = weights[:, np.arange(len(examples)), ran, 2]  # [seed, example]; X at index 2.
  shown = int(on_decisive.min(1).argmax())
  fig, axes = plt.subplots(2, len(examples), figsize=(6.2 * len(examples), 8.4),
                           gridspec_kw={'height_ratios': [3, 1.1]})
  for j, (words, m, r) in enumerate(zip(sentences, n, ran)):
    top, bottom = axes[0, j], axes[1, j]
    image = top.imshow(weights[shown, j, :m, :m], cmap='viridis', vmin=0, vmax=1)
    top.add_patch(plt.Rectangle((-0.5, r - 0.5), m, 1, fill=False, edgecolor='red', lw=2))
    top.set_xticks(range(m), words, rotation=60, ha='right', fontsize=9)
    top.set_yticks(range(m), words, fontsize=9)
    top.set(xlabel='key', ylabel='query', title=f'seed {seeds[shown]}: weight of "ran" on '
            f'"{words[2]}" {weights[shown, j, r, 2]:.2f}')
    fig.colorbar(image, ax=top, fraction=0.046)
    bottom.imshow(weights[:, j, r, :m], cmap='viridis', vmin=0, vmax=1, aspect='auto')
    bottom.set_xticks(range(m), words, rotation=60, ha='right', fontsize=9)
    bottom.set_yticks(range(len(seeds)), [f'seed {s}' for s in seeds], fontsize=8)
    bottom.set_title('query "ran", every seed', fontsize=10)
  save_figure(fig, path)


def define_flags():
  """The command's flags; defined only when run as a program."""
  flags.DEFINE_bool('quick', False, 'A short run that checks the machinery (not a result).')
  flags.DEFINE_string('workdir', None, 'Output directory; default runs/lesson-markov[-quick]. '
                      'Finished seeds in it are not trained again.')
  flags.DEFINE_integer('seeds', 5, 'Seeds of the attention model (mean ± std over them); '
                       '--quick trains 2.')
  flags.DEFINE_bool('verbose', False, 'Show full tracebacks, and library messages on the '
                    'console instead of WORKDIR/library.log.')


def main(argv):
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}; use [--quick] [--workdir=DIR] [--seeds=N]')
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  try:
    if f.seeds < 2:
      raise ValueError(f'--seeds={f.seeds}; it must be >= 2 (a mean ± std over seeds)')
    workdir = f.workdir or os.path.join('runs', 'lesson-markov' + ('-quick' if f.quick else ''))
    print(f'workdir: {workdir}', flush=True)
    run_lesson(workdir, f.quick, f.seeds, f.verbose)
  except Exception as e:  # one line unless --verbose; a signal: saved, exit 128 + signal.
    fail_unless_verbose(e, f.verbose)


if __name__ == '__main__':
  define_flags()
  app.run(exit_on_interrupt(main, 'the seeds finished so far are kept; the same command '
                                  'resumes'), flags_parser=parse_flags)
