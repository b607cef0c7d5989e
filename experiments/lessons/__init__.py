"""The course's lessons as commands: each trains or builds what a lecture or homework
describes, measures it, and writes its tables (results.json, results.md) and plots (PNG) into
its workdir (docs/lessons.md reads them).

  python -m experiments.lessons.markov [--quick]       Markov chains → attention with skips
  python -m experiments.lessons.properties [--quick]   attention as identity, permutation,
                                                       running layer, convolution; perturbations
  python -m experiments.lessons.conv_imitation [--quick]  heads learning a convolution's offsets
  python -m experiments.lessons.contextual [--quick]   static → contextual embeddings, by layer
"""
