"""The harness's Hydra launchers (Hydra instantiates plugins from the `hydra_plugins` namespace only)."""
