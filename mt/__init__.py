"""mt: Transformer machine translation — tokenizer, data, training, beam search, evaluation."""

__version__ = "0.1.0"
