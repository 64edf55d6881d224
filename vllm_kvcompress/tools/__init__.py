"""Tools around the plugin: the main command, the demo, head-score calibration, synthetic tasks, model loaders."""
