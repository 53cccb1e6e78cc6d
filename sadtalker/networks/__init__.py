"""The SadTalker sub-networks, written so their state-dict keys match the official checkpoints.

Importing this package is cheap; the model modules (which import torch) load on first use, e.g.
``from sadtalker.networks.factory import build_sub_model``.
"""
