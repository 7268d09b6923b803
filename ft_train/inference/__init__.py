"""Inference pieces behind ``ft-infer`` (ft_train/infer.py): adapters, inputs, the pipeline."""
