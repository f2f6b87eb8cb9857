"""kdrun's Hydra sweeper over optuna's ask/tell API (Hydra loads sweepers only from the hydra_plugins namespace)."""
