"""Stage two: the absorbing transformer, the absorbing process, latent shards, and the fit-prior loop."""
