"""SD Studio's generation engine: a plain library over Hugging Face diffusers.

Nothing here imports gradio, fastapi or ``app``; heavy libraries (torch, diffusers,
transformers) are imported inside the functions that need them, so importing this
package is instant.
"""
