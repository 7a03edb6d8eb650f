"""The shipped neuron files of the default model, installed as package data (see README.md here)."""
