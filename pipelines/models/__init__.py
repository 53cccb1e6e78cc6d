"""Model files: finding them (registry, hashes), loading checkpoints and VAEs offline, converting,
caching and downloading."""
