"""Torch helpers shared by curvature, optim, training and experiments.

* :mod:`.state`: snapshot and restore a model, an optimizer and the RNG states.
* :mod:`.fsdp`: models sharded with FSDP2 (reshard, full parameters, recovery).
* :mod:`.vectors`: parameter-space vectors as lists of tensors, with rank-aware sums.
* :mod:`.distributed`: every rank takes the same decisions (groups, means over ranks).
* :mod:`.objective`: the measured objective, the mean loss over batches and ranks.
"""
