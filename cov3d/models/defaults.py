"""The Cov3d head's default sizes, stated once (paper §3.2).

Torch-free, so that the registry, the checkpoint loader and the command line can
read them without loading torch.
"""

PENULTIMATE = 512  # width of the head's hidden layer
DROPOUT = 0.5  # after each residual layer of the video ResNets and in every head
