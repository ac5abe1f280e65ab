"""Inference: checkpoints to ensemble probabilities with TTA, evaluation on labelled splits, Grad-CAM explanations."""
