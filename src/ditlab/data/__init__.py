"""Image sources, latent extraction, the shard format and the LatentDataModule."""
