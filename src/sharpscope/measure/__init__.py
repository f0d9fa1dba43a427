"""Curvature of saved checkpoints: one checkpoint, a Hugging Face ``save_pretrained``
folder, or every checkpoint of a finished run in step order (``sharpscope measure``).

``series`` finds and measures checkpoints and writes the run; ``hf`` reads Hugging Face
model folders, Trainer checkpoints and their optimizer state without unpickling anything
beyond ``torch.load(weights_only=True)``. It sits above training (whose models, data and
checkpoints it loads) and beside experiments.
"""
