"""The bottom layer, shared by the runtime, the profiler and the evaluation: errors, atomic writes and
output directories, cache paths, the safetensors reader, the neuron-file format and data loading.
It imports nothing of the layers above it."""
