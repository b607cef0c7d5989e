"""python -m experiments.sweep: a grid of training runs, summarised as tables and plots."""
