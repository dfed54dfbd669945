"""The host and its devices: CPU facts, one simulated device per core, task meshes."""
