"""Training: the LightningModule, EMA, lr schedules, parallelism, loggers, and the fitting loops
of the small VAE and the classifier."""
