"""Post-processing of finished images: model upscalers, the SD x4 upscaler, face restoration."""
