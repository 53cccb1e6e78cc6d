"""SD Studio's talking-head engine: a portrait plus a speech recording becomes a video of that face speaking.

An independent implementation of the SadTalker method (audio -> 3DMM expression/pose coefficients ->
keypoint-driven face renderer) that loads the official SadTalker checkpoints. It is a plain library:
nothing here imports gradio, fastapi or ``app``, and importing this package does not import torch
(model files under ``sadtalker.networks`` import it when they are themselves imported).

Entry point: ``sadtalker.engine`` (``TalkingHeadEngine``, ``TalkingHeadRequest``). The stages live in
``audio_io`` (decoding), ``audio`` (mel windows), ``preprocess`` (face, crop, 3DMM source),
``coefficients`` (audio -> expression and pose), ``render`` (streamed frames) and ``video``
(H.264/AAC writing, paste-back); ``checkpoints`` loads the official files into ``networks``.
"""
