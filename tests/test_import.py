"""`import tx` pulls in only jax, flax and numpy, and changes no global state."""

import json
import subprocess
import sys

PROBE = r'''
import json, os, sys
import jax
before_env = dict(os.environ)
before_cfg = {k: getattr(jax.config, k) for k in ('jax_enable_x64', 'jax_default_matmul_precision',
                                                  'jax_platforms', 'jax_default_prng_impl')}
before = set(sys.modules)
import tx
new = sorted({m.split('.')[0] for m in set(sys.modules) - before})
after_cfg = {k: getattr(jax.config, k) for k in before_cfg}
print(json.dumps({'new': new, 'env_same': before_env == dict(os.environ),
                  'cfg_same': before_cfg == after_cfg}))
'''


def test_import_tx_is_clean():
  out = subprocess.run([sys.executable, '-c', PROBE], capture_output=True, text=True, check=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['env_same'] and result['cfg_same']
  forbidden = {'optax', 'orbax', 'ml_collections', 'sklearn', 'mnist1d', 'matplotlib',
               'tensorflow', 'torch', 'experiments', 'safetensors', 'transformers'}
  assert not forbidden & set(result['new']), result['new']
  assert 'flax' in result['new'] and 'tx' in result['new']
