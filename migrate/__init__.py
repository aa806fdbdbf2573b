"""The `migrate` command: moves running containers between hosts and snapshots them."""
