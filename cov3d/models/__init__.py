"""The networks: the architecture registry, the shared head, video ResNets, the 3D RegNet, 2D slice models, checkpoints."""
