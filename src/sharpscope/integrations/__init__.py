"""Adapters that run the sharpness monitor inside other people's training loops.

``sharpscope.integrations.hf.SharpnessCallback`` for the Hugging Face ``Trainer`` and
``sharpscope.integrations.lightning.SharpnessCallback`` for Lightning. Each needs its
framework installed (``pip install sharpscope[hf]`` / ``[lightning]``); importing this
package never imports either.
"""
