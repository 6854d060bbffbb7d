"""editlab: edit the factual knowledge of language models, and measure it honestly."""

__version__ = "0.1.0"
