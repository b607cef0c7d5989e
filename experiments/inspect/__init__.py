"""python -m experiments.inspect: attention maps and head statistics of a trained run."""
