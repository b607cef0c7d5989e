"""tx's input pipeline: datasets, sources on disk, image and text transforms, and batches.

  memory.py         in-memory datasets (digits, MNIST-1D, seq2seq, character LM, CIFAR pickles)
  skips.py          the lecture's Markov-with-skips sentences as a word-level LM dataset
  sources.py        random-access sources on disk: image folders, TFDS ArrayRecord, parquet
  image_dataset.py  those sources as datasets, with their train and eval views
  images.py         decoding and augmenting images (inception crop, flip, resize, mixup)
  text.py           subword tokenizers and sequence packing for language models
  sampling.py       which examples make up a step's batch: a pure function of (seed, step)
  pipeline.py       grain: batches made in worker processes and placed on the devices ahead

Every dataset offers the same few members to the trainer: info, held_in_memory, num_train,
num_test, sample(n), test_examples(n), train_batch(config, step, process) and
eval_batch(batch_size, index, process), process = (p, P) saying which rows are this process's.
"""

from experiments.data import pipeline
from experiments.data.memory import (BOS, EOS, FIRST_SYMBOL, PAD, SEQ2SEQ_TASKS, Dataset, char_lm,
                                     cifar, digits, mnist1d, seq2seq, shift_images,
                                     shift_offsets, symbol_names)
from experiments.data.sampling import batch_indices
from experiments.data.skips import skip_sentences
