"""Analysis of a model's internals: causal tracing (:mod:`editlab.analysis.causal`, the computation)
and its entry point ``python -m editlab.analysis.trace`` (:mod:`editlab.analysis.trace`)."""
