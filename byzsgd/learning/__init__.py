"""What a replica learns with: datasets and shards, models, losses/optimizers and the flat
state vector, checkpoints.  Knows nothing of the network or the roles."""
