"""Training: config, the fastai Learner and its callbacks, loss, metrics, precision, devices, torchrun, W&B."""
