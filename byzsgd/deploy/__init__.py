"""Starting deployments: the one-machine launcher, fast node spawning, multi-host runs over
ssh/netns/SLURM, Garfield's ``trainer.py`` interface, and the run directory they share."""
