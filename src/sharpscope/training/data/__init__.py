"""Training data: tokenizers, offline corpora, user data, and a resumable batch sampler.

One module per concern, imports pointing down the list:

* :mod:`.text`         a text source before tokenizing, the train/validation cut, caps
* :mod:`.corpora`      the built-in ``code``, ``prose`` and ``arithmetic`` corpora
* :mod:`.hf_datasets`  ``hf:`` specs: Hugging Face datasets, read offline
* :mod:`.specs`        what a spec names (built-in, file, folder, ``.bin``, ``hf:``)
* :mod:`.tokenizers`   bytes and BPE, and :func:`make_tokenizer`, which trains BPE on specs
* :mod:`.sources`      :class:`TokenSource` and :func:`load_source`: a spec, tokenized
* :mod:`.sampler`      :class:`BatchSampler` and :func:`validation_batches`

The names below are the package's interface; callers import them from here.
"""

from .corpora import (ARITHMETIC_HELDOUT_FRACTION, ARITHMETIC_OPERATORS, BUILTIN_SOURCES,
                      DEFAULT_ARITHMETIC_PROBLEMS, DEFAULT_MAX_BYTES, arithmetic_problems, clear_cache)
from .hf_datasets import HF_OPTIONS
from .sampler import BatchSampler, validation_batches
from .sources import TokenSource, check_vocab, load_source, load_sources
from .specs import resolve_spec
from .text import Text, split_text
from .tokenizers import (MAX_VOCAB_SIZE, TOKENIZER_FILE, TOKENIZER_KINDS, BPETokenizer, ByteTokenizer, Tokenizer,
                         bits_per_byte, make_tokenizer)

__all__ = ["Tokenizer", "ByteTokenizer", "BPETokenizer", "TOKENIZER_KINDS", "TOKENIZER_FILE", "MAX_VOCAB_SIZE",
           "make_tokenizer", "HF_OPTIONS", "TokenSource", "BUILTIN_SOURCES", "DEFAULT_MAX_BYTES",
           "DEFAULT_ARITHMETIC_PROBLEMS", "ARITHMETIC_OPERATORS", "ARITHMETIC_HELDOUT_FRACTION", "Text",
           "resolve_spec", "split_text", "load_source", "load_sources", "arithmetic_problems", "check_vocab",
           "BatchSampler", "validation_batches", "bits_per_byte", "clear_cache"]
