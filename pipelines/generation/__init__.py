"""The generation engine: samplers, noise, memory options, inpaint planning and the ImageEngine itself."""
