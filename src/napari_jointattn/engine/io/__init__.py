"""Images and files in and out: reading and writing images with their geometry, size limits,
atomic writes, the channel rule and percentile normalisation. No torch."""
