"""Editors: one method per module, one class per method (constructor kwargs = hyperparameters)."""
